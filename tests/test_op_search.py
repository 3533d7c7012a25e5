"""A hypothesis search of attention_softmax against the float64 oracle.

Shapes from 1 up with keys of every length (not only powers of two), every flag, mask and alibi
layout, head offsets of any rank, and the three score dtypes.
"""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracle import oracle_softmax
from softmax_cases import (ALIBI_LAYOUTS, DTYPES, MASK_DTYPES, MASK_LAYOUTS, SLOPE_LAYOUTS,
                           assert_matches_oracle, generator, make_alibi, make_mask, make_scores,
                           make_slopes)
from tp_softmax import TPSoftmax, attention_softmax

SEARCH = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    """(scores, keyword arguments of attention_softmax) for a random call."""
    dtype = draw(st.sampled_from(DTYPES))
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    k = draw(st.one_of(st.integers(1, 40), st.integers(41, 700)))
    q = draw(st.one_of(st.just(1), st.just(k), st.integers(1, min(k, 9))))
    q = min(q, 24)
    head_offset = draw(st.integers(0, 5))
    total = head_offset + h + draw(st.integers(0, 3))
    gen = generator(draw(st.integers(0, 2 ** 31 - 1)))
    kwargs = dict(
        causal=draw(st.booleans()),
        window=draw(st.one_of(st.none(), st.integers(1, k + 3))),
        layer_scale=draw(st.sampled_from([1.0, 0.125, 0.7, 2.0, -0.5])),
        head_offset=head_offset,
        inplace=draw(st.booleans()),
    )
    bias = draw(st.sampled_from([None, "slopes"] + list(ALIBI_LAYOUTS)))
    if bias == "slopes":
        layout = draw(st.sampled_from(list(SLOPE_LAYOUTS)))
        kwargs["alibi_slopes"] = make_slopes(SLOPE_LAYOUTS[layout](b, total), gen)
    elif bias is not None:
        alibi_dtype = draw(st.sampled_from([dtype, torch.float32]))
        kwargs["alibi"] = make_alibi(ALIBI_LAYOUTS[bias](b, total, q, k), alibi_dtype, gen)
    mask_layout = draw(st.sampled_from([None] + list(MASK_LAYOUTS)))
    if mask_layout is not None:
        mask_dtype = draw(st.sampled_from(MASK_DTYPES))
        kwargs["mask"] = make_mask(MASK_LAYOUTS[mask_layout](b, h, q, k), mask_dtype, gen)
    scores = make_scores((b, h, q, k), dtype, gen)
    if draw(st.booleans()):  # a transposed view: K is not the fastest dim
        scores = scores.transpose(-1, -2).contiguous().transpose(-1, -2)
    return scores, kwargs


@SEARCH
@given(problems())
def test_matches_the_oracle(problem):
    scores, kwargs = problem
    expected = oracle_softmax(scores, **{k: v for k, v in kwargs.items() if k != "inplace"})
    out = attention_softmax(scores, **kwargs)
    if kwargs["inplace"]:
        assert out is scores
    assert_matches_oracle(out, expected, scores.dtype)


@st.composite
def sharded_problems(draw):
    dtype = draw(st.sampled_from(DTYPES))
    world = draw(st.integers(1, 6))
    total = world + draw(st.integers(0, 9))
    b, k = draw(st.integers(1, 3)), draw(st.integers(1, 300))
    q = draw(st.one_of(st.just(1), st.just(k), st.integers(1, min(k, 7))))
    q = min(q, 20)
    gen = generator(draw(st.integers(0, 2 ** 31 - 1)))
    kwargs = dict(causal=draw(st.booleans()), window=draw(st.one_of(st.none(), st.integers(1, k + 1))))
    bias = draw(st.sampled_from([None, "slopes", "[B*HT,1,K]", "[1,HT,Q,K]"]))
    if bias == "slopes":
        kwargs["alibi_slopes"] = make_slopes((total,), gen)
    elif bias is not None:
        kwargs["alibi"] = make_alibi(ALIBI_LAYOUTS[bias](b, total, q, k), dtype, gen)
    mask = draw(st.sampled_from([None, "[B,1,1,K]", "[B,HT,Q,K]"]))
    if mask == "[B,1,1,K]":
        kwargs["mask"] = make_mask((b, 1, 1, k), draw(st.sampled_from(MASK_DTYPES)), gen)
    elif mask is not None:
        kwargs["mask"] = make_mask((b, total, q, k), draw(st.sampled_from(MASK_DTYPES)), gen)
    return make_scores((b, total, q, k), dtype, gen), world, kwargs


@SEARCH
@given(sharded_problems())
def test_sharded_equals_single(problem):
    full, world, kwargs = problem
    total = full.size(1)
    single = attention_softmax(full, **kwargs)
    pieces = []
    for rank in range(world):
        module = TPSoftmax(total, rank=rank, world_size=world)
        offset, count = module.head_offset, module.local_heads
        pieces.append(module(full[:, offset:offset + count].contiguous(), **kwargs))
    assert torch.equal(torch.cat(pieces, 1), single)
