"""tp_softmax.deepspeed.SoftmaxOp against DeepSpeed's semantics and against the contract.

* ``ds_kernel`` below is a small float64 model of what DeepSpeed's ``attn_softmax_v2`` kernel
  (``softmax_fp16/bf16/fp32``) computes, written from its documented behaviour: hidden keys and
  unused register slots are -10000, ``+1e-6`` in the denominator, top-left ``triangular``, the
  window start ``i + K`` for ``Q < K`` and its 4-key granularity, alibi row
  ``b * H_local * mp_size + head_offset + h``, mask rows by ``mask.size(2)``. Where DeepSpeed
  is right, SoftmaxOp must agree with it.
* ``contract`` is SPEC.md section 1 in float64. For every documented divergence (SPEC.md 3)
  SoftmaxOp must match the contract, and the DeepSpeed model must not.
* With DeepSpeed installed: :func:`tp_softmax.deepspeed.patch` makes DeepSpeed's own
  ``BloomSelfAttention`` construct SoftmaxOp, and that attention, run on CPU, equals Hugging
  Face's ``BloomAttention``; DeepSpeed's real ``softmax_fallback`` shows its documented defects.
"""

import math
import os
import tempfile
import types
import warnings

import pytest
import torch

from tp_softmax import alibi_slopes, head_partition
from tp_softmax.deepspeed import SoftmaxOp, is_patched, patch, patched, unpatch

NEG = -10000.0
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # probabilities <= 1
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
KEY_LENGTHS = [1, 3, 113, 1025, 4097, 8192]


def config(heads, mp_size=1, dtype=torch.float16):
    return types.SimpleNamespace(heads=heads, mp_size=mp_size, dtype=dtype)


def call(op, scores, mask=None, alibi=None, triangular=False, local_attention=False, window_size=1,
         layer_scale=1.0, head_offset=0):
    """DeepSpeed's positional call; None becomes DeepSpeed's ``torch.empty(1)``."""
    empty = torch.empty(1, dtype=scores.dtype)
    return op(scores, empty if mask is None else mask, empty if alibi is None else alibi, triangular,
              False, local_attention, window_size, False, layer_scale, head_offset)


# ---------------------------------------------------------------- the two float64 models


def ds_kernel(scores, mask, alibi, triangular, local_attention, window_size, layer_scale, head_offset, mp_size):
    """What DeepSpeed's attn_softmax_v2 returns, in float64 (``mask`` / ``alibi``: None or as
    DeepSpeed reads them, contiguous)."""
    b_, h_, q_, k_ = scores.shape
    if k_ > 32768:
        raise RuntimeError("Unsupport Seq_Length!")
    schedule = max(32, 1 << (-(-k_ // 4) - 1).bit_length())  # next power of two of ceil(K / 4)
    if schedule // min(schedule, 256) > 8:
        raise NotImplementedError("undefined: register arrays of 8 entries indexed past their end")
    unused_slots = 4 * schedule - k_
    x = scores.double() * layer_scale
    if alibi is not None:
        rows = alibi.reshape(-1, k_).double()
        idx = (torch.arange(b_)[:, None] * h_ * mp_size + head_offset + torch.arange(h_)[None, :])
        if idx.max() >= rows.size(0):
            raise IndexError("alibi read out of bounds")
        x = x + rows[idx][:, :, None, :]
    if mask is not None:
        stride = 1 if mask.dim() == 2 else mask.size(2)
        rows = mask.reshape(-1, k_).double()
        row_id = (torch.arange(b_)[:, None, None] * h_ + torch.arange(h_)[None, :, None]) * q_ \
            + torch.arange(q_)[None, None, :]
        idx = torch.arange(b_)[:, None, None] * stride + row_id % stride
        if idx.max() >= rows.size(0):
            raise IndexError("mask read out of bounds")
        x = x + rows[idx]
    i = torch.arange(q_)[:, None]
    j = torch.arange(k_)[None, :]
    real = i + (0 if q_ == k_ else k_)
    visible = torch.ones(q_, k_, dtype=torch.bool)
    if triangular:
        visible &= j <= i
    if local_attention:
        w4 = torch.where((real >> 2) > (window_size >> 2), (real >> 2) - (window_size >> 2), 0)
        ws = torch.where(real >= window_size, real - window_size, -1)
        visible &= ((j >> 2) >= w4) & (j > ws)
    x = torch.where(visible, x, torch.full_like(x, NEG))
    row_max = x.amax(-1, keepdim=True).clamp_min(NEG)
    e = (x - row_max).exp()
    total = e.sum(-1, keepdim=True) + unused_slots * torch.exp(NEG - row_max) + 1e-6
    return e / total


def contract(scores, *, layer_scale=1.0, bias=None, mask=None, causal=False, window=None):
    """SPEC.md section 1 in float64: ``bias`` / ``mask`` 4-D broadcastable over the local heads."""
    q_, k_ = scores.shape[-2:]
    x = scores.double() * layer_scale
    if bias is not None:
        x = x + bias.double()
    if mask is not None:
        x = x.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else x + mask.double()
    p = torch.arange(q_)[:, None] + (k_ - q_)
    j = torch.arange(k_)[None, :]
    hidden = torch.zeros(q_, k_, dtype=torch.bool)
    if causal:
        hidden |= j > p
    if window is not None:
        hidden |= j <= p - window
    x = x.masked_fill(hidden, -math.inf)
    row_max = x.amax(-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    e = (x - row_max).exp()
    total = e.sum(-1, keepdim=True)
    return torch.where(total > 0, e / total.clamp_min(1e-300), torch.zeros_like(e))


def bloom_alibi(batch, heads, k_len, dtype):
    """BLOOM's alibi of all heads, ``[B * H_total, 1, K]``, with left padding per row."""
    mask = torch.ones(batch, k_len)
    for b in range(batch):
        mask[b, : min(b, k_len - 1)] = 0
    pos = ((mask.cumsum(-1) - 1) * mask)[:, None, :]
    return (alibi_slopes(heads)[None, :, None] * pos).reshape(batch * heads, 1, k_len).to(dtype), mask


def local_bias(alibi, batch, offset, count):
    heads = alibi.size(0) // batch
    return alibi.view(batch, heads, 1, -1)[:, offset:offset + count]


# ---------------------------------------------------------------- where DeepSpeed is right


RIGHT_CASES = [
    # name, B, H_total, mp_size, rank, Q, K, triangular, mask kind, alibi, window
    ("prefill-causal-alibi-pad", 2, 6, 2, 1, 37, 37, True, "2d", True, None),
    ("prefill-mp1-no-mask", 1, 4, 1, 0, 9, 9, True, None, True, None),
    ("decode-alibi-pad", 3, 8, 2, 1, 1, 61, False, "2d", True, None),
    ("decode-mp4-rank3", 2, 8, 4, 3, 1, 40, False, "2d", True, None),
    ("mask-4d-per-query", 2, 4, 1, 0, 17, 17, True, "4d-q", False, None),
    ("mask-4d-one-row", 2, 4, 2, 0, 5, 23, False, "4d-1", True, None),
    ("bert-style-no-causal", 4, 2, 1, 0, 12, 12, False, "2d", False, None),
    ("window-8-prefill", 1, 2, 1, 0, 40, 40, True, None, False, 8),
]


def live_rows(scores, mask, triangular, window):
    """``[B, 1, Q]``: rows with at least one visible key that the mask does not hide (-10000).
    The others are the fully-masked-row divergence, tested on its own."""
    batch, _, q_len, k_len = scores.shape
    if mask is None:
        keep = torch.ones(batch, 1, 1, k_len, dtype=torch.bool)
    else:
        keep = (mask[:, None, None, :] if mask.dim() == 2 else mask).double() > NEG / 2
    p = torch.arange(q_len)[:, None] + (k_len - q_len)
    j = torch.arange(k_len)[None, :]
    visible = torch.ones(q_len, k_len, dtype=torch.bool)
    if triangular:
        visible &= j <= p
    if window is not None:
        visible &= j > p - window
    return (keep & visible).any(-1)


def make_case(batch, heads, mp, rank, q_len, k_len, mask_kind, use_alibi, dtype, gen):
    offset, count = head_partition(heads, mp, rank)
    scores = (torch.randn(batch, count, q_len, k_len, generator=gen) * 3).to(dtype)
    alibi, pad = bloom_alibi(batch, heads, k_len, dtype) if use_alibi else (None, None)
    if pad is None:
        pad = torch.ones(batch, k_len)
        pad[0, : k_len // 3] = 0
    additive = ((1 - pad) * NEG).to(dtype)  # DeepSpeed's (1 - mask) * -10000
    mask = {None: None, "2d": additive, "4d-1": additive[:, None, None, :],
            "4d-q": (additive[:, None, None, :] + torch.triu(torch.full((q_len, k_len), NEG), 1)).to(dtype)}[mask_kind]
    return scores, mask, alibi, offset, count


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", RIGHT_CASES, ids=[c[0] for c in RIGHT_CASES])
def test_equals_deepspeed_where_deepspeed_is_right(case, dtype):
    _, batch, heads, mp, rank, q_len, k_len, tri, mask_kind, use_alibi, window = case
    gen = torch.Generator().manual_seed(RIGHT_CASES.index(case))
    scores, mask, alibi, offset, count = make_case(batch, heads, mp, rank, q_len, k_len, mask_kind,
                                                   use_alibi, dtype, gen)
    expected = ds_kernel(scores, mask, alibi, tri, window is not None, window or 1, 0.5, offset, mp)
    op = SoftmaxOp(config(heads, mp, dtype), rank=rank, world_size=mp)
    out = call(op, scores.clone(), mask, alibi, tri, window is not None, window or 1, 0.5, offset)
    assert out.dtype == dtype and out.shape == scores.shape
    live = live_rows(scores, mask, tri, window).expand(batch, out.size(1), q_len)
    assert live.float().mean() > 0.8
    torch.testing.assert_close(out.double()[live], expected[live], atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("k_len", KEY_LENGTHS)
def test_equals_deepspeed_over_key_lengths(k_len):
    gen = torch.Generator().manual_seed(k_len)
    scores, mask, alibi, offset, _ = make_case(2, 4, 2, 1, 1 if k_len > 1025 else k_len, k_len, "2d", True,
                                               torch.float16, gen)
    tri = scores.size(2) > 1
    op = SoftmaxOp(config(4, 2, torch.int8), rank=1, world_size=2)  # int8 computes in float16
    out = call(op, scores.clone(), mask, alibi, tri, layer_scale=0.25, head_offset=offset)
    expected = ds_kernel(scores, mask, alibi, tri, False, 1, 0.25, offset, 2)
    live = live_rows(scores, mask, tri, None).expand(2, out.size(1), scores.size(2))
    assert live.float().mean() > 0.8
    torch.testing.assert_close(out.double()[live], expected[live], atol=TOL[torch.float16], rtol=0)


def test_deepspeed_input_conventions():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float32)
    op = SoftmaxOp(config(3, 1, torch.float32))
    plain = contract(scores, causal=True)
    for none in (None, torch.empty(0), torch.empty(1), torch.zeros(1)):  # DeepSpeed's "no tensor"
        out = op(scores.clone(), none, none, True, False, False, 1, False, 1.0, 0)
        torch.testing.assert_close(out.double(), plain, atol=TOL[torch.float32], rtol=0)
    # Like DeepSpeed's kernel: a contiguous input is overwritten with the result and returned.
    buf = scores.clone()
    assert call(op, buf, triangular=True) is buf
    # bool masks: True = attend (an extension; DeepSpeed's masks are additive)
    keep = torch.tensor([[True, False, True, True], [True, True, True, False]])
    out = call(op, scores.clone(), mask=keep)
    torch.testing.assert_close(out.double(), contract(scores, mask=keep[:, None, None, :]), atol=2e-6, rtol=0)
    with pytest.raises(TypeError, match="computes in"):
        call(op, scores.half())
    with pytest.raises(TypeError, match="computes in torch.float16"):
        call(SoftmaxOp(config(3, 1, torch.int8)), scores)
    with pytest.raises(ValueError, match="owns 3"):
        call(op, scores[:, :2])
    with pytest.raises(ValueError, match="4-D"):
        call(op, scores[0])
    with pytest.raises(ValueError, match="all 3 heads"):
        call(op, scores.clone(), alibi=torch.zeros(2 * 2, 1, 4))  # a local-heads alibi
    with pytest.raises(ValueError, match="mp_size is 2"):
        call(SoftmaxOp(config(4, 2)), scores.half())  # no group, no rank: refuses to guess
    with pytest.raises(ValueError, match="2 ranks but config.mp_size is 1"):
        SoftmaxOp(config(4, 1), rank=0, world_size=2)


# ---------------------------------------------------------------- documented divergences


@pytest.mark.parametrize("k_len", [8193, 16384, 32769])
def test_divergence_long_keys(k_len):
    """DeepSpeed: wrong for 8192 < K <= 32768, refuses K > 32768. tp_softmax: the contract."""
    gen = torch.Generator().manual_seed(k_len)
    scores = (torch.randn(1, 2, 2, k_len, generator=gen) * 4).half()
    alibi, pad = bloom_alibi(1, 4, k_len, torch.float16)
    op = SoftmaxOp(config(4, 2), rank=1, world_size=2)
    with pytest.raises((NotImplementedError, RuntimeError)):
        ds_kernel(scores, None, alibi, False, False, 1, 1.0, 2, 2)
    out = call(op, scores.clone(), alibi=alibi, triangular=True, head_offset=2)
    expected = contract(scores, bias=local_bias(alibi, 1, 2, 2), causal=True)
    torch.testing.assert_close(out.double(), expected, atol=TOL[torch.float16], rtol=0)
    assert (out[0, :, 0, -1] == 0).all()  # bottom-right causal: the first row does not see the last key


@pytest.mark.parametrize("q_len,k_len,window", [(1, 50, 8), (3, 50, 8), (20, 20, 6), (33, 33, 7)])
def test_divergence_windows(q_len, k_len, window):
    """DeepSpeed: window start ``i + K`` when Q < K; keys dropped when w % 4 is 2 or 3."""
    gen = torch.Generator().manual_seed(window * 100 + q_len)
    scores = torch.randn(2, 2, q_len, k_len, generator=gen)
    op = SoftmaxOp(config(2, 1, torch.float32))
    out = call(op, scores.clone(), triangular=True, local_attention=True, window_size=window)
    expected = contract(scores, causal=True, window=window)
    torch.testing.assert_close(out.double(), expected, atol=TOL[torch.float32], rtol=0)
    assert ((out > 0).sum(-1) <= window).all()
    ds = ds_kernel(scores, None, None, q_len == k_len, True, window, 1.0, 0, 1)
    assert (ds - expected).abs().max() > 0.05


@pytest.mark.parametrize("q_len,k_len", [(2, 9), (5, 64), (16, 17)])
def test_divergence_causal_with_kv_cache(q_len, k_len):
    """DeepSpeed's ``triangular`` is top-left: with a cache (1 < Q < K) rows lose their keys."""
    gen = torch.Generator().manual_seed(k_len)
    scores = torch.randn(2, 3, q_len, k_len, generator=gen).bfloat16()
    alibi, _ = bloom_alibi(2, 3, k_len, torch.bfloat16)
    op = SoftmaxOp(config(3, 1, torch.bfloat16))
    out = call(op, scores.clone(), alibi=alibi, triangular=True)
    expected = contract(scores, bias=local_bias(alibi, 2, 0, 3), causal=True)
    torch.testing.assert_close(out.double(), expected, atol=TOL[torch.bfloat16], rtol=0)
    assert (out[..., -1, :] > 0).all()  # the last query row sees every key
    ds = ds_kernel(scores, None, alibi, True, False, 1, 1.0, 0, 1)
    assert (ds - expected).abs().max() > 0.05


def ds_fallback(scores, mask, alibi, triangular, layer_scale, head_offset, mp_size):
    """DeepSpeed's documented ``softmax_fallback`` (Q == K): alibi sliced along B * H by
    ``H_local // mp_size`` rows, top-left triangular, ``-inf`` fill, plain softmax."""
    x = scores.double() * layer_scale
    local = scores.size(1) // mp_size
    if alibi is not None:
        x = x + alibi[head_offset:head_offset + local].double()
    if mask is not None:
        x = x + (mask[:, None, None, :] if mask.dim() == 2 else mask).double()
    if triangular:
        x = x.masked_fill(~torch.ones(x.shape, dtype=torch.bool).tril(), -math.inf)
    return torch.softmax(x, dim=-1)


def test_divergence_fallback_alibi_slicing():
    """DeepSpeed's fallback slices alibi rows ``[head_offset, head_offset + H_local / mp)`` of
    the B * H dim: one head's row for everybody. tp_softmax reads each batch entry's heads."""
    batch, heads, mp, rank, length = 2, 4, 2, 1, 11
    offset, count = head_partition(heads, mp, rank)
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(batch, count, length, length, generator=gen)
    alibi, pad = bloom_alibi(batch, heads, length, torch.float32)
    mask = (1 - pad) * NEG
    op = SoftmaxOp(config(heads, mp, torch.float32), rank=rank, world_size=mp)
    out = call(op, scores.clone(), mask=mask, alibi=alibi, triangular=True, head_offset=offset)
    expected = contract(scores, bias=local_bias(alibi, batch, offset, count), mask=mask[:, None, None, :],
                        causal=True)
    torch.testing.assert_close(out.double(), expected, atol=TOL[torch.float32], rtol=0)
    wrong = ds_fallback(scores, mask, alibi, True, 1.0, offset, mp)
    assert (wrong - expected).abs().max() > 0.01
    deepspeed_softmax = _deepspeed_softmax_module()
    if deepspeed_softmax is not None:  # the model above is what DeepSpeed's own code does
        real = deepspeed_softmax.SoftmaxOp.softmax_fallback(scores.clone(), mask, alibi, True, False, False, 1,
                                                            False, 1.0, offset, mp)
        torch.testing.assert_close(real.double(), wrong, atol=2e-6, rtol=0)
        with pytest.raises(RuntimeError):  # 8 heads on 2 ranks: 2 alibi rows against 4 heads
            deepspeed_softmax.SoftmaxOp.softmax_fallback(torch.randn(batch, 4, length, length), mask,
                                                         bloom_alibi(batch, 8, length, torch.float32)[0], True,
                                                         False, False, 1, False, 1.0, 4, 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_divergence_fully_masked_rows(dtype):
    """A row whose keys are all masked (-inf, or False in a bool mask) is zeros, never uniform
    over hidden keys (DeepSpeed's kernel: -10000 fill) nor NaN (DeepSpeed's fallback)."""
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(2, 2, 6, 6, generator=gen).to(dtype)
    mask = torch.zeros(2, 6, dtype=dtype)
    mask[1] = -math.inf  # batch entry 1: nothing to attend to
    op = SoftmaxOp(config(2, 1, dtype))
    out = call(op, scores.clone(), mask=mask, triangular=True)
    expected = contract(scores, mask=mask[:, None, None, :], causal=True)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    torch.testing.assert_close(out.double(), expected, atol=TOL[dtype], rtol=0)
    ds = ds_kernel(scores, mask, None, True, False, 1, 1.0, 0, 1)
    assert (ds[1, :, :-1] > 0).any(-1).all()  # weight on hidden (future) keys
    bool_out = call(op, scores.clone(), mask=torch.tensor([[True] * 6, [False] * 6]), triangular=True)
    torch.testing.assert_close(bool_out, out, atol=0, rtol=0)
    assert torch.isnan(ds_fallback(scores, mask, None, True, 1.0, 0, 1)[1]).all()


def test_divergence_mask_broadcast_over_batch():
    """DeepSpeed reads a ``[1, 1, Q, K]`` mask out of bounds for batch entries > 0."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 2, 5, 5, generator=gen).half()
    mask = torch.triu(torch.full((5, 5), NEG), 1).half()[None, None]
    mask[..., 0] = NEG
    op = SoftmaxOp(config(2, 1))
    with pytest.raises(IndexError):
        ds_kernel(scores, mask, None, False, False, 1, 1.0, 0, 1)
    out = call(op, scores.clone(), mask=mask)
    torch.testing.assert_close(out.double(), contract(scores, mask=mask), atol=TOL[torch.float16], rtol=0)
    assert mask.stride(0) == 25 and out.shape == scores.shape


def test_divergence_head_offset_from_group_not_global_rank():
    """DeepSpeed passes ``global rank * H_local``; SoftmaxOp takes its rank in the TP group."""
    batch, heads, length = 2, 6, 7
    alibi, _ = bloom_alibi(batch, heads, length, torch.float32)
    op = SoftmaxOp(config(heads, 2, torch.float32), rank=1, world_size=2)  # global rank 3 of 4, TP rank 1
    scores = torch.randn(batch, 3, length, length)
    with pytest.warns(RuntimeWarning, match="head_offset=9 from the caller ignored; the tensor-parallel group gives 3"):
        out = call(op, scores.clone(), alibi=alibi, triangular=True, head_offset=3 * 3)
    expected = contract(scores, bias=local_bias(alibi, batch, 3, 3), causal=True)
    torch.testing.assert_close(out.double(), expected, atol=TOL[torch.float32], rtol=0)
    with pytest.raises(IndexError):  # DeepSpeed's alibi row b * 6 + 9 + h runs past B * H_total
        ds_kernel(scores, None, alibi, True, False, 1, 1.0, 9, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(op, scores.clone(), alibi=alibi, head_offset=9)  # warned once per op


def _group_worker(rank, world, init_file, out_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Global ranks 0 | 1, 2: rank 0 alone (say, a pipeline stage), ranks 1 and 2 one TP group.
        groups = [torch.distributed.new_group([0]), torch.distributed.new_group([1, 2])]
        group = groups[0] if rank == 0 else groups[1]
        heads, batch, length = 5, 2, 6  # 5 heads: 3 + 2 on the TP group
        op = SoftmaxOp(config(heads, torch.distributed.get_world_size(group), torch.float32), group)
        alibi, _ = bloom_alibi(batch, heads, length, torch.float32)
        gen = torch.Generator().manual_seed(rank)
        scores = torch.randn(batch, op.num_attention_heads_per_partition, length, length, generator=gen)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out = call(op, scores.clone(), alibi=alibi, triangular=True, head_offset=rank * 3)
        expected = contract(scores, bias=local_bias(alibi, batch, op.head_offset, op.num_attention_heads_per_partition),
                            causal=True)
        err = (out.double() - expected).abs().max().item()
        torch.save({"offset": op.head_offset, "count": op.num_attention_heads_per_partition, "err": err},
                   f"{out_file}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(120)
def test_head_offset_from_a_real_tensor_parallel_group():
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out")
        torch.multiprocessing.spawn(_group_worker, args=(3, init_file, out_file), nprocs=3, join=True)
        results = [torch.load(f"{out_file}.{r}") for r in range(3)]
    assert [(r["offset"], r["count"]) for r in results] == [(0, 5), (0, 3), (3, 2)]
    assert max(r["err"] for r in results) < 2e-6


# ---------------------------------------------------------------- with DeepSpeed installed


def _deepspeed_softmax_module():
    try:
        from deepspeed.ops.transformer.inference.op_binding import softmax
    except Exception:  # not installed, or an install that cannot import on this machine
        return None
    return softmax


@pytest.fixture
def ds_attention(monkeypatch):
    """DeepSpeed's ds_attention module with its compiled-op loader stubbed out (CPU)."""
    pytest.importorskip("deepspeed")
    from deepspeed.ops.transformer.inference import ds_attention as module
    from deepspeed.ops.transformer.inference.op_binding.base import BaseOp

    # No compiled inference ops on CPU: an empty module makes every op take its PyTorch path.
    monkeypatch.setattr(BaseOp, "inference_module", types.SimpleNamespace())
    monkeypatch.setattr(module.DeepSpeedSelfAttention, "num_layers", 0)
    yield module
    unpatch()


def ds_config(heads, hidden, mp_size=1, dtype=torch.float32):
    from deepspeed.ops.transformer.inference.config import DeepSpeedInferenceConfig

    return DeepSpeedInferenceConfig(hidden_size=hidden, heads=heads, dtype=dtype, mp_size=mp_size,
                                    bigscience_bloom=True, triangular_masking=True)


def test_patch_makes_deepspeed_construct_ours(ds_attention):
    original_op, original_init = ds_attention.SoftmaxOp, ds_attention.BloomSelfAttention.__init__
    assert not is_patched()
    patch()
    patch()  # twice: still one layer of patching
    assert is_patched() and ds_attention.SoftmaxOp is SoftmaxOp
    attn = ds_attention.BloomSelfAttention(ds_config(6, 48))
    assert type(attn.softmax_func) is SoftmaxOp
    assert (attn.softmax_func.head_offset, attn.softmax_func.num_attention_heads_per_partition) == (0, 6)
    unpatch()
    assert not is_patched()
    assert ds_attention.SoftmaxOp is original_op and ds_attention.BloomSelfAttention.__init__ is original_init
    assert type(ds_attention.BloomSelfAttention(ds_config(6, 48)).softmax_func) is original_op
    with patched():
        assert type(ds_attention.BloomSelfAttention(ds_config(6, 48)).softmax_func) is SoftmaxOp
    assert not is_patched()


def hf_attention_and_context(heads, hidden, seed=0):
    transformers = pytest.importorskip("transformers")
    from transformers.models.bloom import modeling_bloom

    torch.manual_seed(seed)
    cfg = transformers.BloomConfig(hidden_size=hidden, n_head=heads, n_layer=1, vocab_size=16, initializer_range=0.1)
    attn = transformers.BloomForCausalLM(cfg).eval().transformer.h[0].self_attention

    def context(x, mask):
        """Hugging Face's attention context (the input of ``dense``) ``[B, L, hidden]``."""
        length = x.size(1)
        pos = torch.arange(length)
        allowed = (pos[None, :] <= pos[:, None])[None] & mask.bool()[:, None, :]
        additive = torch.where(allowed, 0.0, torch.finfo(x.dtype).min)[:, None]
        seen = []
        hook = attn.dense.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
        alibi = modeling_bloom.build_alibi_tensor(mask, heads, x.dtype)
        try:
            attn(x, torch.zeros_like(x), alibi=alibi, attention_mask=additive)
        except RuntimeError:  # older transformers (4.4x): a bool mask, True = hidden
            seen.clear()
            attn(x, torch.zeros_like(x), alibi=alibi, attention_mask=additive < 0)
        finally:
            hook.remove()
        return seen[0]

    return attn, context, modeling_bloom.build_alibi_tensor


@pytest.mark.parametrize("mp_size,rank", [(1, 0), (2, 1)])
def test_patched_deepspeed_bloom_attention_equals_hf(ds_attention, mp_size, rank):
    """DeepSpeed's own BloomSelfAttention.compute_attention with SoftmaxOp patched in: prefill
    with left padding, one decode step, then a 2-token chunk with the cache (where DeepSpeed's
    top-left triangular would be wrong), against Hugging Face's BloomAttention."""
    heads, hidden, batch, length = 6, 48, 3, 9
    hf, hf_context, build_alibi = hf_attention_and_context(heads, hidden)
    offset, count = head_partition(heads, mp_size, rank)
    head_dim = hidden // heads
    patch()
    attn = ds_attention.BloomSelfAttention(ds_config(heads, hidden, mp_size))
    op = attn.softmax_func
    assert isinstance(op, SoftmaxOp)
    if mp_size > 1:
        op.bind(rank=rank, world_size=mp_size)

    x = torch.randn(batch, length, hidden)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        mask[b, :b] = 0
    with torch.no_grad():
        expected = hf_context(x, mask)[..., offset * head_dim:(offset + count) * head_dim]
        qkv = hf.query_key_value(x).view(batch, length, heads, 3 * head_dim)[:, :, offset:offset + count]
        qkv = qkv.reshape(batch, length, -1)

        def run(lo, hi, past):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # DeepSpeed passes head_offset 0 here
                ctx, k, v = attn.compute_attention(qkv[:, lo:hi], mask[:, :hi], past,
                                                   build_alibi(mask[:, :hi], heads, x.dtype), hi - lo > 1, None, None)
            return ctx, (k, v)

        rows = mask.bool()
        ctx, past = run(0, 6, None)                     # prefill (Q == K == 6)
        torch.testing.assert_close(ctx[rows[:, :6]], expected[:, :6][rows[:, :6]], atol=2e-6, rtol=0)
        ctx, past = run(6, 7, past)                     # decode (Q == 1)
        torch.testing.assert_close(ctx, expected[:, 6:7], atol=2e-6, rtol=0)
        ctx, past = run(7, 9, past)                     # chunk with the cache (Q == 2, K == 9)
        torch.testing.assert_close(ctx, expected[:, 7:9], atol=2e-6, rtol=0)
    assert past[0].shape == (batch * count, head_dim, length)


# ---------------------------------------------------------------- DeepSpeed's own init_inference


def _ds_bloom_skip_reason(gpus):
    try:
        import deepspeed  # noqa: F401
        import transformers  # noqa: F401
    except Exception as exc:
        return f"needs deepspeed and transformers ({exc})"
    if tuple(int(v) for v in transformers.__version__.split(".")[:2]) > (4, 43):
        return (f"DeepSpeed's BLOOM kernel injection refuses transformers {transformers.__version__} "
                "(it needs <= 4.43.4)")
    if gpus and torch.cuda.device_count() < gpus:
        return f"needs {gpus} CUDA GPUs"
    return None


def _run_ds_bloom(nproc, extra, timeout):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.join(root, "launch", "ds_bloom.py"), "--pad"] + extra
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "PASS: DeepSpeed inference with tp_softmax matches Hugging Face" in proc.stdout, out[-6000:]
    assert "softmax ops: ['tp_softmax.deepspeed.SoftmaxOp']" in proc.stdout
    return proc.stdout


@pytest.mark.timeout(300)
@pytest.mark.skipif(_ds_bloom_skip_reason(0) is not None, reason=str(_ds_bloom_skip_reason(0)))
def test_deepspeed_init_inference_on_cpu_with_fallbacks():
    """DeepSpeed's init_inference, kernel injection and tp_size 2 on CPU (gloo), its compiled ops
    replaced by their PyTorch fallbacks, tp_softmax patched in: against Hugging Face."""
    out = _run_ds_bloom(2, ["--ds-fallback", "--dtype", "float32", "--device", "cpu"], 280)
    assert "rank 1: tp_softmax heads [4, 8) of 8" in out


@pytest.mark.cuda
@pytest.mark.multigpu
@pytest.mark.timeout(1800)
@pytest.mark.skipif(_ds_bloom_skip_reason(2) is not None, reason=str(_ds_bloom_skip_reason(2)))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_deepspeed_init_inference_on_two_gpus(dtype):
    """The same with DeepSpeed's compiled inference ops (JIT-built with nvcc) on 2 GPUs, NCCL."""
    _run_ds_bloom(2, ["--dtype", dtype], 1700)
