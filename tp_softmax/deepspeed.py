"""A drop-in for DeepSpeed inference's ``SoftmaxOp`` (SPEC.md section 3).

``SoftmaxOp(config)`` has the constructor and the exact ``forward`` signature of
``deepspeed.ops.transformer.inference.op_binding.SoftmaxOp`` and reads its inputs the way
DeepSpeed's ``softmax_fp16/bf16/fp32`` kernels do; it needs neither DeepSpeed nor its compiled
ops. :func:`patch` makes DeepSpeed's inference attention (``BloomSelfAttention`` in
``deepspeed.ops.transformer.inference.ds_attention``) construct it; :func:`unpatch` undoes that.

DeepSpeed's input conventions, kept:

* ``attn_scores`` ``[B, H_local, Q, K]`` in the config's dtype; an int8 config computes in
  float16. Like the kernel, a contiguous ``attn_scores`` is overwritten with the result and
  returned.
* ``attn_mask``: additive. 2-D ``[B, K]`` is one row per batch entry; 4-D ``[B, 1, Q|1, K]``
  (and 3-D ``[B, Q, K]``). A 1-D tensor (empty, or one element: DeepSpeed's ``torch.empty(1)``)
  or ``None`` means no mask. A bool mask is read as True = attend.
* ``alibi``: ``[B * H_total, 1, K]`` with the bias of *all* heads (or 4-D ``[B|1, H_total, 1|Q,
  K]``); 1-D or ``None`` means no alibi.
* ``layer_scale`` multiplies the raw scores; ``triangular`` is the causal mask;
  ``local_attention`` with ``window_size`` the sliding window; ``recompute`` (unused by the
  kernel too) and ``async_op`` (DeepSpeed's side stream; this op runs on the current stream)
  change nothing.

The head offset: DeepSpeed's ``BloomSelfAttention`` passes ``head_offset = global rank *
H_local``, which is wrong when the tensor-parallel group is not the whole world (pipeline or
data parallelism beside it) and when the heads do not split evenly. This op ignores the
``head_offset`` argument: its offset comes from :func:`tp_softmax.head_partition` and the rank
in the tensor-parallel group, given at construction or by :meth:`SoftmaxOp.bind` (the patched
``BloomSelfAttention`` binds its own ``mp_group``). A different ``head_offset`` argument is
reported once per op by a warning.

Where DeepSpeed is right the results agree (up to DeepSpeed's ``+1e-6`` in the denominator).
Where it is wrong this op returns the values of the contract (SPEC.md section 1) instead:

=================================  ==========================================================
DeepSpeed                          tp_softmax
=================================  ==========================================================
8192 < K <= 32768 wrong, K > 32768 any K
refused
window start ``i + K`` for Q < K,  bottom-right window ``j <= i + K - Q - w`` hidden, any w
keys dropped when w % 4 is 2 or 3
``triangular`` top-left: wrong     bottom-right causal: right with a cache (1 < Q < K)
with a KV cache
fallback: alibi sliced along       alibi heads ``[offset, offset + H_local)`` of each batch
B * H by the local head count      entry
hidden keys are -10000, +1e-6 in   hidden keys are -inf; a row with no visible key is zeros
the denominator: a fully masked
row is uniform or garbage
a mask broadcast over the batch    read with stride 0
is read out of bounds
head offset from the global rank   from the tensor-parallel group
=================================  ==========================================================
"""

import warnings
from typing import Optional

import torch

from .ops import attention_softmax
from .parallel import group_rank_and_size, head_partition

__all__ = ["SoftmaxOp", "patch", "unpatch", "patched", "is_patched"]


def _compute_dtype(dtype) -> torch.dtype:
    """The scores' dtype for a DeepSpeed config dtype (int8 weights compute in float16)."""
    if dtype in (torch.int8, "int8"):
        return torch.float16
    names = {"fp16": torch.float16, "half": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
             "float": torch.float32, "float32": torch.float32}
    if isinstance(dtype, str) and dtype in names:
        return names[dtype]
    if dtype in (torch.float16, torch.bfloat16, torch.float32):
        return dtype
    raise TypeError(f"SoftmaxOp: config.dtype must be float16, bfloat16, float32 or int8, got {dtype!r}")


def _absent(t) -> bool:
    """DeepSpeed's 'no tensor': None or fewer than 2 dims (``torch.empty(1)``)."""
    return t is None or (isinstance(t, torch.Tensor) and t.dim() <= 1)


class SoftmaxOp(torch.nn.Module):
    """DeepSpeed's inference ``SoftmaxOp`` computed by :func:`tp_softmax.attention_softmax`.

    ``SoftmaxOp(config, group=None, *, rank=None, world_size=None)``: ``config`` is a
    ``DeepSpeedInferenceConfig`` or anything with ``heads`` (total), ``mp_size`` and ``dtype``.
    The rank comes from ``rank`` / ``world_size``, else from ``group`` (the tensor-parallel
    process group), else from :meth:`bind`, which may be called before the first forward.
    Without any of them: rank 0 of 1 when ``mp_size == 1``; the default group when its size
    is ``mp_size`` (then the world is the tensor-parallel group); an error otherwise.
    """

    def __init__(self, config, group=None, *, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        super().__init__()
        for name in ("heads", "dtype"):
            if not hasattr(config, name):
                raise TypeError(f"SoftmaxOp: config has no attribute {name!r} (a DeepSpeedInferenceConfig "
                                "or an object with heads, mp_size and dtype is expected)")
        self.config = config
        self.total_heads = int(config.heads)
        self.mp_size = int(getattr(config, "mp_size", 1) or 1)
        self.compute_dtype = _compute_dtype(config.dtype)
        self._place = None
        self._warned_offset = False
        if group is not None or rank is not None or world_size is not None or self.mp_size == 1:
            self.bind(group, rank=rank, world_size=world_size)

    def bind(self, group=None, *, rank: Optional[int] = None, world_size: Optional[int] = None):
        """Take this rank's place in the tensor-parallel ``group`` (or the explicit rank)."""
        if group is None and rank is None and world_size is None:
            dist = torch.distributed
            if self.mp_size == 1:
                rank, world_size = 0, 1
            elif not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != self.mp_size:
                raise ValueError(
                    f"SoftmaxOp: mp_size is {self.mp_size} but no tensor-parallel group was given and the "
                    "default group is not of that size: pass group= (or rank= and world_size=), or bind() "
                    "one before the first forward")
        rank, world_size = group_rank_and_size(group, rank, world_size)
        if world_size != self.mp_size:
            raise ValueError(f"SoftmaxOp: the tensor-parallel group has {world_size} ranks but "
                             f"config.mp_size is {self.mp_size}")
        offset, count = head_partition(self.total_heads, world_size, rank)
        self._place = (rank, world_size, offset, count)
        return self

    def _placement(self):
        if self._place is None:
            self.bind()
        return self._place

    @property
    def head_offset(self) -> int:
        return self._placement()[2]

    @property
    def num_attention_heads_per_partition(self) -> int:
        """This rank's head count (DeepSpeed's attribute name; uneven splits included)."""
        return self._placement()[3]

    def extra_repr(self) -> str:
        place = "unbound" if self._place is None else \
            f"rank={self._place[0]}/{self._place[1]}, heads=[{self._place[2]}, {self._place[2] + self._place[3]})"
        return f"total_heads={self.total_heads}, dtype={self.compute_dtype}, {place}"

    def forward(self, attn_scores: torch.Tensor, attn_mask: torch.Tensor, alibi: torch.Tensor,
                triangular: bool, recompute: bool, local_attention: bool, window_size: int,
                async_op: bool, layer_scale: float, head_offset: int) -> torch.Tensor:
        """DeepSpeed's ``softmax_<dtype>(...)``; ``head_offset`` is ignored (module docstring)."""
        _, _, offset, count = self._placement()
        if not isinstance(attn_scores, torch.Tensor) or attn_scores.dim() != 4:
            got = tuple(attn_scores.shape) if isinstance(attn_scores, torch.Tensor) else type(attn_scores).__name__
            raise ValueError(f"SoftmaxOp: attn_scores must be a 4-D tensor [B, H_local, Q, K], got {got}")
        if attn_scores.dtype != self.compute_dtype:
            raise TypeError(f"SoftmaxOp: attn_scores has dtype {attn_scores.dtype} but the config "
                            f"(dtype {self.config.dtype}) computes in {self.compute_dtype}")
        if attn_scores.size(1) != count:
            raise ValueError(f"SoftmaxOp: attn_scores has {attn_scores.size(1)} heads (shape "
                             f"{tuple(attn_scores.shape)}) but this rank owns {count} of {self.total_heads}")
        if head_offset is not None and int(head_offset) != offset and not self._warned_offset:
            self._warned_offset = True
            warnings.warn(f"SoftmaxOp: head_offset={int(head_offset)} from the caller ignored; the "
                          f"tensor-parallel group gives {offset}", RuntimeWarning, stacklevel=2)

        batch = attn_scores.size(0)
        mask = None if _absent(attn_mask) else attn_mask
        if mask is not None:
            if mask.dim() == 2:
                mask = mask[:, None, None, :]
            elif mask.dim() == 3:
                mask = mask[:, None]
        bias = None if _absent(alibi) else alibi
        if bias is not None:
            heads = bias.size(0) // batch if bias.dim() == 3 else bias.size(1)
            if bias.dim() not in (3, 4) or heads != self.total_heads or (bias.dim() == 3 and bias.size(0) % batch):
                raise ValueError(f"SoftmaxOp: alibi must hold all {self.total_heads} heads, [B * H_total, 1, K] = "
                                 f"[{batch * self.total_heads}, 1, K] (or [B|1, H_total, 1|Q, K]); got shape "
                                 f"{tuple(bias.shape)}")
        window = int(window_size) if local_attention else None
        inplace = attn_scores.is_contiguous() and not (attn_scores.requires_grad and torch.is_grad_enabled())
        return attention_softmax(attn_scores, layer_scale=float(layer_scale), alibi=bias, mask=mask,
                                 causal=bool(triangular), window=window, head_offset=offset, inplace=inplace)


_saved = {}


def is_patched() -> bool:
    return bool(_saved)


def patch() -> None:
    """Make DeepSpeed's inference attention use :class:`SoftmaxOp`.

    ``deepspeed.ops.transformer.inference.ds_attention.SoftmaxOp`` becomes this class, so
    ``BloomSelfAttention`` constructs it, and each ``BloomSelfAttention`` binds its op to its
    own ``mp_group`` (the tensor-parallel group; without one, see :class:`SoftmaxOp`). Call it
    before ``deepspeed.init_inference``. Patching twice is a no-op; :func:`unpatch` restores
    DeepSpeed.
    """
    if _saved:
        return
    from deepspeed.ops.transformer.inference import ds_attention

    original_init = ds_attention.BloomSelfAttention.__init__

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        group = getattr(self, "mp_group", None)
        if isinstance(self.softmax_func, SoftmaxOp) and group is not None:
            self.softmax_func.bind(group)

    __init__.__wrapped__ = original_init
    _saved.update(module=ds_attention, softmax_op=ds_attention.SoftmaxOp, init=original_init)
    ds_attention.SoftmaxOp = SoftmaxOp
    ds_attention.BloomSelfAttention.__init__ = __init__


def unpatch() -> None:
    """Undo :func:`patch` (attention modules built while patched keep their op)."""
    if not _saved:
        return
    module = _saved["module"]
    module.SoftmaxOp = _saved["softmax_op"]
    module.BloomSelfAttention.__init__ = _saved["init"]
    _saved.clear()


class patched:
    """``with tp_softmax.deepspeed.patched(): ...``: :func:`patch` for the block only."""

    def __enter__(self):
        self._was = is_patched()
        patch()
        return self

    def __exit__(self, *exc):
        if not self._was:
            unpatch()
        return False
