"""``attention_softmax``: argument checks, normalisation and dispatch.

Every call is validated and normalised here once (:func:`prepare`): masks and alibi become
4-D views that broadcast to ``[B, H_local, Q, K]`` (never expanded in memory), the global alibi
tensor or slopes are sliced to this rank's heads in place. The normalised call then runs on
the fused CUDA kernel when it can (``tp_softmax._kernel``) and on the pure-PyTorch
implementation (``tp_softmax.reference``) otherwise.
"""

import math
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from .reference import softmax_reference

__all__ = ["attention_softmax", "prepare", "Prepared", "FORCE_TORCH_ENV"]

FORCE_TORCH_ENV = "TP_SOFTMAX_FORCE_TORCH"
_SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Prepared:
    """A validated call: 4-D broadcastable views restricted to the local heads."""

    scores: torch.Tensor                 # [B, H, Q, K]
    layer_scale: float
    bias: Optional[torch.Tensor]         # [B|1, H, Q|1, K|1] float view of the global alibi
    slopes: Optional[torch.Tensor]       # [B|1, H] float32
    mask: Optional[torch.Tensor]         # 4-D, broadcastable, bool or float
    causal: bool
    window: Optional[int]
    inplace: bool


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _check_tensor_arg(name: str, t, scores: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.device != scores.device:
        raise ValueError(f"{name} is on {t.device} but scores is on {scores.device}")


def _may_overlap(t: torch.Tensor) -> bool:
    """False when the strides prove that no two elements of ``t`` share memory."""
    span = 0
    for stride, size in sorted((abs(st), n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def _broadcast_4d(name: str, t: torch.Tensor, target: tuple) -> torch.Tensor:
    """View ``t`` as 4-D (leading 1s) and check that every dim is 1 or the target's."""
    if t.dim() > 4:
        raise ValueError(f"{name} must have at most 4 dims, got shape {_shape(t)}")
    v = t.reshape((1,) * (4 - t.dim()) + _shape(t)) if t.dim() < 4 else t
    if any(s not in (1, n) for s, n in zip(v.shape, target)):
        raise ValueError(
            f"{name} of shape {_shape(t)} does not broadcast to scores [B, H_local, Q, K] = {target}"
        )
    return v


def _alibi_view(alibi: torch.Tensor, scores: torch.Tensor, head_offset: int) -> torch.Tensor:
    b, h, q, k = scores.shape
    if not alibi.is_floating_point():
        raise TypeError(f"alibi must be a floating-point tensor, got dtype {alibi.dtype}")
    if alibi.dim() == 3:
        if alibi.size(0) % b != 0:
            raise ValueError(
                f"alibi of shape {_shape(alibi)} is read as [B*H_total, 1|Q, K] but its dim 0 "
                f"({alibi.size(0)}) is not a multiple of B = {b}"
            )
        view = alibi.unflatten(0, (b, alibi.size(0) // b))
    elif alibi.dim() == 4:
        view = alibi
    else:
        raise ValueError(
            f"alibi must be 3-D [B*H_total, 1|Q, K] or 4-D [B|1, H_total, 1|Q, K], got shape {_shape(alibi)}"
        )
    total = view.size(1)
    if total < head_offset + h:
        raise ValueError(
            f"alibi has {total} heads but head_offset + H_local = {head_offset} + {h} = {head_offset + h} "
            f"are needed (shape {_shape(alibi)})"
        )
    for dim, (size, allowed) in enumerate(zip(view.shape, ((1, b), None, (1, q), (1, k)))):
        if allowed is not None and size not in allowed:
            raise ValueError(
                f"alibi of shape {_shape(alibi)} (as 4-D {_shape(view)}) does not broadcast to "
                f"[B, H_total, Q, K] with B={b}, Q={q}, K={k} in dim {dim}"
            )
    return view.narrow(1, head_offset, h)


def _slopes_view(slopes: torch.Tensor, scores: torch.Tensor, head_offset: int) -> torch.Tensor:
    b, h = scores.shape[:2]
    if not slopes.is_floating_point():
        raise TypeError(f"alibi_slopes must be a floating-point tensor, got dtype {slopes.dtype}")
    if slopes.dim() == 1:
        view = slopes.unsqueeze(0)
    elif slopes.dim() == 2:
        if slopes.size(0) not in (1, b):
            raise ValueError(f"alibi_slopes of shape {_shape(slopes)}: dim 0 must be 1 or B = {b}")
        view = slopes
    else:
        raise ValueError(f"alibi_slopes must be [H_total] or [B, H_total], got shape {_shape(slopes)}")
    if view.size(1) < head_offset + h:
        raise ValueError(
            f"alibi_slopes has {view.size(1)} heads but head_offset + H_local = {head_offset} + {h} = "
            f"{head_offset + h} are needed (shape {_shape(slopes)})"
        )
    return view.narrow(1, head_offset, h).to(torch.float32)


def prepare(scores, *, layer_scale=1.0, alibi=None, alibi_slopes=None, mask=None, causal=False,
            window=None, head_offset=0, inplace=False) -> Prepared:
    """Validate the arguments of :func:`attention_softmax` and normalise them (no copies)."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 4:
        raise ValueError(f"scores must be 4-D [B, H_local, Q, K], got shape {_shape(scores)}")
    if scores.dtype not in _SCORE_DTYPES:
        raise TypeError(f"scores must be float16, bfloat16 or float32, got dtype {scores.dtype}")
    if isinstance(layer_scale, bool) or not isinstance(layer_scale, (int, float)):
        raise TypeError(f"layer_scale must be a float, got {type(layer_scale).__name__}")
    layer_scale = float(layer_scale)
    if not math.isfinite(layer_scale):
        raise ValueError(f"layer_scale must be finite, got {layer_scale}")
    if isinstance(head_offset, bool) or not isinstance(head_offset, int):
        raise TypeError(f"head_offset must be an int, got {type(head_offset).__name__}")
    if head_offset < 0:
        raise ValueError(f"head_offset must be >= 0, got {head_offset}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise TypeError(f"window must be an int >= 1 or None, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if alibi is not None and alibi_slopes is not None:
        raise ValueError("give alibi or alibi_slopes, not both")

    target = _shape(scores)
    bias = None
    if alibi is not None:
        _check_tensor_arg("alibi", alibi, scores)
        bias = _alibi_view(alibi, scores, head_offset)
    slopes = None
    if alibi_slopes is not None:
        _check_tensor_arg("alibi_slopes", alibi_slopes, scores)
        slopes = _slopes_view(alibi_slopes, scores, head_offset)
    if mask is not None:
        _check_tensor_arg("mask", mask, scores)
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"mask must be bool (True = attend) or floating point (additive), got dtype {mask.dtype}")
        mask = _broadcast_4d("mask", mask, target)
    if inplace:
        if _may_overlap(scores):
            raise ValueError(
                f"inplace=True needs scores that own each element, but scores of shape {target} has "
                f"strides {tuple(scores.stride())} (elements share memory, e.g. a broadcast view)"
            )
        if scores.requires_grad and torch.is_grad_enabled():
            raise ValueError("inplace=True on scores that require grad: call with inplace=False")
    return Prepared(scores, layer_scale, bias, slopes, mask, causal, window, inplace)


def _force_torch() -> bool:
    return os.environ.get(FORCE_TORCH_ENV, "") not in ("", "0")


_announced = set()


def _announce_fallback(reasons) -> None:
    key = tuple(reasons)
    if key not in _announced:
        _announced.add(key)
        warnings.warn("tp_softmax: CUDA tensors take the PyTorch path because: " + "; ".join(reasons),
                      RuntimeWarning, stacklevel=3)


def run_reference(p: Prepared) -> torch.Tensor:
    return softmax_reference(p.scores, layer_scale=p.layer_scale, bias=p.bias, slopes=p.slopes,
                             mask=p.mask, causal=p.causal, window=p.window, inplace=p.inplace)


def attention_softmax(scores: torch.Tensor, *, layer_scale: float = 1.0,
                      alibi: Optional[torch.Tensor] = None,
                      alibi_slopes: Optional[torch.Tensor] = None,
                      mask: Optional[torch.Tensor] = None, causal: bool = False,
                      window: Optional[int] = None, head_offset: int = 0,
                      inplace: bool = False) -> torch.Tensor:
    """Scaled, biased, masked softmax of attention scores, for one tensor-parallel rank.

    Args:
        scores: ``[B, H_local, Q, K]`` float16 / bfloat16 / float32, CPU or CUDA, any strides.
        layer_scale: multiplies the raw scores first.
        alibi: the bias of ALL heads (global): 3-D ``[B*H_total, 1|Q, K]`` (batch-major, BLOOM /
            DeepSpeed layout) or 4-D ``[B|1, H_total, 1|Q, K]``. Heads ``head_offset ..
            head_offset + H_local - 1`` are read in place.
        alibi_slopes: ``[H_total]`` or ``[B, H_total]`` slopes; the bias is
            ``-slope * |i + K - Q - j|``, computed, not read.
        mask: bool (True = attend) or additive float, any shape that broadcasts to
            ``[B, H_local, Q, K]`` with at most 4 dims.
        causal: hide keys after the query's own position, bottom-right aligned.
        window: int >= 1: hide keys ``j <= p - window``; the row sees at most ``window`` keys.
        head_offset: global index of this rank's first head.
        inplace: write the result into ``scores`` and return it.

    Row ``i`` sits at absolute position ``p = i + K - Q`` (the last query is the last key).
    For ``Q = 3, K = 6`` (``x`` visible, ``.`` hidden)::

        causal               window=2              causal, window=2
        x x x x . .          . . x x x x           . . x x . .
        x x x x x .          . . . x x x           . . . x x .
        x x x x x x          . . . . x x           . . . . x x

    (``window`` alone hides only the left side.) Every row is computed in float32; a row with
    no visible key is all zeros; a NaN at a visible position makes the row NaN.

    Returns:
        ``[B, H_local, Q, K]`` probabilities in ``scores.dtype`` (``scores`` itself when
        ``inplace``).
    """
    p = prepare(scores, layer_scale=layer_scale, alibi=alibi, alibi_slopes=alibi_slopes, mask=mask,
                causal=causal, window=window, head_offset=head_offset, inplace=inplace)
    if p.scores.is_cuda and not _force_torch():
        from . import _kernel

        reasons = _kernel.unsupported_reasons(p)
        if not reasons:
            return _kernel.run(p)
        _announce_fallback(reasons)
    return run_reference(p)
