"""attention_softmax on CPU against the float64 oracle, over hand-picked cases."""

import pytest
import torch

from softmax_cases import (ALIBI_LAYOUTS, DTYPES, MASK_DTYPES, MASK_LAYOUTS, SLOPE_LAYOUTS,
                           check_against_oracle, generator, make_alibi, make_mask, make_scores,
                           make_slopes)

# (B, H, Q, K): single elements, decode (Q == 1), prefill (Q == K), chunked prefill with a
# cache (1 < Q < K), and key lengths around powers of two.
SHAPES = [
    (1, 1, 1, 1),
    (1, 1, 1, 3),
    (2, 3, 1, 113),
    (1, 2, 113, 113),
    (2, 1, 3, 1025),
    (1, 1, 7, 4097),
    (1, 1, 2, 8193),
    (3, 2, 17, 40),
]
# (causal, window): window 1 sees only the own position; K + 5 is wider than any row.
FLAGS = [
    (False, None),
    (True, None),
    (False, 1),
    (False, 3),
    (True, 1),
    (True, 7),
    (True, 10_000),
    (False, 10_000),
]


def _ids(values):
    return [str(v) for v in values]


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("causal,window", FLAGS, ids=[f"causal={c},window={w}" for c, w in FLAGS])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_shapes_and_flags(shape, causal, window, dtype):
    gen = generator(1)
    scores = make_scores(shape, dtype, gen)
    check_against_oracle(scores, causal=causal, window=window, layer_scale=0.125)


@pytest.mark.parametrize("layer_scale", [1.0, 0.0, -1.0, 0.08838834764831845, 3.5, 1e-3])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_layer_scale(layer_scale, dtype):
    scores = make_scores((2, 2, 5, 67), dtype, generator(2))
    check_against_oracle(scores, layer_scale=layer_scale, causal=True)


def test_layer_scale_zero_is_uniform_over_visible_keys():
    scores = make_scores((1, 1, 4, 9), torch.float32, generator(3))
    out = check_against_oracle(scores, layer_scale=0.0, causal=True)
    for i in range(4):
        visible = 9 - 4 + i + 1
        assert torch.allclose(out[0, 0, i, :visible], torch.full((visible,), 1.0 / visible))


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=_ids(MASK_DTYPES))
@pytest.mark.parametrize("layout", list(MASK_LAYOUTS), ids=list(MASK_LAYOUTS))
def test_mask_layouts(layout, mask_dtype):
    b, h, q, k = 2, 3, 5, 113
    gen = generator(4)
    scores = make_scores((b, h, q, k), torch.float32, gen)
    mask = make_mask(MASK_LAYOUTS[layout](b, h, q, k), mask_dtype, gen)
    check_against_oracle(scores, mask=mask)
    check_against_oracle(scores, mask=mask, causal=True, window=6)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=_ids(MASK_DTYPES))
def test_mask_dtypes_with_low_precision_scores(mask_dtype, dtype):
    gen = generator(5)
    scores = make_scores((2, 2, 3, 1025), dtype, gen)
    mask = make_mask((2, 1, 1, 1025), mask_dtype, gen)
    check_against_oracle(scores, mask=mask, causal=True, layer_scale=0.5)


def test_padding_mask_hides_the_left_padding_of_each_batch_row():
    b, h, q, k = 3, 2, 4, 11
    pad = [0, 3, 7]
    mask = torch.ones(b, 1, 1, k, dtype=torch.bool)
    for row, n in enumerate(pad):
        mask[row, ..., :n] = False
    scores = make_scores((b, h, q, k), torch.float32, generator(6))
    out = check_against_oracle(scores, mask=mask, causal=True)
    for row, n in enumerate(pad):
        assert torch.all(out[row, ..., :n] == 0)


# The last rank of 14 heads on 4 ranks owns heads 11, 12, 13; of 12 heads on 3 ranks, 8 .. 11.
LAST_RANK = [(14, 11, 3), (12, 8, 4), (5, 0, 5), (7, 6, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("total,offset,local", LAST_RANK, ids=[f"heads{o}-{o + n - 1}of{t}" for t, o, n in LAST_RANK])
@pytest.mark.parametrize("layout", list(ALIBI_LAYOUTS), ids=list(ALIBI_LAYOUTS))
def test_alibi_tensor_layouts(layout, total, offset, local, dtype):
    b, q, k = 2, 3, 37
    gen = generator(7)
    scores = make_scores((b, local, q, k), dtype, gen)
    alibi = make_alibi(ALIBI_LAYOUTS[layout](b, total, q, k), dtype, gen)
    check_against_oracle(scores, alibi=alibi, head_offset=offset, causal=True)


@pytest.mark.parametrize("alibi_dtype", [torch.float16, torch.bfloat16, torch.float64], ids=_ids([torch.float16, torch.bfloat16, torch.float64]))
def test_alibi_tensor_of_another_float_dtype(alibi_dtype):
    gen = generator(8)
    scores = make_scores((2, 3, 1, 129), torch.float32, gen)
    alibi = make_alibi((2 * 7, 1, 129), alibi_dtype, gen)
    check_against_oracle(scores, alibi=alibi, head_offset=4)


def test_alibi_tensor_is_read_at_the_head_offset():
    """Each head has a ramp of its own slope: reading the wrong head shows."""
    b, total, k = 1, 6, 16
    alibi = torch.stack([-(2.0 ** -(g + 1)) * torch.arange(k, dtype=torch.float32) for g in range(total)])
    alibi = alibi.reshape(b * total, 1, k)
    scores = torch.zeros(b, 2, 1, k)
    out = check_against_oracle(scores, alibi=alibi, head_offset=4)
    for h in range(2):
        slope = 2.0 ** -(4 + h + 1)
        expected = torch.softmax(-slope * torch.arange(k, dtype=torch.float64), -1)
        torch.testing.assert_close(out[0, h, 0].double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("total,offset,local", LAST_RANK, ids=[f"heads{o}-{o + n - 1}of{t}" for t, o, n in LAST_RANK])
@pytest.mark.parametrize("layout", list(SLOPE_LAYOUTS), ids=list(SLOPE_LAYOUTS))
@pytest.mark.parametrize("q,k", [(1, 113), (67, 67), (5, 40)], ids=["decode", "prefill", "chunk"])
def test_alibi_slopes(q, k, layout, total, offset, local, dtype):
    b = 2
    gen = generator(9)
    scores = make_scores((b, local, q, k), dtype, gen)
    slopes = make_slopes(SLOPE_LAYOUTS[layout](b, total), gen)
    check_against_oracle(scores, alibi_slopes=slopes, head_offset=offset)
    check_against_oracle(scores, alibi_slopes=slopes, head_offset=offset, causal=True, window=9)


def test_alibi_slopes_distance_is_bottom_right_and_symmetric():
    """Zero scores: the bias alone is -slope * |i + K - Q - j|, peaked at the row's position."""
    q, k, slope = 3, 8, 0.5
    out = check_against_oracle(torch.zeros(1, 1, q, k), alibi_slopes=torch.tensor([slope]))
    for i in range(q):
        p = i + k - q
        bias = torch.tensor([-slope * abs(p - j) for j in range(k)], dtype=torch.float64)
        torch.testing.assert_close(out[0, 0, i].double(), torch.softmax(bias, -1), rtol=1e-5, atol=1e-7)
        assert int(out[0, 0, i].argmax()) == p


def test_slopes_with_causal_equal_bloom_position_bias():
    """SPEC 1.2: with causal masking, -slope*|p - j| and BLOOM's slope*j give the same probabilities."""
    b, total, q, k = 2, 4, 5, 23
    gen = generator(10)
    slopes = make_slopes((total,), gen)
    scores = make_scores((b, 2, q, k), torch.float32, gen)
    bloom = (slopes.view(1, total, 1, 1) * torch.arange(k, dtype=torch.float32)).expand(b, total, 1, k)
    from tp_softmax import attention_softmax

    a = attention_softmax(scores, alibi_slopes=slopes, causal=True, head_offset=2)
    c = attention_softmax(scores, alibi=bloom.reshape(b * total, 1, k), causal=True, head_offset=2)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_everything_at_once(dtype):
    b, total, offset, local, q, k = 2, 14, 11, 3, 6, 131
    gen = generator(11)
    scores = make_scores((b, local, q, k), dtype, gen)
    alibi = make_alibi((b * total, 1, k), dtype, gen)
    mask = make_mask((b, 1, 1, k), dtype, gen)
    check_against_oracle(scores, layer_scale=0.3, alibi=alibi, mask=mask, causal=True, window=50,
                         head_offset=offset)
    slopes = make_slopes((b, total), gen)
    mask = make_mask((b, local, q, k), torch.bool, gen)
    check_against_oracle(scores, layer_scale=0.3, alibi_slopes=slopes, mask=mask, window=4,
                         head_offset=offset, inplace=True)


def test_more_queries_than_keys_follow_the_same_rule():
    """Q > K: rows with p = i + K - Q < 0 see no key under causal masking and are all zeros."""
    scores = make_scores((1, 2, 6, 4), torch.float32, generator(12))
    out = check_against_oracle(scores, causal=True)
    assert torch.all(out[:, :, :2] == 0)
    check_against_oracle(scores)
    check_against_oracle(scores, window=2)
