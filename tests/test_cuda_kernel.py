"""The fused CUDA kernel against a float64 oracle (skipped without CUDA).

Every test here requires the kernel itself, not the PyTorch fallback: the module fails (does
not skip) when CUDA is present but the kernel cannot be built or loaded.
"""

import itertools
import re
import warnings

import pytest
import torch

import tp_softmax
from tp_softmax import attention_softmax

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
K_VALUES = [1, 3, 31, 127, 1000, 1025, 4097, 8192, 8193, 16384, 32768, 65537, 262144]
# fp32: absolute tolerance; fp16 / bf16: at most 2x torch's own error in that dtype (+ floor).
ATOL = {torch.float32: 2e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
LOWP_FACTOR = 2.0


@pytest.fixture(scope="module", autouse=True)
def kernel_loaded():
    from tp_softmax import _kernel

    reasons = _kernel.environment_reasons()
    assert not reasons, f"the CUDA kernel is not usable: {reasons}"
    warnings.simplefilter("error", RuntimeWarning)  # a fallback announcement fails the test
    yield
    warnings.resetwarnings()


def hidden_positions(Q, K, causal, window, dev):
    """[Q, K] bool: the keys that causal / window hiding hides, bottom-right aligned (query i
    sits at position i + K - Q)."""
    p = torch.arange(Q, device=dev).view(Q, 1) + (K - Q)
    j = torch.arange(K, device=dev).view(1, K)
    hidden = torch.zeros(Q, K, dtype=torch.bool, device=dev)
    if causal:
        hidden |= j > p
    if window is not None:
        hidden |= j <= p - window
    return hidden


def oracle(scores, *, layer_scale=1.0, alibi=None, alibi_slopes=None, mask=None, causal=False,
           window=None, head_offset=0, compute_dtype=torch.float64):
    """SPEC section 1 written out densely in `compute_dtype` (independent of the package)."""
    B, H, Q, K = scores.shape
    dev = scores.device
    x = scores.to(compute_dtype) * layer_scale
    if alibi is not None:
        a = alibi
        if a.dim() == 3:
            a = a.reshape(B, a.shape[0] // B, a.shape[1], a.shape[2])
        x = x + a[:, head_offset:head_offset + H].to(compute_dtype)
    if alibi_slopes is not None:
        s = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes.unsqueeze(0)
        s = s[:, head_offset:head_offset + H].to(compute_dtype)
        i = torch.arange(Q, device=dev).view(Q, 1)
        j = torch.arange(K, device=dev).view(1, K)
        dist = (i + K - Q - j).abs().to(compute_dtype)
        x = x - s.view(s.shape[0], H, 1, 1) * dist
    if mask is not None:
        if mask.dtype == torch.bool:
            x = x.masked_fill(~mask, float("-inf"))
        else:
            x = x + mask.to(compute_dtype)
    x = x.masked_fill(hidden_positions(Q, K, causal, window, dev), float("-inf"))
    m = x.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = (x - m).exp()
    s = e.sum(-1, keepdim=True)
    return torch.where(s > 0, e / s, torch.zeros_like(e))


def check(out, args, kwargs, dtype):
    ref = oracle(*args, **kwargs)
    err = (out.double() - ref).abs().nan_to_num(nan=float("inf")).max().item()
    bound = ATOL[dtype]
    if dtype != torch.float32:
        lowp = oracle(*args, **kwargs, compute_dtype=dtype).to(dtype)
        torch_err = (lowp.double() - ref).abs().nan_to_num(nan=0.0).max().item()
        bound = max(bound, LOWP_FACTOR * torch_err)
    assert err <= bound, f"max error {err:.3e} > {bound:.3e}"


def poisoned_call(scores, **kwargs):
    """The op's output, in memory that held NaN before the call. The call runs in a fresh memory
    pool whose one segment was filled with 0xff bytes (NaN in float16, bfloat16 and float32) and
    freed first, so everything the call allocates, the output included, comes from poisoned memory
    (checked). An element the kernel does not write stays NaN and fails the comparison."""
    nbytes = scores.numel() * scores.element_size()
    mib = 1 << 20
    torch.cuda.synchronize()
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool):
        # Up to 1 MiB the allocator takes a 2 MiB segment of small blocks: two 1 MiB blocks fill it.
        # Larger requests share large segments: one block of twice the output and 2 MiB more.
        sizes = [mib, mib] if nbytes <= mib else [-(-(2 * nbytes + 2 * mib) // (2 * mib)) * 2 * mib]
        poison = [torch.full((n,), 0xFF, dtype=torch.uint8, device=scores.device) for n in sizes]
        spans = sorted((t.data_ptr(), t.data_ptr() + t.numel()) for t in poison)
        del poison
        out = attention_softmax(scores, **kwargs)
    torch.cuda.synchronize()
    out._poison_pool = pool  # the pool lives as long as the output
    merged = [list(spans[0])]
    for lo, hi in spans[1:]:
        if lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    start = out.data_ptr()
    assert any(lo <= start and start + nbytes <= hi for lo, hi in merged), "the output is not in poisoned memory"
    return out


def launch_lines(capfd, key):
    """The lines TP_SOFTMAX_LAUNCH_INFO=1 printed to stderr since the last call that contain `key`."""
    return [ln for ln in capfd.readouterr().err.splitlines() if key in ln]


def bits(t):
    """The raw bits of a float16 / bfloat16 / float32 tensor, for bitwise comparisons."""
    return t.view(torch.int16 if t.dtype != torch.float32 else torch.int32)


def make_case(B, H_total, H_local, Q, K, dtype, *, causal, window, bias, mask, gen, layout=None):
    dev = "cuda"
    scores = torch.randn(B, H_local, Q, K, device=dev, dtype=torch.float32, generator=gen).mul_(4).to(dtype)
    kwargs = dict(causal=causal, window=window, head_offset=H_total - H_local, layer_scale=0.7)
    if bias == "tensor":
        shape = layout or (B * H_total, 1, K)
        kwargs["alibi"] = torch.randn(shape, device=dev, generator=gen).to(dtype)
    elif bias == "slopes":
        kwargs["alibi_slopes"] = tp_softmax.alibi_slopes(H_total).to(dev)
    if mask == "bool":
        m = torch.rand(B, 1, 1, K, device=dev, generator=gen) > 0.2
        kwargs["mask"] = m
    elif mask == "additive":
        pad = torch.zeros(B, 1, 1, K, device=dev, dtype=dtype)
        for b in range(B):
            pad[b, ..., : (b * K) // (3 * B)] = float("-inf")
        kwargs["mask"] = pad
    return scores, kwargs


def q_values(K):
    qs = [1, 7]
    if K <= 8193:
        qs.append(K)
    return qs


FLAG_COMBOS = list(itertools.product([False, True], [None, "w"], [None, "tensor", "slopes"], [None, "bool", "additive"]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", K_VALUES)
def test_against_oracle_every_flag_combination(K, dtype):
    gen = torch.Generator(device="cuda").manual_seed(K * 31 + DTYPES.index(dtype))
    for Q in q_values(K):
        rows = Q * 6
        combos = FLAG_COMBOS if rows * K <= 2 ** 24 else FLAG_COMBOS[::5]
        for causal, win, bias, mask in combos:
            window = None if win is None else max(1, K // 3 + 1)
            B, H_total, H_local = (2, 5, 3) if rows * K <= 2 ** 26 else (1, 3, 1)
            scores, kwargs = make_case(B, H_total, H_local, Q, K, dtype, causal=causal, window=window,
                                       bias=bias, mask=mask, gen=gen)
            out = poisoned_call(scores, **kwargs)
            assert out.dtype == dtype and out.shape == scores.shape
            check(out, (scores,), kwargs, dtype)


ALIBI_LAYOUTS = ["bh1k", "bhqk", "1h1k", "bh1k4", "bhqk4"]
MASK_LAYOUTS = [(1, 1, 1, "K"), ("B", 1, 1, "K"), ("B", 1, "Q", "K"), (1, 1, "Q", "K"), ("B", "H", "Q", "K"),
                ("Q", "K"), ("K",), ("B", "H", 1, "K"), (1, "H", "Q", 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1000, 8192, 20000, 65536])
def test_scale_sign_and_size(K, dtype):
    """Rows that add no mask / bias values keep their scores unscaled and scale in the exponent when
    the scale is > 0 (and its product with log2 e is finite); other scales multiply each score.
    Every scale gives the oracle's result, hidden keys and masked keys included."""
    gen = torch.Generator(device="cuda").manual_seed(K + 7)
    B, H, Q = 2, 3, 5
    for scale in (1.0, 0.7, 2.5, 1e-30, -0.5, 0.0, 1e38):
        for mask in (None, "bool"):
            scores = torch.randn(B, H, Q, K, device="cuda", generator=gen).mul_(4).to(dtype)
            kwargs = dict(causal=True, window=K // 2, layer_scale=scale)
            if mask == "bool":
                kwargs["mask"] = torch.rand(B, 1, 1, K, device="cuda", generator=gen) > 0.3
            out = poisoned_call(scores, **kwargs)
            if scale == 1e38:
                # Products beyond float32 (|score| > 3.4 here): a row whose largest logit is +inf
                # is NaN, never zeros or a silently wrong row; other rows as the oracle.
                visible = oracle(torch.zeros_like(scores), **dict(kwargs, layer_scale=1.0)) > 0
                top = (scores.double() * scale).masked_fill(~visible, float("-inf")).amax(-1)
                assert (top > 3.4028234663852886e38).all(), "every row overflows"
                assert out.isnan().all(), f"scale {scale}: rows that overflow must be NaN"
                continue
            check(out, (scores,), kwargs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [33, 1024, 4100, 20000])
def test_every_alibi_and_mask_layout(K, dtype):
    gen = torch.Generator(device="cuda").manual_seed(K)
    B, H_total, H_local, Q = 2, 6, 2, 5
    size = {"B": B, "H": H_local, "Q": Q, "K": K, 1: 1}
    for lay in ALIBI_LAYOUTS:
        shape = {"bh1k": (B * H_total, 1, K), "bhqk": (B * H_total, Q, K), "1h1k": (1, H_total, 1, K),
                 "bh1k4": (B, H_total, 1, K), "bhqk4": (B, H_total, Q, K)}[lay]
        for adt in (dtype, torch.float32):
            scores, kwargs = make_case(B, H_total, H_local, Q, K, dtype, causal=True, window=None, bias=None,
                                       mask=None, gen=gen)
            kwargs["alibi"] = torch.randn(shape, device="cuda", generator=gen).to(adt)
            check(poisoned_call(scores, **kwargs), (scores,), kwargs, dtype)
    for lay in MASK_LAYOUTS:
        shape = tuple(size[d] for d in lay)
        for mdt in (torch.bool, dtype, torch.float32, torch.float64):
            scores, kwargs = make_case(B, H_total, H_local, Q, K, dtype, causal=False, window=None, bias="slopes",
                                       mask=None, gen=gen)
            if mdt == torch.bool:
                kwargs["mask"] = torch.rand(shape, device="cuda", generator=gen) > 0.3
            else:
                kwargs["mask"] = (torch.randn(shape, device="cuda", generator=gen) * 3).to(mdt)
            check(poisoned_call(scores, **kwargs), (scores,), kwargs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [5, 300, 5000, 70000, 300000, 600001])
def test_fully_masked_rows_are_zero(K, dtype):
    scores = torch.randn(2, 2, 3, K, device="cuda").to(dtype)
    mask = torch.ones(2, 1, 3, K, dtype=torch.bool, device="cuda")
    mask[0, :, 1] = False
    out = attention_softmax(scores, mask=mask)
    assert torch.equal(out[0, :, 1], torch.zeros_like(out[0, :, 1]))
    assert torch.isfinite(out).all()
    add = torch.zeros(2, 1, 3, K, device="cuda", dtype=dtype)
    add[1, :, 2] = float("-inf")
    out = attention_softmax(scores, mask=add)
    assert torch.equal(out[1, :, 2], torch.zeros_like(out[1, :, 2]))
    # Q > K with causal: the first rows see no key
    s = torch.randn(1, 1, 6, 4, device="cuda").to(dtype)
    out = attention_softmax(s, causal=True)
    assert torch.equal(out[0, 0, :2], torch.zeros_like(out[0, 0, :2]))
    check(out, (s,), dict(causal=True), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [8, 1000, 9000, 140000, 300000, 600008])
def test_nan_placement(K, dtype):
    scores = torch.randn(1, 2, 4, K, device="cuda").to(dtype)
    scores[0, 0, 0, 2] = float("nan")           # visible -> row NaN
    scores[0, 0, 1, K - 1] = float("nan")       # hidden by causal? row 1 of 4: p = K - 3 < K - 1
    scores[0, 1, 2, 0] = float("nan")           # hidden by the bool mask
    mask = torch.ones(1, 2, 4, K, dtype=torch.bool, device="cuda")
    mask[0, 1, 2, 0] = False
    out = attention_softmax(scores, mask=mask, causal=True)
    assert torch.isnan(out[0, 0, 0]).all()
    assert torch.isfinite(out[0, 0, 1]).all() and torch.isfinite(out[0, 1, 2]).all()
    clean = scores.clone()
    clean[0, 0, 0, 2] = 0
    kw = dict(mask=mask, causal=True)
    ref = oracle(clean, **kw)
    for idx in [(0, 0, 1), (0, 1, 2), (0, 1, 3)]:
        assert (out[idx].double() - ref[idx]).abs().max() < 1e-2


# Warps that straddle a causal or window edge: several rows of few threads a warp (8 and 16
# threads a row), BLOOM-like rows with mask and alibi tensors (a producer warp), a window with and
# without causal, rows past the last of a block's tiles.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,kw", [
    ((2, 5, 33, 512), dict(causal=True, pad=True)),
    ((3, 5, 99, 1000), dict(causal=True, pad=True)),
    ((1, 3, 37, 2048), dict(causal=True, alibi=True, pad=True)),
    ((2, 4, 61, 1000), dict(causal=True, window=100)),
    ((1, 2, 16, 4096), dict(window=300)),
], ids=["s512", "s1000", "bloomlike", "causal-window", "window"])
def test_hidden_scores_never_reach_the_output(shape, kw, dtype):
    # NaN and +inf at every hidden position (SPEC 1.1: no effect) give the same bits as finite
    # scores there: a lane whose chunk is hidden forms -inf logits whatever it reads.
    B, H, Q, K = shape
    g = torch.Generator(device="cuda").manual_seed(B * Q + K)
    scores = torch.randn(B, H, Q, K, device="cuda", generator=g).mul_(4).to(dtype)
    hidden = hidden_positions(Q, K, kw.get("causal", False), kw.get("window"), "cuda")
    assert hidden.any() and not hidden.all()
    j = torch.arange(K, device="cuda").view(1, K)
    poison = torch.where(j % 2 == 0, float("nan"), float("inf")).expand(Q, K)
    poisoned = torch.where(hidden, poison, scores.float()).to(dtype)
    args = dict(causal=kw.get("causal", False), window=kw.get("window"))
    if kw.get("pad"):
        keep = torch.rand(B, 1, 1, K, device="cuda", generator=g) > 0.1
        args["mask"] = torch.where(keep, 0.0, -1e4).to(dtype)
    if kw.get("alibi"):
        slopes = tp_softmax.alibi_slopes(H).cuda()
        args["alibi"] = (slopes.view(1, H, 1, 1) * j.view(1, 1, 1, K)).to(dtype)
    clean = attention_softmax(scores, **args)
    dirty = attention_softmax(poisoned, **args)
    assert torch.isfinite(clean).all()
    assert torch.equal(bits(clean), bits(dirty))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [17, 2048, 40000])
def test_inplace(K, dtype):
    scores = torch.randn(2, 3, 4, K, device="cuda").to(dtype)
    kwargs = dict(causal=True, alibi_slopes=tp_softmax.alibi_slopes(3).cuda())
    expected = attention_softmax(scores, **kwargs)
    copy = scores.clone()
    out = attention_softmax(copy, inplace=True, **kwargs)
    assert out is copy
    assert torch.equal(out, expected)
    # in place on a strided view writes only the view
    big = torch.randn(2, 3, 4, 2 * K, device="cuda").to(dtype)
    before = big.clone()
    view = big[..., ::2]
    res = attention_softmax(view, inplace=True, causal=True)
    assert torch.equal(big[..., 1::2], before[..., 1::2])
    check(res, (before[..., ::2],), dict(causal=True), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [31, 1024, 4104, 70001])
def test_non_contiguous_inputs_same_bits(K, dtype):
    gen = torch.Generator(device="cuda").manual_seed(7)
    base = torch.randn(2, 3, 5, K, device="cuda", generator=gen).to(dtype)
    mask = torch.rand(2, 1, 5, K, device="cuda", generator=gen) > 0.1
    kwargs = dict(mask=mask, causal=True, window=K // 2 + 1)
    ref = attention_softmax(base, **kwargs)
    views = [
        base.transpose(1, 2).contiguous().transpose(1, 2),                       # permuted strides
        torch.empty(2, 3, 5, K + 3, device="cuda", dtype=dtype)[..., 1:K + 1].copy_(base),  # unaligned rows
        torch.empty(2, 3, 5, 2 * K, device="cuda", dtype=dtype)[..., ::2].copy_(base),      # key stride 2
    ]
    for v in views:
        assert torch.equal(attention_softmax(v, **kwargs), ref)
    check(ref, (base,), kwargs, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_identical_reruns_and_batch_independence(dtype):
    for K in [100, 2048, 8193, 65537, 262144, 300000, 300001, 600001, 1 << 20]:
        gen = torch.Generator(device="cuda").manual_seed(K)
        B, H, Q = (3, 4, 6) if K < 100000 else (2, 2, 2)
        scores = torch.randn(B, H, Q, K, device="cuda", generator=gen).to(dtype)
        slopes = tp_softmax.alibi_slopes(H + 2).cuda()
        kwargs = dict(alibi_slopes=slopes, causal=True, head_offset=2)
        a = attention_softmax(scores, **kwargs)
        b = attention_softmax(scores, **kwargs)
        assert torch.equal(a, b), f"K={K}: reruns differ"
        # one head of one batch entry, as a tensor of its own (Q unchanged: positions depend on Q)
        single = attention_softmax(scores[1:2, 1:2].clone(), alibi_slopes=slopes, causal=True, head_offset=3)
        assert torch.equal(single, a[1:2, 1:2]), f"K={K}: row differs alone vs in the batch"


def test_tensor_over_2_31_elements():
    free, _ = torch.cuda.mem_get_info()
    K = 65536
    rows = (2 ** 31) // K + 8
    need = rows * K * 2 * 2 + (1 << 30)
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free, have {free / 2**30:.1f}")
    scores = torch.empty(1, 1, rows, K, device="cuda", dtype=torch.float16)
    scores.normal_()
    assert scores.numel() > 2 ** 31
    out = attention_softmax(scores, causal=True)
    for r in [0, rows // 2, rows - 1]:
        sl = scores[:, :, r:r + 1]
        # row r of a [1, 1, rows, K] causal problem sits at p = r + K - rows
        p = r + K - rows
        x = sl[0, 0, 0].double()
        x[p + 1:] = float("-inf")
        expect = torch.softmax(x, -1)
        assert (out[0, 0, r].double() - expect).abs().max() < 1e-3, f"row {r}"
    del scores, out


def test_cuda_graph_capture_equals_eager():
    scores = torch.randn(2, 4, 16, 1000, device="cuda", dtype=torch.float16)
    mask = torch.zeros(2, 1, 1, 1000, device="cuda", dtype=torch.float16)
    mask[0, ..., :100] = float("-inf")
    kwargs = dict(mask=mask, causal=True, alibi_slopes=tp_softmax.alibi_slopes(8).cuda(), head_offset=4)
    eager = attention_softmax(scores, **kwargs)
    static = scores.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        attention_softmax(static, **kwargs)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = attention_softmax(static, **kwargs)
    fresh = torch.randn_like(scores)
    static.copy_(fresh)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, attention_softmax(fresh, **kwargs))
    static.copy_(scores)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def test_opcheck():
    from tp_softmax import _kernel  # noqa: F401 - registers the fake kernels

    scores = torch.randn(2, 3, 4, 40, device="cuda", dtype=torch.float16)
    mask = torch.rand(2, 1, 1, 40, device="cuda") > 0.2
    slopes = tp_softmax.alibi_slopes(3).cuda().unsqueeze(0)
    bias = torch.randn(2, 3, 1, 40, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.tp_softmax.attention_softmax, (scores, mask, None, slopes, 0.5, True, 0))
    torch.library.opcheck(torch.ops.tp_softmax.attention_softmax, (scores, None, bias, None, 1.0, False, 7))
    torch.library.opcheck(torch.ops.tp_softmax.attention_softmax_, (scores.clone(), mask, None, None, 1.0, True, 3))


def test_torch_compile_fullgraph():
    scores = torch.randn(2, 4, 8, 512, device="cuda", dtype=torch.bfloat16)
    slopes = tp_softmax.alibi_slopes(8).cuda()
    mask = torch.zeros(2, 1, 1, 512, device="cuda", dtype=torch.bfloat16)

    def f(s, m):
        return attention_softmax(s * 1.0, mask=m, alibi_slopes=slopes, causal=True, head_offset=4)

    eager = f(scores, mask)
    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(scores, mask), eager)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu():
    scores = torch.randn(2, 3, 5, 3000, device="cuda:1", dtype=torch.float16)
    mask = torch.rand(2, 1, 5, 3000, device="cuda:1") > 0.3
    with torch.cuda.device(0):
        out = attention_softmax(scores, mask=mask, causal=True)
    assert out.device == scores.device
    check(out, (scores,), dict(mask=mask, causal=True), torch.float16)
    with pytest.raises((ValueError, RuntimeError), match="mask"):
        attention_softmax(scores, mask=mask.to("cuda:0"))


def test_streaming_path_and_cluster_path_reported():
    from tp_softmax import _kernel

    # longer rows than a cluster of 16 wide slices (64 KiB of 16-byte chunks, 8 a thread of 512):
    # staged pieces of 8 KiB (512 chunks), up to 27 a block, on the smallest cluster of 4, 8 or
    # 16 blocks that holds the row (4 only holds rows of fewer chunks than the staged path: with
    # two operand tensors, whose wide slices are 32 KiB)
    for K, dtype, cluster, pieces in ((524296, torch.float16, 8, 17), (600000, torch.float16, 8, 19),
                                      (27 * 512 * 8 * 8, torch.float16, 8, 27),
                                      (27 * 512 * 8 * 8 + 8, torch.float16, 16, 14),
                                      (1 << 20, torch.float16, 16, 16), (262148, torch.float32, 8, 17),
                                      (27 * 8192 * 8, torch.bfloat16, 16, 27), (27 * 8192 * 4, torch.float32, 16, 27)):
        text = _kernel.row_config(K, dtype)
        assert "one read (long rows)" in text and f"{pieces} piece(s)" in text, text
        assert f"cluster {cluster} x" in text, text
    text = _kernel.row_config(262152, torch.float16, two_operands=True)
    assert "one read (long rows)" in text and "cluster 4 x" in text and "17 piece(s)" in text, text
    for K, dtype in ((27 * 8192 * 8 + 8, torch.float16), (27 * 8192 * 4 + 4, torch.float32)):
        text = _kernel.row_config(K, dtype)
        assert "two reads" in text and "cluster 16" in text, text
    # up to two slices: one block of 512 threads; up to 16: a cluster of 4, 8 or 16 blocks of 256;
    # up to 16 wide slices: a cluster of 16 blocks of 512
    for K, dtype, rt, cluster in ((16392, torch.float16, 512, 1), (32768, torch.bfloat16, 512, 1),
                                  (32776, torch.float16, 256, 4), (65536, torch.bfloat16, 256, 4),
                                  (131072, torch.bfloat16, 256, 8), (262144, torch.bfloat16, 256, 16),
                                  (262152, torch.float16, 512, 16), (262144, torch.float32, 512, 16),
                                  (524288, torch.bfloat16, 512, 16)):
        text = _kernel.row_config(K, dtype)
        assert f"one read (staged): {rt} thread(s)/row" in text, text
        assert f"cluster {cluster}, {rt} threads/block" in text, text
    assert "256 thread(s)/row" in _kernel.row_config(16384, torch.float16)
    assert "cluster 1, 256 threads/block" in _kernel.row_config(16384, torch.float16)
    # a mask and an alibi tensor: 4 chunks per thread, so half as many keys per block
    assert "x 4 chunk" in _kernel.row_config(8192, torch.float16, two_operands=True)
    assert "cluster 1, 512 threads/block" in _kernel.row_config(16384, torch.float16, two_operands=True)
    assert "cluster 4, 256 threads/block" in _kernel.row_config(32768, torch.float16, two_operands=True)
    assert "cluster 16, 512 threads/block" in _kernel.row_config(262144, torch.float16, two_operands=True)
    # rows of one 256-thread block with two operand tensors have a producer warp; wide rows do not
    assert "producer warp" in _kernel.row_config(8192, torch.float16, two_operands=True)
    assert "producer warp" not in _kernel.row_config(16384, torch.float16, two_operands=True)
    assert "producer warp" not in _kernel.row_config(8192, torch.float16)
    # outputs by bulk copies: rows of 16 to 64 threads without a cluster or producer warp
    for K, dtype in ((1024, torch.bfloat16), (4096, torch.float16), (512, torch.float32), (2048, torch.float32)):
        assert "outputs sent by bulk copies" in _kernel.row_config(K, dtype), (K, dtype)
    for K, dtype, two in ((512, torch.float16, False), (8192, torch.float16, False), (256, torch.float32, False),
                          (4096, torch.float32, False), (2048, torch.float16, True), (65536, torch.bfloat16, False)):
        assert "bulk copies" not in _kernel.row_config(K, dtype, two_operands=two), (K, dtype, two)


# Many more tiles than resident blocks: every stage of the copy pipeline is reused many times
# (mbarrier phases wrap), with rows per tile from 256 (K = 8) to one row slice per cluster block
# (one block of 512 threads a row: 132 resident on an H100; clusters of 16 such blocks: 7). The
# causal rows with a pad mask alone are those whose warps release each stage to warp 0 through a
# named barrier where rows of 16 to 32 threads send their outputs by bulk copies (float32 K = 512,
# float16 K = 2048), and meet at a block barrier elsewhere.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,B,H,Q", [(8, 64, 16, 256), (512, 16, 16, 256), (4096, 64, 32, 1), (2048, 2, 8, 2048),
                                     (20000, 4, 8, 64), (65536, 8, 32, 1), (300000, 1, 24, 1)])
def test_many_tiles_per_block(K, B, H, Q, dtype):
    gen = torch.Generator(device="cuda").manual_seed(K + B)
    H_total = H + 2
    scores = torch.randn(B, H, Q, K, device="cuda", generator=gen).mul_(4).to(dtype)
    pad = torch.zeros(B, 1, 1, K, device="cuda", dtype=dtype)
    for b in range(B):
        pad[b, ..., : (b * K) // (2 * B)] = float("-inf")
    alibi = torch.randn(B, H_total, K, device="cuda", generator=gen).to(dtype)
    for kwargs in (dict(causal=True), dict(causal=True, mask=pad, alibi=alibi.view(B * H_total, 1, K), head_offset=2),
                   dict(mask=pad, window=max(1, K // 3)), dict(causal=True, mask=pad)):
        out = poisoned_call(scores, **kwargs)
        rows = torch.randperm(B * H * Q, device="cuda", generator=gen)[:512]
        b, rest = rows // (H * Q), rows % (H * Q)
        h, i = rest // Q, rest % Q
        ref = oracle(scores, **kwargs)
        got = out[b, h, i]
        bound = 2 * ATOL[dtype] if dtype == torch.float32 else (1e-3 if dtype == torch.float16 else 8e-3)
        err = (got.double() - ref[b, h, i]).abs().nan_to_num(nan=float("inf")).max().item()
        assert err <= bound, f"{kwargs.keys()}: max error {err:.3e} > {bound:.3e}"
        assert torch.isfinite(out).all()


# Operand rows staged in shared memory beside the scores (per row, per (batch, head), per batch)
# or read from global memory: the same bits. TP_SOFTMAX_STAGE_OPERANDS=0 turns staging off;
# TP_SOFTMAX_LAUNCH_INFO=1 reports the layout each launch chose, so the test knows which path ran.
STAGING_CASES = [
    # name, dtype, B, H, Q, K, causal, window, alibi layout, mask layout / dtype, expected (mask, bias)
    ("decode", torch.float16, 8, 4, 1, 4096, False, None, "bh1k", ("B11K", torch.bool), ("per batch", "per row")),
    ("decode-f32", torch.float32, 6, 3, 1, 1024, False, None, "bh1k", ("B11K", torch.bool), ("per batch", "per row")),
    ("prefill", torch.float16, 2, 3, 37, 1024, True, None, "bh1k", ("B11K", torch.bool), ("per head", "per head")),
    # 4 rows per tile, both operands (the producer warp's block): staged as well
    ("prefill-few-rows", torch.float16, 2, 3, 37, 2048, True, None, "bh1k", ("B11K", torch.bool),
     ("per head", "per head")),
    # 4 rows per tile, one operand (warp 0 copies): it stays in global memory (docs/perf.md, v11)
    ("prefill-few-rows-one-op", torch.float16, 2, 3, 37, 4096, True, None, None, ("B11K", torch.float16),
     ("global", "none")),
    ("prefill-bf16", torch.bfloat16, 2, 3, 37, 1024, True, None, None, ("B11K", torch.bool), ("per head", "none")),
    ("short-rows", torch.float16, 3, 2, 5, 512, False, None, None, ("B11K", torch.bool), ("per head", "none")),
    ("window", torch.float16, 2, 2, 300, 1024, True, 100, "bh1k", ("B11K", torch.float16), ("per head", "per head")),
    ("f32-alibi", torch.float32, 2, 2, 70, 512, True, None, "bh1k", None, ("none", "per head")),
    ("own-rows", torch.bfloat16, 2, 2, 9, 512, True, None, "bhqk", ("BHQK", torch.bool), ("per row", "per row")),
    ("cluster", torch.float16, 1, 2, 3, 20000, True, None, "bhqk", ("BHQK", torch.bool), ("per row", "per row")),
    ("cluster-decode", torch.bfloat16, 2, 3, 1, 65536, False, None, "bh1k", ("B11K", torch.bool),
     ("per batch", "per row")),
    # a bool mask row of 1032 bytes is not whole 16-byte units: it stays in global memory
    ("odd-mask", torch.float16, 2, 2, 4, 1032, False, None, "bhqk", ("B11K", torch.bool), ("global", "per row")),
]


def staging_inputs(case, seed_offset=0):
    """Scores and attention_softmax keyword arguments for a STAGING_CASES entry."""
    _, dtype, B, H, Q, K, causal, window, alibi_lay, mask_lay, _ = case
    gen = torch.Generator(device="cuda").manual_seed(K + Q + seed_offset)
    H_total = H + 1
    scores = torch.randn(B, H, Q, K, device="cuda", generator=gen).mul_(4).to(dtype)
    kwargs = dict(causal=causal, window=window, head_offset=1, layer_scale=0.5)
    if alibi_lay == "bh1k":
        kwargs["alibi"] = torch.randn(B * H_total, 1, K, device="cuda", generator=gen).to(dtype)
    elif alibi_lay == "bhqk":
        kwargs["alibi"] = torch.randn(B * H_total, Q, K, device="cuda", generator=gen).to(dtype)
    if mask_lay is not None:
        shape = (B, 1, 1, K) if mask_lay[0] == "B11K" else (B, H, Q, K)
        if mask_lay[1] == torch.bool:
            kwargs["mask"] = torch.rand(shape, device="cuda", generator=gen) > 0.3
        else:
            kwargs["mask"] = (torch.randn(shape, device="cuda", generator=gen) * 3).to(mask_lay[1])
    return scores, kwargs


def launched_stages(capfd):
    """The stage count of the last staged launch TP_SOFTMAX_LAUNCH_INFO=1 reported."""
    return int(re.search(r"(\d+) stages of", launch_lines(capfd, "staged layout")[-1]).group(1))


@pytest.mark.parametrize("name,least", [("prefill", 2), ("prefill-few-rows", 3), ("cluster-decode", 2),
                                        ("f32-alibi", 3)])
def test_fewer_stages_same_bits(name, least, capfd, monkeypatch):
    # TP_SOFTMAX_MAX_STAGES caps the stages a block fills ahead (a measurement knob): same bits.
    scores, kwargs = staging_inputs(next(c for c in STAGING_CASES if c[0] == name), seed_offset=1)
    monkeypatch.setenv("TP_SOFTMAX_LAUNCH_INFO", "1")
    capfd.readouterr()
    full = poisoned_call(scores, **kwargs)
    stages = launched_stages(capfd)
    assert stages >= least, stages
    for cap in sorted({"2", str(stages - 1), "0", "99"}):
        monkeypatch.setenv("TP_SOFTMAX_MAX_STAGES", cap)
        out = poisoned_call(scores, **kwargs)
        got = launched_stages(capfd)
        assert got == min(max(int(cap), 2), stages), (cap, got)  # out-of-range caps are clamped
        assert torch.equal(bits(out), bits(full)), cap


@pytest.mark.parametrize("case", STAGING_CASES, ids=lambda c: c[0])
def test_staged_operands_same_bits_as_global(case, capfd, monkeypatch):
    name, dtype, *_, expect = case
    scores, kwargs = staging_inputs(case)
    monkeypatch.setenv("TP_SOFTMAX_LAUNCH_INFO", "1")
    capfd.readouterr()
    staged = poisoned_call(scores, **kwargs)
    layout = launch_lines(capfd, "staged layout")
    assert layout and f"mask {expect[0]}, bias {expect[1]}," in layout[-1], layout
    # whole rows, contiguous, none hidden, each filling its slot: the tile's scores are one copy
    assert ("one copy per tile" in layout[-1]) == (name in ("decode", "decode-f32", "short-rows")), layout
    monkeypatch.setenv("TP_SOFTMAX_STAGE_OPERANDS", "0")
    plain = poisoned_call(scores, **kwargs)
    layout = launch_lines(capfd, "staged layout")
    assert layout and "mask per" not in layout[-1] and "bias per" not in layout[-1], layout
    assert torch.equal(bits(staged), bits(plain))
    check(staged, (scores,), kwargs, dtype)


# Rows longer than 16 slices: a 16-byte aligned row is staged in shared memory once (a ring of
# 8 KiB pieces per block, refilled with the next rows' pieces while a row is written); rows that
# are not aligned are read twice from global memory in the same order. Both must give the same
# bits, and TP_SOFTMAX_LAUNCH_INFO says which path ran, so neither side can pass by not running.
# More rows than the resident clusters (about 33 of 4 blocks, 16 of 8, 7 of 16 on an H100) take
# at once: each block's ring of 27 pieces wraps; the window and the causal rows leave pieces with
# no visible key (a copy of nothing).
LONG_CASES = [
    # name, dtype, B, H, Q, K, flags, the path of the contiguous (aligned) rows
    ("causal-window-mask-alibi", torch.float16, 4, 4, 6, 300000, "cwma", "staged"),
    ("decode-slopes", torch.bfloat16, 8, 8, 1, 600000, "s", "staged"),
    ("f32-causal", torch.float32, 2, 3, 8, 262152, "c", "staged"),
    ("most-pieces", torch.bfloat16, 1, 2, 3, 27 * 8192 * 8, "cw", "staged"),
    # one chunk more than a 16-block cluster's rings hold: aligned rows read twice as well
    ("beyond-the-ring", torch.float16, 1, 2, 2, 27 * 8192 * 8 + 8, "cm", "two reads"),
]


@pytest.mark.parametrize("case", LONG_CASES, ids=lambda c: c[0])
def test_long_rows_staged_same_bits_as_two_reads(case, capfd, monkeypatch):
    _name, dtype, B, H, Q, K, flags, path = case
    gen = torch.Generator(device="cuda").manual_seed(K + Q)
    H_total = H + 2
    scores = torch.randn(B, H, Q, K, device="cuda", generator=gen).mul_(4).to(dtype)
    kwargs = dict(causal="c" in flags, head_offset=2, layer_scale=0.5)
    if "w" in flags:
        kwargs["window"] = K // 3 + 5
    if "m" in flags:
        kwargs["mask"] = torch.rand(B, 1, Q, K, device="cuda", generator=gen) > 0.2
    if "a" in flags:
        kwargs["alibi"] = torch.randn(B * H_total, 1, K, device="cuda", generator=gen).to(dtype)
    if "s" in flags:
        kwargs["alibi_slopes"] = tp_softmax.alibi_slopes(H_total).cuda()
    monkeypatch.setenv("TP_SOFTMAX_LAUNCH_INFO", "1")
    capfd.readouterr()
    contiguous = poisoned_call(scores, **kwargs)
    info = launch_lines(capfd, "long rows")
    assert info and f"long rows: {path}" in info[-1], info
    twice = poisoned_call(unaligned_rows(scores), **kwargs)
    info = launch_lines(capfd, "long rows")
    assert info and "long rows: two reads" in info[-1], info
    assert torch.equal(bits(contiguous), bits(twice.contiguous()))
    # in place: the same bits
    inplace = attention_softmax(scores.clone(), inplace=True, **kwargs)
    assert torch.equal(bits(inplace), bits(contiguous))
    check(contiguous, (scores,), kwargs, dtype)
    if kwargs.get("window") is not None:
        # keys before the window are written as zeros (their pieces are never copied)
        assert torch.equal(contiguous[..., :K // 2 - 8], torch.zeros_like(contiguous[..., :K // 2 - 8]))


# Rows that see every key and lie K elements apart, on cluster rows (or one wide block) without
# operands, take the WHOLE kernels (no row span worked out, no visibility tests); the same rows laid
# out otherwise take the general ones. Name, dtype, B, H, Q, K, attention_softmax arguments.
WHOLE_CASES = [
    ("decode-cluster4", torch.bfloat16, 2, 3, 1, 65536, dict()),
    ("decode-wide-causal", torch.float16, 2, 2, 1, 20000, dict(causal=True, layer_scale=0.7)),
    ("window-over-K-f32", torch.float32, 1, 2, 2, 131072, dict(window=131072, layer_scale=-0.5)),
    ("wide-cluster16", torch.bfloat16, 1, 2, 1, 300000, dict(layer_scale=0.125)),
    # the last piece holds one chunk; most threads' later chunks lie past the row's end
    ("cluster8-one-chunk-over", torch.bfloat16, 3, 2, 1, 65544, dict(layer_scale=0.3)),
    ("f32-cluster16-partial", torch.float32, 1, 3, 1, 100004, dict()),
]


def unaligned_rows(scores):
    """A copy of `scores` whose rows start one element past a 16-byte boundary (rows read twice by
    the long-row kernel, strided loads elsewhere)."""
    B, H, Q, K = scores.shape
    view = torch.empty(B, H, Q, K + 1, device=scores.device, dtype=scores.dtype)[..., 1:]
    view.copy_(scores)
    return view


def whole_and_general(scores, capfd, **kwargs):
    """The op's outputs for `scores`, whose rows lie K apart (the WHOLE kernels), and for the same
    rows 16 bytes further apart (still aligned, not linear: the general kernels), each checked in
    the launch info (TP_SOFTMAX_LAUNCH_INFO=1 must be set)."""
    capfd.readouterr()
    whole = poisoned_call(scores, **kwargs)
    info = launch_lines(capfd, "staged layout")
    assert info and "whole linear rows" in info[-1], info
    K = scores.shape[-1]
    spaced = torch.empty(*scores.shape[:-1], K + 16 // scores.element_size(), device=scores.device,
                         dtype=scores.dtype)[..., :K]
    spaced.copy_(scores)
    general = poisoned_call(spaced, **kwargs)
    info = launch_lines(capfd, "staged layout")
    assert info and "whole linear rows" not in info[-1], info
    return whole, general.contiguous()


@pytest.mark.parametrize("case", WHOLE_CASES, ids=lambda c: c[0])
def test_whole_linear_rows_same_bits_as_general(case, capfd, monkeypatch):
    _name, dtype, B, H, Q, K, kwargs = case
    gen = torch.Generator(device="cuda").manual_seed(K + Q)
    scores = torch.randn(B, H, Q, K, device="cuda", generator=gen).mul_(4).to(dtype)
    monkeypatch.setenv("TP_SOFTMAX_LAUNCH_INFO", "1")
    whole, general = whole_and_general(scores, capfd, **kwargs)
    assert torch.equal(bits(whole), bits(general))
    inplace = attention_softmax(scores.clone(), inplace=True, **kwargs)
    assert torch.equal(bits(inplace), bits(whole))
    check(whole, (scores,), kwargs, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_whole_rows_special_values_same_bits_as_general(dtype, capfd, monkeypatch):
    # The WHOLE kernels of 16-bit raw scores take a row's maximum on packed pairs; the general ones
    # on the widened values (fmaxf). Rows: only -inf, one +inf, NaNs, signed zeros as the maximum,
    # all signed zeros, -inf among values, the dtype's largest value, NaN with +inf, then plain.
    B, H, Q, K = 1, 9, 1, 65536
    gen = torch.Generator(device="cuda").manual_seed(11)
    scores = torch.randn(B, H, Q, K, device="cuda", generator=gen).mul_(4).to(dtype)
    s = scores[0, :, 0]
    s[0] = float("-inf")
    s[1, K // 3] = float("inf")
    s[2, 5::997] = float("nan")
    s[3] = -s[3].abs()
    s[3, 7::11] = 0.0
    s[3, 9::13] = -0.0
    s[4] = torch.where(torch.arange(K, device="cuda") % 2 == 0, -0.0, 0.0).to(dtype)
    s[5, ::3] = float("-inf")
    s[6, 0] = s[6, K - 1] = torch.finfo(dtype).max
    s[7, 17::101] = float("nan")
    s[7, 3] = float("inf")
    monkeypatch.setenv("TP_SOFTMAX_LAUNCH_INFO", "1")
    whole, general = whole_and_general(scores, capfd, layer_scale=0.25)
    assert torch.equal(bits(whole), bits(general))
    out = whole[0, :, 0].float()
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # no key can be attended: zeros
    for r in (1, 2, 7):  # +inf or NaN among the scores: a NaN row
        assert out[r].isnan().all(), r
    for r in (3, 4, 5, 6, 8):
        assert torch.isfinite(out[r]).all(), r
        assert abs(out[r].double().sum().item() - 1.0) < 2e-2, r
    assert torch.equal(out[4], torch.full_like(out[4], 1.0 / K))
    assert torch.equal(out[5, ::3], torch.zeros_like(out[5, ::3]))


# Rows whose largest logit is huge (|max * log2 e| >= 2^29, about 3.7e8: huge scores, or a huge
# scale) take the difference to the maximum before the exponent. The multiply-add
# fmaf(x, log2 e, -max * log2 e) carries the rounding of max * log2 e into every exponent, and for
# these maxima that rounding is 632 to 2048 (a power-of-two maximum would round exactly and hide
# it): the rows came out as zeros or NaN. The scores lie on levels base * (1 -+ l / 16), l = 0 .. 7:
# the keys at the top level share the row, the others (base / 16 below) get 0. Name, dtype, B, H,
# Q, K, base, attention_softmax arguments ("mask": an additive float32 pad mask; "alibi": an alibi
# tensor; "unaligned": rows not 16-byte aligned).
HUGE_CASES = [
    ("whole-cluster-bf16", torch.bfloat16, 2, 2, 1, 65536, 1.7e10, dict()),
    ("whole-cluster-bf16-negative", torch.bfloat16, 2, 2, 1, 65536, -1.7e10, dict()),
    ("whole-wide-f32", torch.float32, 1, 2, 1, 12000, 2e10, dict()),
    ("causal-bf16", torch.bfloat16, 1, 2, 16, 4096, 1.7e10, dict(causal=True)),
    ("fp16-huge-scale", torch.float16, 1, 2, 8, 2048, 7.0, dict(causal=True, layer_scale=3.3e9)),
    ("f32-mask", torch.float32, 1, 2, 4, 1000, 2e10, dict(mask=True)),
    ("fp16-mask-alibi", torch.float16, 1, 2, 8, 2048, 7.0, dict(mask=True, alibi=True, layer_scale=3.3e9)),
    ("long-row-fp16", torch.float16, 1, 1, 2, 600000, 7.0, dict(layer_scale=3.3e9)),
    ("long-row-fp16-unaligned", torch.float16, 1, 1, 2, 600000, 7.0, dict(layer_scale=3.3e9, unaligned=True)),
]


@pytest.mark.parametrize("case", HUGE_CASES, ids=lambda c: c[0])
def test_huge_logits(case):
    _name, dtype, B, H, Q, K, base, kwargs = case
    kwargs = dict(kwargs)
    gen = torch.Generator(device="cuda").manual_seed(K + Q + 7)
    level = torch.randint(0, 8, (B, H, Q, K), device="cuda", generator=gen).double()
    scores = (base * (1 - torch.sign(torch.tensor(base)) * level / 16)).to(dtype)
    if kwargs.pop("unaligned", False):
        scores = unaligned_rows(scores)
    if kwargs.pop("mask", False):
        keep = torch.rand(B, 1, 1, K, device="cuda", generator=gen) > 0.1
        kwargs["mask"] = torch.where(keep, 0.0, float("-inf"))
    if kwargs.pop("alibi", False):
        kwargs["alibi"] = torch.randn(B * H, 1, K, device="cuda", generator=gen).to(dtype)
    out = poisoned_call(scores, **kwargs)
    # The oracle in float32, where SPEC forms the logits: 2.3e10 plus an alibi value is 2.3e10 there,
    # and the keys it ties share the row.
    ref = oracle(scores, **kwargs, compute_dtype=torch.float32).double()
    assert not out.isnan().any()
    err = (out.double() - ref).abs().max().item()
    assert err <= max(ATOL[dtype], 0.5 * torch.finfo(dtype).eps), f"max error {err:.3e}"
    sums = out.double().sum(-1)
    assert ((sums - 1).abs() <= 0.01).all(), sums


@pytest.mark.parametrize("unaligned", [False, True], ids=["staged", "read-twice"])
def test_long_rows_huge_and_ordinary_in_turn(unaligned):
    # Rows of the long-row kernel (600000 bfloat16 keys: a cluster of 16 blocks a row), every third
    # one huge, and more rows than the clusters resident at once, so that a block takes huge and
    # ordinary rows in turn. A staged huge row reduces twice (its sum again, relative to the row's
    # maximum) where an ordinary row reduces once, and the block's scratch and the cluster's
    # exchange alternate by the count of reductions: a count kept by rows would mix them up.
    dtype = torch.bfloat16
    B, H, Q, K = 1, 40, 1, 600000
    gen = torch.Generator(device="cuda").manual_seed(11)
    ordinary = torch.randn(B, H, Q, K, device="cuda", generator=gen).double()
    level = torch.randint(0, 8, (B, H, Q, K), device="cuda", generator=gen).double()
    is_huge = (torch.arange(H, device="cuda") % 3 == 0).view(1, H, 1, 1)
    scores = torch.where(is_huge, 1.7e10 * (1 - level / 16), ordinary).to(dtype)
    if unaligned:
        scores = unaligned_rows(scores)
    out = poisoned_call(scores)
    ref = oracle(scores, compute_dtype=torch.float32).double()
    assert not out.isnan().any()
    err = (out.double() - ref).abs().amax(-1)
    assert (err <= ATOL[dtype]).all(), err.flatten()
    sums = out.double().sum(-1)
    assert ((sums - 1).abs() <= 0.01).all(), sums.flatten()


def test_rows_with_hidden_keys_take_the_general_kernels(capfd, monkeypatch):
    # causal rows with more than one query hide keys; a window shorter than K does too
    gen = torch.Generator(device="cuda").manual_seed(5)
    scores = torch.randn(1, 2, 3, 65536, device="cuda", generator=gen).to(torch.bfloat16)
    monkeypatch.setenv("TP_SOFTMAX_LAUNCH_INFO", "1")
    for kwargs in (dict(causal=True), dict(window=65535)):
        capfd.readouterr()
        out = poisoned_call(scores, **kwargs)
        info = launch_lines(capfd, "staged layout")
        assert info and "whole linear rows" not in info[-1], (kwargs, info)
        check(out, (scores,), kwargs, torch.bfloat16)
