"""SPEC 1.1 on CPU: -inf masking, empty rows, NaN and inf placement, inplace, strides, bits."""

import pytest
import torch

from softmax_cases import DTYPES, check_against_oracle, generator, make_scores
from tp_softmax import attention_softmax

INF = float("inf")


def _ids(values):
    return [str(v) for v in values]


# ---------------------------------------------------------------- rows with no visible key


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("k", [1, 3, 113, 1025, 8193, 40000])
def test_fully_masked_rows_are_exact_zeros(k, dtype):
    b, h, q = 3, 2, min(2, k)
    mask = torch.ones(b, 1, 1, k, dtype=torch.bool)
    mask[1] = False
    scores = make_scores((b, h, q, k), dtype, generator(20))
    out = attention_softmax(scores, mask=mask, causal=True, layer_scale=0.5)
    assert torch.equal(out[1], torch.zeros_like(out[1])), "a row with no visible key must be all zeros"
    sums = out[[0, 2]].float().sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=2e-2, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_rows_emptied_by_additive_minus_inf_are_zeros(dtype):
    b, h, q, k = 2, 2, 3, 50
    mask = torch.zeros(b, 1, q, k, dtype=dtype)
    mask[0, :, 1] = -INF
    scores = make_scores((b, h, q, k), dtype, generator(21))
    out = check_against_oracle(scores, mask=mask, alibi_slopes=torch.rand(h))
    assert torch.equal(out[0, :, 1], torch.zeros_like(out[0, :, 1]))


def test_rows_emptied_by_mask_and_window_together_are_zeros():
    """window=1 leaves only the row's own position; the mask hides it in row 1."""
    q, k = 3, 7
    mask = torch.ones(q, k, dtype=torch.bool)
    mask[1, k - q + 1] = False
    scores = make_scores((2, 2, q, k), torch.float32, generator(22))
    out = check_against_oracle(scores, mask=mask, window=1, causal=True)
    assert torch.equal(out[:, :, 1], torch.zeros(2, 2, k))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_all_minus_inf_scores_give_zeros(dtype):
    scores = torch.full((1, 2, 3, 17), -INF, dtype=dtype)
    assert torch.equal(attention_softmax(scores), torch.zeros_like(scores))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_masked_keys_get_minus_inf_not_a_large_negative_number(dtype):
    """Visible scores near -30000 must still beat a hidden key whose score is 0."""
    q, k = 3, 9
    scores = torch.full((1, 1, q, k), -3.0, dtype=dtype)
    scores[..., 0] = 0.0
    mask = torch.ones(k, dtype=torch.bool)
    mask[0] = False
    out = check_against_oracle(scores, mask=mask, layer_scale=1e4)
    assert torch.all(out[..., 0] == 0)
    scores = torch.full((1, 1, q, k), -3.0, dtype=dtype)
    scores[..., -1] = 0.0  # hidden by causal for every row but the last
    out = check_against_oracle(scores, causal=True, layer_scale=1e4)
    assert torch.all(out[..., : q - 1, -1] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_single_visible_key_is_exactly_one(dtype):
    """No epsilon in the denominator: one visible key has probability exactly 1."""
    scores = make_scores((2, 3, 5, 29), dtype, generator(23))
    out = attention_softmax(scores, causal=True, window=1)
    expected = torch.zeros_like(out)
    for i in range(5):
        expected[..., i, 29 - 5 + i] = 1
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_ids([torch.float16, torch.bfloat16]))
def test_low_precision_inputs_accumulate_in_float32(dtype):
    """8193 equal scores: a float16 running sum would stall at 2048."""
    out = attention_softmax(torch.zeros(1, 1, 2, 8193, dtype=dtype))
    torch.testing.assert_close(out.float(), torch.full((1, 1, 2, 8193), 1 / 8193), rtol=2 ** -7, atol=0)


# ---------------------------------------------------------------- NaN and inf


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_nan_in_a_visible_score_makes_only_that_row_nan(dtype):
    scores = make_scores((2, 2, 4, 31), dtype, generator(24))
    clean = attention_softmax(scores, causal=True)
    scores[1, 0, 2, 5] = float("nan")
    out = check_against_oracle(scores, causal=True)
    assert torch.all(out[1, 0, 2].isnan())
    keep = torch.ones(2, 2, 4, dtype=torch.bool)
    keep[1, 0, 2] = False
    assert torch.equal(out[keep], clean[keep])


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("hidden_by", ["bool mask", "causal", "window", "causal+window"])
def test_nan_at_a_hidden_position_has_no_effect(hidden_by, dtype):
    q, k = 4, 12
    scores = make_scores((2, 2, q, k), dtype, generator(25))
    mask = torch.ones(q, k, dtype=torch.bool)
    mask[2, 3] = False
    kwargs = {
        "bool mask": dict(mask=mask),
        "causal": dict(causal=True),
        "window": dict(window=3),
        "causal+window": dict(causal=True, window=3),
    }[hidden_by]
    # (row 2, key 3) is hidden by the mask; (row 0, key 11) by causal (p = 8); (row 3, key 2)
    # by the window (p = 11, 2 <= 11 - 3).
    spot = {"bool mask": (2, 3), "causal": (0, 11), "window": (3, 2), "causal+window": (0, 11)}[hidden_by]
    clean = attention_softmax(scores, **kwargs)
    scores[:, :, spot[0], spot[1]] = float("nan")
    out = check_against_oracle(scores, **kwargs)
    assert torch.equal(out, clean)


def test_nan_in_alibi_at_a_hidden_position_has_no_effect():
    q, k = 3, 8
    scores = make_scores((1, 2, q, k), torch.float32, generator(26))
    alibi = torch.randn(1, 2, q, k, generator=generator(27))
    clean = attention_softmax(scores, alibi=alibi, causal=True)
    alibi[0, 1, 0, k - 1] = float("nan")  # row 0 sits at p = 5: key 7 is hidden
    assert torch.equal(check_against_oracle(scores, alibi=alibi, causal=True), clean)


def test_nan_with_an_additive_minus_inf_mask_is_nan():
    """SPEC's x = score + mask: NaN + (-inf) is NaN, so the row is NaN (only bool, causal
    and window masks hide a position)."""
    scores = make_scores((1, 1, 2, 6), torch.float32, generator(28))
    scores[0, 0, 0, 1] = float("nan")
    mask = torch.zeros(6)
    mask[1] = -INF
    out = check_against_oracle(scores, mask=mask)
    assert torch.all(out[0, 0, 0].isnan()) and not out[0, 0, 1].isnan().any()


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_plus_inf_score_makes_the_row_nan_like_torch_softmax(dtype):
    scores = make_scores((1, 1, 3, 10), dtype, generator(29))
    scores[0, 0, 1, 4] = INF
    out = check_against_oracle(scores)
    assert torch.all(out[0, 0, 1].isnan())
    assert torch.all(torch.softmax(scores.float(), -1)[0, 0, 1].isnan())
    assert not out[0, 0, [0, 2]].isnan().any()


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_minus_inf_score_is_a_hidden_key(dtype):
    scores = make_scores((1, 2, 3, 10), dtype, generator(30))
    scores[..., 4] = -INF
    out = check_against_oracle(scores, causal=True)
    assert torch.all(out[..., 4] == 0)


# ---------------------------------------------------------------- inplace and strides


def _strided_views(dtype):
    """(name, view) pairs of non-contiguous [2, 3, 5, 41] scores."""
    gen = generator(31)
    base = make_scores((2, 3, 41, 5), dtype, gen)
    wide = make_scores((2, 3, 5, 81), dtype, gen)
    heads = make_scores((2, 7, 5, 41), dtype, gen)
    return [
        ("transposed", base.transpose(-1, -2)),
        ("every other key", wide[..., ::2]),
        ("head slice", heads[:, 2:5]),
        ("permuted batch/head", make_scores((3, 2, 5, 41), dtype, gen).transpose(0, 1)),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_inplace_returns_scores_with_the_right_values(dtype):
    scores = make_scores((2, 3, 5, 41), dtype, generator(32))
    original = scores.clone()
    slopes = torch.rand(5)
    out = attention_softmax(scores, alibi_slopes=slopes, head_offset=2, causal=True, inplace=True)
    assert out is scores
    expected = attention_softmax(original, alibi_slopes=slopes, head_offset=2, causal=True)
    assert torch.equal(scores, expected)
    scores = original.clone()
    check_against_oracle(scores, alibi_slopes=slopes, head_offset=2, causal=True, inplace=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("view", range(4), ids=[n for n, _ in _strided_views(torch.float32)])
def test_non_contiguous_scores(view, dtype):
    name, scores = _strided_views(dtype)[view]
    assert not scores.is_contiguous()
    mask = make_scores((2, 1, 1, 41), torch.float32, generator(33))
    kwargs = dict(mask=mask, causal=True, window=9, layer_scale=0.7)
    before = scores.clone()
    out = check_against_oracle(scores, **kwargs)
    assert torch.equal(scores, before), "inplace=False must not write to scores"
    assert torch.equal(out, attention_softmax(scores.contiguous(), **kwargs)), \
        "a row's bits must not depend on the strides of scores"


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("view", range(4), ids=[n for n, _ in _strided_views(torch.float32)])
def test_inplace_into_a_non_contiguous_view(view, dtype):
    name, scores = _strided_views(dtype)[view]
    base = scores._base if scores._base is not None else scores
    base_before = base.clone()
    expected = attention_softmax(scores.contiguous(), causal=True)
    out = attention_softmax(scores, causal=True, inplace=True)
    assert out is scores
    assert torch.equal(scores, expected)
    outside = torch.ones_like(base, dtype=torch.bool)
    outside_view = outside.as_strided(scores.shape, scores.stride(), scores.storage_offset() - base.storage_offset())
    outside_view.fill_(False)
    assert torch.equal(base[outside], base_before[outside]), "inplace wrote outside the view"


def test_broadcast_scores_are_read_without_inplace():
    row = make_scores((1, 1, 1, 19), torch.float32, generator(34))
    out = check_against_oracle(row.expand(2, 3, 4, 19), causal=True)
    assert out.is_contiguous()


# ---------------------------------------------------------------- determinism


def test_same_inputs_same_bits():
    gen = generator(35)
    scores = make_scores((2, 3, 7, 1025), torch.float16, gen)
    kwargs = dict(mask=torch.randn(2, 1, 1, 1025, generator=gen), alibi_slopes=torch.rand(3, generator=gen),
                  causal=True, window=300, layer_scale=0.3)
    first = attention_softmax(scores, **kwargs)
    for _ in range(3):
        assert torch.equal(attention_softmax(scores, **kwargs), first)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("k", [113, 4097, 40000])
def test_a_row_has_the_same_bits_alone_or_in_a_batch(k, dtype):
    """SPEC 1.1: a row's result depends only on K, dtype and flags, never on B, H or Q."""
    gen = generator(36)
    b, h, q = 2, 3, 2
    scores = make_scores((b, h, q, k), dtype, gen)
    # small slopes: every key of a long row must count, or the order of the sum would not show
    slopes = torch.rand(b, h, generator=gen) * 1e-4
    kwargs = dict(causal=True, layer_scale=0.5)
    full = attention_softmax(scores, alibi_slopes=slopes, **kwargs)
    for bi, hi in [(0, 0), (1, 2), (1, 0)]:
        block = scores[bi:bi + 1, hi:hi + 1].contiguous()
        alone = attention_softmax(block, alibi_slopes=slopes[bi:bi + 1], head_offset=hi, **kwargs)
        assert torch.equal(alone, full[bi:bi + 1, hi:hi + 1])
        # the last query row sits at p = K - 1 with or without the rows before it
        last = attention_softmax(block[:, :, -1:].contiguous(), alibi_slopes=slopes[bi:bi + 1],
                                 head_offset=hi, **kwargs)
        assert torch.equal(last, full[bi:bi + 1, hi:hi + 1, -1:])


def test_empty_tensors_give_empty_results():
    for shape in [(0, 2, 3, 4), (1, 0, 3, 4), (1, 2, 0, 4), (1, 2, 3, 0)]:
        scores = torch.empty(shape)
        out = attention_softmax(scores, causal=True, alibi_slopes=torch.rand(2), mask=torch.ones(shape[-1], dtype=torch.bool))
        assert out.shape == scores.shape
        assert attention_softmax(scores, inplace=True) is scores
