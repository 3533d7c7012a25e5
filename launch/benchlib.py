"""Building blocks of ``launch/bench.py``: cases, the byte floor, inputs, references, timers.

Nothing here knows about the command line or about processes; ``bench.py`` puts it together.
Everything is importable on a machine without a GPU (the tests use it that way).

Conventions of the generated problems (the public case table of the project's anchors):

* scores are ``randn * 4`` in the case's dtype, ``[B, H_local, Q, K]``, contiguous;
* ``pad``: an additive ``[B, 1, 1, K]`` mask in the scores' dtype, ``-inf`` on the first
  ``pad_b = (b + 1) * K // (4 * B)`` keys of batch row ``b`` (left padding, a different amount
  per row, at most a quarter of the keys), ``0`` elsewhere;
* ``boolpad``: the same padding as a bool ``[B, 1, 1, K]`` mask (True = the key takes part, the
  SDPA convention), one byte a key;
* ``alibi``: BLOOM's tensor for ALL heads, ``bias[b, g, 0, j] = slope[g] * pos_b(j)`` where
  ``pos_b(j)`` is the key's position counted from the first unpadded key (0 on padding), in the
  scores' dtype, ``[B, H_total, 1, K]`` contiguous (the same memory as DeepSpeed's
  ``[B * H_total, 1, K]``); the rank reads its heads through ``head_offset``;
* ``slopes``: ``tp_softmax.alibi_slopes(H_total)``, the bias is computed, not read.
"""

import math
import re
import statistics
import time
import zlib
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# Largest max-abs error vs float64 on sampled rows that counts as "right" for each dtype:
# about one unit in the last place at 1.0 (probabilities are at most 1).
TOLERANCE = {"fp16": 1e-3, "bf16": 8e-3, "fp32": 1e-5}
# Above this the result is plainly wrong (the anchors' "wrong" is an error of about 1.0).
WRONG = 0.1

CONTENDERS = ("copy", "tp_softmax", "eager", "compile", "deepspeed")


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One benchmark problem as one rank sees it.

    ``H`` is the rank's head count (H_local) and ``mp`` the tensor-parallel degree, so the
    model has ``H * mp`` heads. ``scaling`` cases are also timed as one unsharded problem on a
    single rank, to compare the per-rank time with a ``1/mp`` share of it.
    """

    name: str
    dtype: str
    B: int
    H: int
    mp: int
    Q: int
    K: int
    causal: bool = False
    alibi: bool = False
    slopes: bool = False
    pad: bool = False
    boolpad: bool = False
    window: Optional[int] = None
    scale: float = 1.0
    scaling: bool = False

    @property
    def H_total(self) -> int:
        return self.H * self.mp

    @property
    def padded(self) -> bool:
        """Left padding, as an additive (``pad``) or a bool (``boolpad``) mask."""
        return self.pad or self.boolpad

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def flags(self) -> str:
        parts = []
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            parts.append(f"window={self.window}")
        if self.alibi:
            parts.append("alibi")
        if self.slopes:
            parts.append("slopes")
        if self.pad:
            parts.append("pad")
        if self.boolpad:
            parts.append("boolpad")
        if self.scale != 1.0:
            parts.append(f"scale={self.scale:g}")
        if self.scaling:
            parts.append("scaling")
        return "+".join(parts) if parts else "-"

    def shape_text(self) -> str:
        return f"{self.B},{self.H},{self.mp},{self.Q},{self.K}"


def _c(name, dtype, B, H, mp, Q, K, **flags) -> Case:
    return Case(name, dtype, B, H, mp, Q, K, **flags)


# The public case table: name, dtype, B, H_local, mp, Q, K, flags.
PUBLIC_CASES: Tuple[Case, ...] = (
    _c("bloom176b-prefill-tp2", "fp16", 1, 56, 2, 2048, 2048, causal=True, alibi=True, pad=True),
    _c("gpt-prefill-b8", "bf16", 8, 16, 1, 1024, 1024, causal=True, pad=True),
    _c("bert-b32-s512", "fp16", 32, 16, 1, 512, 512, pad=True),
    _c("long-8k", "fp16", 1, 16, 1, 8192, 8192, causal=True),
    _c("long-16k", "fp16", 1, 8, 1, 16384, 16384, causal=True),
    _c("long-32k", "bf16", 1, 2, 1, 32768, 32768, causal=True),
    _c("decode-b64-k4k", "fp16", 64, 32, 4, 1, 4096, alibi=True, pad=True),
    _c("decode-b8-k64k", "bf16", 8, 32, 1, 1, 65536),
    _c("fp32-alibi-s512", "fp32", 4, 16, 2, 512, 512, causal=True, alibi=True),
    _c("window-4k-w1k", "fp16", 2, 16, 1, 4096, 4096, causal=True, window=1024),
)

# Named cases outside the default run (select them with --only).
EXTRA_CASES: Tuple[Case, ...] = (
    # BLOOM-176B attention on 4 ranks: 112 heads, 28 per rank.
    _c("bloom176b-tp4", "fp16", 1, 28, 4, 2048, 2048, causal=True, alibi=True, pad=True, scaling=True),
)

_FLAG_RE = re.compile(r"^(causal|alibi|slopes|pad|boolpad|scaling|window=\d+|scale=[-+0-9.eE]+)$")


def parse_case(spec: str) -> Case:
    """Parse ``[NAME=]B,H,mp,Q,K,dtype[,flags]``; flags joined by ``+``, e.g.
    ``causal+alibi+pad+window=1024+slopes+scale=0.125`` (``-`` or nothing for none); ``boolpad``
    in place of ``pad`` gives the padding as a bool mask."""
    name = None
    body = spec.strip()
    if "=" in body.split(",")[0]:
        name, body = body.split("=", 1)
        name = name.strip()
    parts = [p.strip() for p in body.split(",")]
    if len(parts) not in (6, 7):
        raise ValueError(f"--case {spec!r}: expected [NAME=]B,H,mp,Q,K,dtype[,flags]")
    try:
        B, H, mp, Q, K = (int(p) for p in parts[:5])
    except ValueError:
        raise ValueError(f"--case {spec!r}: B, H, mp, Q and K must be integers") from None
    if min(B, H, mp, Q, K) < 1:
        raise ValueError(f"--case {spec!r}: B, H, mp, Q and K must be >= 1")
    dtype = parts[5].lower()
    if dtype not in DTYPES:
        raise ValueError(f"--case {spec!r}: dtype must be one of fp16, bf16, fp32, got {parts[5]!r}")
    dtype = DTYPE_NAMES[DTYPES[dtype]]
    flags = {}
    text = parts[6] if len(parts) == 7 else "-"
    if text not in ("", "-", "none"):
        for flag in text.split("+"):
            flag = flag.strip().lower()
            if not _FLAG_RE.match(flag):
                raise ValueError(f"--case {spec!r}: unknown flag {flag!r} (causal, alibi, slopes, pad, "
                                 "boolpad, window=N, scale=F, scaling)")
            if flag.startswith("window="):
                flags["window"] = int(flag.split("=", 1)[1])
                if flags["window"] < 1:
                    raise ValueError(f"--case {spec!r}: window must be >= 1")
            elif flag.startswith("scale="):
                flags["scale"] = float(flag.split("=", 1)[1])
            else:
                flags[flag] = True
    if flags.get("alibi") and flags.get("slopes"):
        raise ValueError(f"--case {spec!r}: alibi and slopes exclude each other")
    if flags.get("pad") and flags.get("boolpad"):
        raise ValueError(f"--case {spec!r}: pad and boolpad exclude each other (one mask)")
    case = Case(name or "", dtype, B, H, mp, Q, K, **flags)
    if not name:
        suffix = "" if case.flags == "-" else f"-{case.flags}"
        case = replace(case, name=f"case-{dtype}-{B}x{H}x{mp}-{Q}x{K}{suffix}")
    return case


def smoke_case(case: Case) -> Case:
    """A tiny version of ``case`` with the same name and flags (for CPU runs and CI)."""
    if case.Q == 1:
        q, k = 1, 80
    elif case.Q == case.K:
        q = k = 48
    else:
        q, k = 24, 48
    window = None if case.window is None else 16
    return replace(case, B=min(case.B, 2), H=min(case.H, 3), Q=q, K=k, window=window)


# ----------------------------------------------------------------------------------------------
# Visibility and the floor
# ----------------------------------------------------------------------------------------------

def visible_ranges(q_len: int, k_len: int, causal: bool, window: Optional[int]):
    """Per query row i, the keys ``lo[i] .. hi[i]`` (inclusive) that causal / window leave
    visible, bottom-right aligned (row i sits at position ``p = i + K - Q``). Empty where
    ``hi < lo``. Returns two int64 tensors of length Q."""
    pos = torch.arange(q_len, dtype=torch.int64) + (k_len - q_len)
    hi = torch.clamp(pos, max=k_len - 1) if causal else torch.full((q_len,), k_len - 1, dtype=torch.int64)
    lo = torch.clamp(pos - window + 1, min=0) if window is not None else torch.zeros(q_len, dtype=torch.int64)
    return lo, hi


def visible_counts(q_len: int, k_len: int, causal: bool, window: Optional[int]) -> torch.Tensor:
    """Number of keys each query row sees (causal / window only), int64 ``[Q]``."""
    lo, hi = visible_ranges(q_len, k_len, causal, window)
    return torch.clamp(hi - lo + 1, min=0)


def _union_size(lo: torch.Tensor, hi: torch.Tensor, k_len: int) -> int:
    keep = hi >= lo
    if not bool(keep.any()):
        return 0
    delta = torch.zeros(k_len + 1, dtype=torch.int64)
    delta.index_add_(0, lo[keep], torch.ones(int(keep.sum()), dtype=torch.int64))
    delta.index_add_(0, hi[keep] + 1, -torch.ones(int(keep.sum()), dtype=torch.int64))
    return int((delta.cumsum(0)[:k_len] > 0).sum())


def needed_elements(shape: Sequence[int], q_len: int, k_len: int, causal: bool,
                    window: Optional[int]) -> int:
    """Distinct elements of a tensor broadcast to ``[B, H, Q, K]`` (4-D ``shape``, each dim 1
    or full) that some visible position reads: a broadcast dim counts once, and positions that
    causal / window hide in every row that reads them are not needed."""
    if len(shape) != 4:
        raise ValueError(f"needed_elements: shape must be 4-D, got {tuple(shape)}")
    mb, mh, mq, mk = shape
    lo, hi = visible_ranges(q_len, k_len, causal, window)
    counts = torch.clamp(hi - lo + 1, min=0)
    if mq == q_len and mk == k_len:
        qk = int(counts.sum())
    elif mk == k_len:  # one row of K shared by all queries: the union of what they see
        qk = _union_size(lo, hi, k_len)
    elif mq == q_len:  # one value per query row
        qk = int((counts > 0).sum())
    else:
        qk = 1 if bool((counts > 0).any()) else 0
    return mb * mh * qk


@dataclass
class FloorBytes:
    scores_read: int
    output_written: int
    extras_read: int

    @property
    def total(self) -> int:
        return self.scores_read + self.output_written + self.extras_read


def floor_bytes(B: int, H: int, Q: int, K: int, itemsize: int, *, causal: bool = False,
                window: Optional[int] = None,
                extras: Sequence[Tuple[Sequence[int], int]] = ()) -> FloorBytes:
    """The fewest bytes the op must move for one rank's ``[B, H, Q, K]`` problem.

    * score bytes of the visible positions (hidden causal / window positions need not be read;
      padding is not hidden: the mask must be read to know it),
    * every output byte (hidden positions are written as zeros),
    * ``extras``: ``(shape, itemsize)`` of each mask / bias operand as the rank reads it (local
      heads only, 4-D broadcastable, e.g. ``(B, 1, 1, K)``), each distinct needed element once.
    """
    visible = int(visible_counts(Q, K, causal, window).sum())
    scores = B * H * visible * itemsize
    out = B * H * Q * K * itemsize
    extra = sum(needed_elements(shape, Q, K, causal, window) * size for shape, size in extras)
    return FloorBytes(scores, out, extra)


def pad_lengths(B: int, K: int) -> List[int]:
    """Left padding of each batch row: ``(b + 1) * K // (4 * B)`` keys."""
    return [((b + 1) * K) // (4 * B) for b in range(B)]


def row_has_visible(case: Case) -> torch.Tensor:
    """``[B, Q]`` bool: does the row keep at least one key once causal, window and padding
    hide theirs (rows without are all zeros by the contract)."""
    lo, hi = visible_ranges(case.Q, case.K, case.causal, case.window)
    pads = torch.tensor(pad_lengths(case.B, case.K) if case.padded else [0] * case.B, dtype=torch.int64)
    start = torch.maximum(lo.unsqueeze(0), pads.unsqueeze(1))
    return hi.unsqueeze(0) >= start


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

@dataclass
class Shard:
    """The heads one (possibly virtual) rank owns."""

    rank: int
    head_offset: int
    heads: int


@dataclass
class Problem:
    """The generated inputs of one rank: ``sets`` rotate so that small problems run cold."""

    case: Case
    shard: Shard
    sets: List[Dict[str, Optional[torch.Tensor]]]
    floor: FloorBytes
    sample: "Sample"
    expected_sums: torch.Tensor          # [B, 1, Q] float32: 1 where a key is visible, else 0

    @property
    def scores_bytes(self) -> int:
        s = self.sets[0]["scores"]
        return s.numel() * s.element_size()


def build_alibi(case: Case, slopes: torch.Tensor, device, dtype) -> torch.Tensor:
    """BLOOM's alibi for all heads, ``[B, H_total, 1, K]``: slope * position from the first
    unpadded key (0 on padding)."""
    keys = torch.arange(case.K, device=device, dtype=torch.float32)
    pads = torch.tensor(pad_lengths(case.B, case.K) if case.padded else [0] * case.B,
                        device=device, dtype=torch.float32)
    pos = torch.clamp(keys.unsqueeze(0) - pads.unsqueeze(1), min=0.0)        # [B, K]
    bias = slopes.to(device).view(1, -1, 1, 1) * pos.view(case.B, 1, 1, case.K)
    return bias.to(dtype).contiguous()


def build_pad_mask(case: Case, device, dtype) -> torch.Tensor:
    """``[B, 1, 1, K]``: additive in ``dtype`` (``-inf`` on padding, 0 elsewhere), or with
    ``boolpad`` bool (False on padding, True elsewhere)."""
    padding = torch.zeros(case.B, 1, 1, case.K, device=device, dtype=torch.bool)
    for b, n in enumerate(pad_lengths(case.B, case.K)):
        padding[b, :, :, :n] = True
    if case.boolpad:
        return ~padding
    return torch.zeros(padding.shape, device=device, dtype=dtype).masked_fill(padding, float("-inf"))


def case_seed(base: int, name: str, rank: int) -> int:
    return (base * 1000003 + zlib.crc32(name.encode()) + 7919 * rank) % (2 ** 63)


def make_problem(case: Case, shard: Shard, device, *, seed: int, n_sets: int,
                 n_sample: int) -> Problem:
    """Fresh random inputs for one rank: ``n_sets`` independent copies (rotated when timing)
    and the float64 reference of ``n_sample`` sampled rows of set 0."""
    from tp_softmax import alibi_slopes

    dtype = case.torch_dtype
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    local = replace(case, H=shard.heads)
    slopes = alibi_slopes(case.H_total).to(device) if (case.alibi or case.slopes) else None
    alibi = build_alibi(case, slopes, device, dtype) if case.alibi else None
    mask = build_pad_mask(case, device, dtype) if case.padded else None
    sets = []
    for k in range(n_sets):
        scores = torch.randn(case.B, shard.heads, case.Q, case.K, device=device, dtype=dtype,
                             generator=gen)
        scores.mul_(4.0)
        st = {
            "scores": scores,
            "alibi": None if alibi is None else (alibi if k == 0 else alibi.clone()),
            "mask": None if mask is None else (mask if k == 0 else mask.clone()),
            "slopes": None if slopes is None or not case.slopes else (slopes if k == 0 else slopes.clone()),
        }
        st["alibi_local"] = None if st["alibi"] is None else st["alibi"].narrow(1, shard.head_offset, shard.heads)
        st["slopes_local"] = None if st["slopes"] is None else st["slopes"].narrow(0, shard.head_offset, shard.heads)
        sets.append(st)
    fb = floor_bytes(case.B, shard.heads, case.Q, case.K, scores.element_size(), causal=case.causal,
                     window=case.window, extras=operand_shapes(local, dtype))
    sample = sample_rows(local, shard, sets[0], n_sample, seed)
    expected = row_has_visible(case).to(torch.float32).unsqueeze(1).to(device)
    return Problem(case, shard, sets, fb, sample, expected)


def operand_shapes(case: Case, dtype: torch.dtype) -> List[Tuple[Tuple[int, ...], int]]:
    """``(shape, itemsize)`` of the mask / bias operands one rank reads (local heads)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    ops = []
    if case.padded:
        ops.append(((case.B, 1, 1, case.K), 1 if case.boolpad else itemsize))
    if case.alibi:
        ops.append(((case.B, case.H, 1, case.K), itemsize))
    if case.slopes:
        ops.append(((1, case.H, 1, 1), 4))
    return ops


def sets_for_cache(bytes_per_set: int, l2_bytes: int, limit: int = 32) -> int:
    """How many input sets to rotate so that each one is cold when it comes round again:
    enough to stream three times the L2 between two uses of a set."""
    if l2_bytes <= 0 or bytes_per_set <= 0:
        return 1
    return max(1, min(limit, math.ceil(3 * l2_bytes / bytes_per_set)))


# ----------------------------------------------------------------------------------------------
# Reference on sampled rows (float64, plain torch, independent of tp_softmax)
# ----------------------------------------------------------------------------------------------

@dataclass
class Sample:
    b: torch.Tensor
    h: torch.Tensor
    i: torch.Tensor
    ref: torch.Tensor            # [n, K] float64
    visible: torch.Tensor        # [n] bool: the row keeps at least one key


def sample_rows(case: Case, shard: Shard, st, n: int, seed: int) -> Sample:
    """``n`` random rows plus the first and last row, the first row that keeps a key and, when
    padding hides every key of some row, one such row."""
    B, H, Q = case.B, shard.heads, case.Q
    device = st["scores"].device
    gen = torch.Generator().manual_seed(seed + 1)
    b = torch.randint(0, B, (n,), generator=gen)
    h = torch.randint(0, H, (n,), generator=gen)
    i = torch.randint(0, Q, (n,), generator=gen)
    extra_b, extra_h, extra_i = [0, B - 1], [0, H - 1], [0, Q - 1]
    has = row_has_visible(case)
    for bb in range(B):
        rows = torch.nonzero(has[bb]).flatten()
        blind = torch.nonzero(~has[bb]).flatten()
        if len(rows):
            extra_b.append(bb), extra_h.append(H // 2), extra_i.append(int(rows[0]))
        if len(blind):
            extra_b.append(bb), extra_h.append(H - 1), extra_i.append(int(blind[-1]))
    b = torch.cat([b, torch.tensor(extra_b)]).to(device)
    h = torch.cat([h, torch.tensor(extra_h)]).to(device)
    i = torch.cat([i, torch.tensor(extra_i)]).to(device)
    ref = reference_rows(st, b, h, i, case=case, head_offset=shard.head_offset)
    visible = torch.isfinite(ref).all(-1) & (ref.sum(-1) > 0)
    return Sample(b, h, i, ref, visible)


def reference_rows(st, b: torch.Tensor, h: torch.Tensor, i: torch.Tensor, *, case: Case,
                   head_offset: int) -> torch.Tensor:
    """Float64 softmax of rows ``(b, h, i)`` of ``st['scores']`` under the case's flags.

    A row whose keys are all hidden is all zeros. The bias of local head ``h`` is the global
    head ``head_offset + h`` of the full-head alibi tensor / slopes."""
    scores = st["scores"]
    Q, K = scores.shape[-2], scores.shape[-1]
    x = scores[b, h, i].to(torch.float64) * case.scale                    # [n, K]
    j = torch.arange(K, device=scores.device)
    pos = (i + (K - Q)).unsqueeze(1)                                      # [n, 1]
    g = h + head_offset
    if st.get("alibi") is not None:
        a = st["alibi"]
        qi = i if a.size(2) > 1 else torch.zeros_like(i)
        bi = b if a.size(0) > 1 else torch.zeros_like(b)
        x = x + a[bi, g, qi].to(torch.float64)
    if st.get("slopes") is not None:
        s = st["slopes"].to(torch.float64)
        x = x - s[g].unsqueeze(1) * (pos - j.unsqueeze(0)).abs().to(torch.float64)
    if st.get("mask") is not None:
        m = st["mask"]
        m4 = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
        bi = b if m4.size(0) > 1 else torch.zeros_like(b)
        hi_ = h if m4.size(1) > 1 else torch.zeros_like(h)
        qi = i if m4.size(2) > 1 else torch.zeros_like(i)
        rows = m4[bi, hi_, qi].expand(-1, K)
        if rows.dtype == torch.bool:
            x = x.masked_fill(~rows, float("-inf"))
        else:
            x = x + rows.to(torch.float64)
    hidden = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if case.causal:
        hidden |= j.unsqueeze(0) > pos
    if case.window is not None:
        hidden |= j.unsqueeze(0) <= pos - case.window
    x = x.masked_fill(hidden, float("-inf"))
    top = x.max(dim=-1, keepdim=True).values
    blind = top == float("-inf")
    e = torch.exp(x - torch.where(blind, torch.zeros_like(top), top))
    total = e.sum(dim=-1, keepdim=True)
    return torch.where(blind, torch.zeros_like(e), e / torch.where(blind, torch.ones_like(total), total))


@dataclass
class Check:
    err: float                  # max |out - ref| on sampled rows that keep a key (nan if any NaN)
    masked_rows: str            # sampled rows without a key: "zeros", "NaN", "nonzero" or ""
    nan_rows: int               # rows of the whole output with a NaN
    sum_err: float              # max |row sum - expected| over the whole output (1, or 0 when blind)


def check_output(out: torch.Tensor, problem: Problem) -> Check:
    s = problem.sample
    rows = out[s.b, s.h, s.i].to(torch.float64)
    if bool(s.visible.any()):
        err = float((rows[s.visible] - s.ref[s.visible]).abs().max())
    else:
        err = 0.0
    blind = rows[~s.visible]
    if blind.numel() == 0:
        masked = ""
    elif bool(torch.isnan(blind).any()):
        masked = "NaN"
    elif bool((blind == 0).all()):
        masked = "zeros"
    else:
        masked = "nonzero"
    sums = out.sum(dim=-1, dtype=torch.float32)                         # [B, H, Q]
    nan = torch.isnan(sums)
    nan_rows = int(nan.sum())
    dev = (sums - problem.expected_sums).abs().masked_fill(nan, 0.0)
    sum_err = float(dev.max()) if dev.numel() else 0.0
    return Check(err, masked, nan_rows, sum_err)


# ----------------------------------------------------------------------------------------------
# The torch composition (eager and torch.compile contenders)
# ----------------------------------------------------------------------------------------------

def eager_softmax(scores: torch.Tensor, layer_scale: float, alibi: Optional[torch.Tensor],
                  slopes: Optional[torch.Tensor], mask: Optional[torch.Tensor], causal: bool,
                  window: Optional[int]) -> torch.Tensor:
    """The obvious PyTorch composition: scale, add alibi, add the mask (a bool mask hides keys
    with ``masked_fill``), hide causal / window keys with ``masked_fill``, softmax in float32,
    cast back. ``alibi`` is the local heads' view ``[B, H_local, 1|Q, K]``, ``slopes`` the local
    heads' slopes ``[H_local]``."""
    q_len, k_len = scores.shape[-2], scores.shape[-1]
    x = scores.to(torch.float32)
    if layer_scale != 1.0:
        x = x * layer_scale
    if alibi is not None:
        x = x + alibi
    if causal or window is not None or slopes is not None:
        pos = torch.arange(q_len, device=scores.device).unsqueeze(1) + (k_len - q_len)
        rel = torch.arange(k_len, device=scores.device).unsqueeze(0) - pos
        if slopes is not None:
            x = x - slopes.view(1, -1, 1, 1) * rel.abs().to(torch.float32)
    if mask is not None:
        x = x.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else x + mask
    if causal or window is not None:
        hidden = torch.zeros_like(rel, dtype=torch.bool)
        if causal:
            hidden = hidden | (rel > 0)
        if window is not None:
            hidden = hidden | (rel <= -window)
        x = x.masked_fill(hidden, float("-inf"))
    return torch.softmax(x, dim=-1).to(scores.dtype)


# ----------------------------------------------------------------------------------------------
# Timers
# ----------------------------------------------------------------------------------------------

@dataclass
class Timing:
    ms: float                   # median over reps
    reps: int
    host_us: float              # host time to issue one call (launch overhead), when known
    spread: float = 0.0         # (p80 - p20) / median


def _summary(times_ms: List[float], host_us: float) -> Timing:
    times = sorted(times_ms)
    med = statistics.median(times)
    lo = times[int(0.2 * (len(times) - 1))]
    hi = times[int(0.8 * (len(times) - 1))]
    return Timing(med, len(times), host_us, (hi - lo) / med if med > 0 else 0.0)


class CpuTimer:
    """Wall-clock timer for CPU tensors (smoke runs)."""

    name = "cpu"

    def __init__(self, warmup: int = 1, reps: int = 3):
        self.warmup, self.reps = warmup, reps

    def time(self, fn: Callable[[int], object], n_sets: int) -> Timing:
        for k in range(self.warmup):
            fn(k % n_sets)
        times = []
        for k in range(self.reps):
            t0 = time.perf_counter()
            fn(k % n_sets)
            times.append((time.perf_counter() - t0) * 1e3)
        return _summary(times, statistics.median(times) * 1e3)


class CudaEventTimer:
    """CUDA events around each repetition, median reported.

    Repetitions run back to back with the input sets rotated. Before each chunk of
    repetitions the stream is held by a sleep kernel long enough for the host to queue the
    whole chunk, so that the events time the device work and not the host's launch overhead
    (reported apart as ``host_us``)."""

    name = "cuda-events"

    def __init__(self, device, warmup_ms: float = 25.0, rep_ms: float = 200.0,
                 min_reps: int = 10, max_reps: int = 2000, chunk: int = 100):
        self.device = device
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.min_reps, self.max_reps, self.chunk = min_reps, max_reps, chunk
        self._cycles_per_ms = self._calibrate_sleep()

    def _calibrate_sleep(self) -> float:
        sleep = getattr(torch.cuda, "_sleep", None)
        if sleep is None:
            return 0.0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 20_000_000
        sleep(1000)
        start.record()
        sleep(cycles)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        return cycles / ms if ms > 0 else 0.0

    def _hold_stream(self, ms: float) -> None:
        if self._cycles_per_ms > 0 and ms > 0:
            torch.cuda._sleep(int(min(ms, 100.0) * self._cycles_per_ms))

    def time(self, fn: Callable[[int], object], n_sets: int) -> Timing:
        Event = torch.cuda.Event
        torch.cuda.synchronize(self.device)
        # Estimate the device time and host time of one call.
        t0 = time.perf_counter()
        start, end = Event(enable_timing=True), Event(enable_timing=True)
        start.record()
        for k in range(3):
            fn(k % n_sets)
        end.record()
        host_us = (time.perf_counter() - t0) / 3 * 1e6
        end.synchronize()
        est = max(start.elapsed_time(end) / 3, 1e-3)
        for k in range(max(2, int(self.warmup_ms / est))):
            fn(k % n_sets)
        reps = max(self.min_reps, min(self.max_reps, int(self.rep_ms / est)))
        starts = [Event(enable_timing=True) for _ in range(reps)]
        ends = [Event(enable_timing=True) for _ in range(reps)]
        torch.cuda.synchronize(self.device)
        for c0 in range(0, reps, self.chunk):
            c1 = min(reps, c0 + self.chunk)
            self._hold_stream(1.5 * (c1 - c0) * host_us / 1e3)
            for k in range(c0, c1):
                starts[k].record()
                fn(k % n_sets)
                ends[k].record()
        torch.cuda.synchronize(self.device)
        return _summary([s.elapsed_time(e) for s, e in zip(starts, ends)], host_us)


class TritonTimer:
    """``triton.testing.do_bench`` (median; it clears the L2 before every repetition)."""

    name = "triton-do_bench"

    def __init__(self, warmup_ms: float = 25.0, rep_ms: float = 200.0):
        from triton.testing import do_bench

        self._do_bench = do_bench
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms

    def time(self, fn: Callable[[int], object], n_sets: int) -> Timing:
        counter = [0]

        def call():
            fn(counter[0] % n_sets)
            counter[0] += 1

        ms = self._do_bench(call, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median")
        return Timing(float(ms), counter[0], float("nan"))


def copy_ms(timer, device, nbytes: int, sets: int = 2) -> float:
    """Median ms of a device-to-device copy of ``nbytes`` (rounded down to float32 elements, at
    least one), rotating over ``sets`` source / destination pairs."""
    n = max(1, nbytes // 4)
    src = [torch.randn(n, device=device) for _ in range(sets)]
    dst = [torch.empty_like(x) for x in src]
    return timer.time(lambda k: dst[k].copy_(src[k]), sets).ms


def copy_bandwidth(timer, device, nbytes: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = nbytes // 4
    return 2 * n * 4 / (copy_ms(timer, device, nbytes) * 1e-3)


# ----------------------------------------------------------------------------------------------
# DeepSpeed's inference softmax kernel
# ----------------------------------------------------------------------------------------------

DEEPSPEED_MAX_K = 32768         # launch_attn_softmax_v2 throws above this key length
INT32_MAX = 2 ** 31 - 1


def deepspeed_refusal(case: Case, heads: int) -> Optional[str]:
    """Why DeepSpeed's kernel cannot be called on this problem (None when it can)."""
    if case.slopes:
        return "not supported: alibi_slopes (it reads a bias tensor only)"
    if case.boolpad:
        return "not supported: bool masks (it reads an additive mask only)"
    if case.K > DEEPSPEED_MAX_K:
        return f"refuses (K > {DEEPSPEED_MAX_K})"
    if case.B * heads * case.Q * case.K - case.K > INT32_MAX:
        return "not run: 2^31 elements or more overflow its 32-bit row offsets"
    return None


def deepspeed_arch_list(arch: str, capabilities) -> Optional[str]:
    """A ``TORCH_CUDA_ARCH_LIST`` that DeepSpeed 0.19.8 can parse, or None when ``arch`` already is
    one: it reads entries as ``MAJOR.MINOR[+PTX]`` only, and fails on e.g. ``9.0a``. The bench
    builds and loads DeepSpeed's kernel with it (``DeepSpeedBuild``)."""
    entries = [e.strip() for e in arch.replace(" ", ";").split(";") if e.strip()]
    if all(re.fullmatch(r"\d+\.\d+(\+PTX)?", e) for e in entries):
        return None
    return ";".join(f"{a}.{b}" for a, b in sorted(set(capabilities)))


def deepspeed_function(module, dtype: torch.dtype):
    name = {torch.float16: "softmax_fp16", torch.bfloat16: "softmax_bf16",
            torch.float32: "softmax_fp32"}[dtype]
    fn = getattr(module, name, None)
    if fn is None:
        raise AttributeError(f"this build of the DeepSpeed inference module has no {name}")
    return fn


def deepspeed_call(fn, case: Case, shard: Shard, st, none: torch.Tensor):
    """``ds_softmax`` with DeepSpeed's conventions: in place on contiguous scores
    ``[B, H_local, Q, K]``; the additive mask 2-D ``[B, K]`` (BERT layout, mask stride 1) in
    the scores' dtype; alibi ``[B * H_total, 1, K]`` of all heads in the scores' dtype read at
    ``head_offset`` with ``mp_size``; a 1-element tensor means none; causal is ``triangular``,
    a window is ``local_attention`` + ``window_size``."""
    mask = none if st["mask"] is None else st["mask"].view(case.B, case.K)
    alibi = none if st["alibi"] is None else st["alibi"].view(case.B * case.H_total, 1, case.K)
    window = case.window
    return fn(st["scores"], mask, alibi, case.causal, False, window is not None,
              window if window is not None else 1, False, float(case.scale),
              shard.head_offset, case.mp)


DEEPSPEED_BUILD_SCRIPT = r"""
import sys, time
t0 = time.time()
try:
    import deepspeed
    from deepspeed.ops.op_builder import InferenceBuilder
except Exception as exc:
    print(f"DS-BENCH-FAIL: cannot import deepspeed: {type(exc).__name__}: {exc}", flush=True)
    sys.exit(2)
builder = InferenceBuilder()
if not builder.is_compatible(verbose=True):
    print("DS-BENCH-FAIL: InferenceBuilder is not compatible with this machine", flush=True)
    sys.exit(3)
try:
    module = builder.load(verbose=True)
except Exception as exc:
    print(f"DS-BENCH-FAIL: build failed: {type(exc).__name__}: {str(exc)[-300:]}", flush=True)
    sys.exit(4)
print(f"DS-BENCH-OK deepspeed {deepspeed.__version__} in {time.time() - t0:.0f} s", flush=True)
"""
