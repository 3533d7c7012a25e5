"""SPEC 2 on one process: head_partition, TPSoftmax with explicit ranks, sharded == single."""

import pytest
import torch

from oracle import oracle_softmax
from softmax_cases import (DTYPES, assert_matches_oracle, generator, make_alibi, make_mask,
                           make_scores, make_slopes)
from tp_softmax import TPSoftmax, attention_softmax, head_partition

# Written out by hand: contiguous blocks, the first total % world ranks get one more head.
PARTITIONS = {
    (1, 1): [(0, 1)],
    (8, 2): [(0, 4), (4, 4)],
    (12, 3): [(0, 4), (4, 4), (8, 4)],
    (14, 4): [(0, 4), (4, 4), (8, 3), (11, 3)],
    (10, 4): [(0, 3), (3, 3), (6, 2), (8, 2)],
    (7, 3): [(0, 3), (3, 2), (5, 2)],
    (5, 5): [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)],
    (112, 8): [(14 * r, 14) for r in range(8)],
    (9, 8): [(0, 2)] + [(r + 1, 1) for r in range(1, 8)],
}


@pytest.mark.parametrize("total,world", sorted(PARTITIONS))
def test_head_partition_table(total, world):
    assert [head_partition(total, world, rank) for rank in range(world)] == PARTITIONS[(total, world)]


@pytest.mark.parametrize("world", range(1, 9))
def test_head_partition_covers_every_head_once(world):
    for total in range(world, 70):
        blocks = [head_partition(total, world, rank) for rank in range(world)]
        assert blocks[0][0] == 0
        for (offset, count), (next_offset, next_count) in zip(blocks, blocks[1:]):
            assert next_offset == offset + count
            assert count - next_count in (0, 1)
        assert blocks[-1][0] + blocks[-1][1] == total
        assert max(c for _, c in blocks) - min(c for _, c in blocks) <= 1


@pytest.mark.parametrize("args,error,word", [
    ((3, 4, 0), ValueError, "total_heads"),
    ((4, 0, 0), ValueError, "world_size"),
    ((4, -1, 0), ValueError, "world_size"),
    ((4, 2, 2), ValueError, "rank"),
    ((4, 2, -1), ValueError, "rank"),
    ((4.0, 2, 0), TypeError, "total_heads"),
    ((4, 2.0, 0), TypeError, "world_size"),
    ((4, 2, None), TypeError, "rank"),
    ((4, True, 0), TypeError, "world_size"),
])
def test_head_partition_errors(args, error, word):
    with pytest.raises(error, match=word):
        head_partition(*args)


# ---------------------------------------------------------------- TPSoftmax


def test_tpsoftmax_without_a_process_group_is_rank_0_of_1():
    module = TPSoftmax(6)
    assert isinstance(module, torch.nn.Module)
    assert (module.rank, module.world_size, module.head_offset, module.local_heads) == (0, 1, 0, 6)
    scores = make_scores((2, 6, 3, 9), torch.float32, generator(40))
    assert torch.equal(module(scores, causal=True), attention_softmax(scores, causal=True))
    assert "total_heads=6" in repr(module)


@pytest.mark.parametrize("total,world", sorted(PARTITIONS))
def test_tpsoftmax_takes_its_block_from_head_partition(total, world):
    for rank, (offset, count) in enumerate(PARTITIONS[(total, world)]):
        module = TPSoftmax(total, rank=rank, world_size=world)
        assert (module.head_offset, module.local_heads) == (offset, count)


def test_tpsoftmax_argument_errors():
    with pytest.raises(ValueError, match="rank"):
        TPSoftmax(8, rank=1)
    with pytest.raises(ValueError, match="rank"):
        TPSoftmax(8, world_size=2)
    with pytest.raises(ValueError, match="total_heads"):
        TPSoftmax(3, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        TPSoftmax(8, rank=2, world_size=2)
    if not torch.distributed.is_initialized():
        with pytest.raises(ValueError, match="process group"):
            TPSoftmax(8, group=object())


@pytest.mark.parametrize("local", [2, 4, 14])
def test_tpsoftmax_checks_the_local_head_count(local):
    module = TPSoftmax(14, rank=3, world_size=4)  # owns 3 heads
    with pytest.raises(ValueError) as info:
        module(torch.randn(1, local, 2, 5))
    message = str(info.value)
    assert f"{local} heads" in message and "3 of 14" in message


def test_tpsoftmax_refuses_head_offset_and_bad_scores():
    module = TPSoftmax(4, rank=1, world_size=2)
    with pytest.raises(TypeError, match="head_offset"):
        module(torch.randn(1, 2, 2, 5), head_offset=2)
    with pytest.raises(ValueError, match="scores"):
        module(torch.randn(2, 2, 5))


def test_tpsoftmax_mask_with_a_wrong_head_count():
    module = TPSoftmax(14, rank=1, world_size=4)
    with pytest.raises(ValueError, match="mask"):
        module(torch.randn(1, 4, 2, 5), mask=torch.zeros(1, 4, 2, 5))  # local, not global, heads


# Global arguments a rank must slice: (id, builder(b, total, q, k, gen)).
GLOBAL_ARGUMENTS = [
    ("alibi [B*HT,1,K]", lambda b, t, q, k, g: dict(alibi=make_alibi((b * t, 1, k), torch.float32, g))),
    ("alibi [B*HT,Q,K]", lambda b, t, q, k, g: dict(alibi=make_alibi((b * t, q, k), torch.float16, g))),
    ("alibi [1,HT,1,K]", lambda b, t, q, k, g: dict(alibi=make_alibi((1, t, 1, k), torch.float32, g))),
    ("alibi [B,HT,Q,K]", lambda b, t, q, k, g: dict(alibi=make_alibi((b, t, q, k), torch.float32, g))),
    ("slopes [HT]", lambda b, t, q, k, g: dict(alibi_slopes=make_slopes((t,), g))),
    ("slopes [B,HT]", lambda b, t, q, k, g: dict(alibi_slopes=make_slopes((b, t), g))),
    ("mask [B,HT,Q,K] bool", lambda b, t, q, k, g: dict(mask=make_mask((b, t, q, k), torch.bool, g))),
    ("mask [1,HT,1,K] float", lambda b, t, q, k, g: dict(mask=make_mask((1, t, 1, k), torch.float32, g))),
    ("mask [HT,Q,K] float", lambda b, t, q, k, g: dict(mask=make_mask((t, q, k), torch.float16, g))),
    ("mask [B,1,1,K] bool", lambda b, t, q, k, g: dict(mask=make_mask((b, 1, 1, k), torch.bool, g))),
    ("mask [Q,K] float", lambda b, t, q, k, g: dict(mask=make_mask((q, k), torch.float32, g))),
]


def _local_mask(mask, offset, count):
    """The oracle's own slicing of a global per-head mask (head dim = dim -3)."""
    if mask is None or mask.dim() < 3 or mask.size(-3) == 1:
        return mask
    index = [slice(None)] * mask.dim()
    index[-3] = slice(offset, offset + count)
    return mask[tuple(index)]


@pytest.mark.parametrize("build", [a[1] for a in GLOBAL_ARGUMENTS], ids=[a[0] for a in GLOBAL_ARGUMENTS])
@pytest.mark.parametrize("total,world", [(14, 4), (7, 3), (12, 3)])
def test_tpsoftmax_slices_global_arguments(build, total, world):
    b, q, k = 2, 3, 29
    gen = generator(41)
    kwargs = build(b, total, q, k, gen)
    full = make_scores((b, total, q, k), torch.float32, gen)
    for rank, (offset, count) in enumerate(PARTITIONS[(total, world)]):
        scores = full[:, offset:offset + count].contiguous()
        out = TPSoftmax(total, rank=rank, world_size=world)(scores, causal=True, **kwargs)
        oracle_kwargs = dict(kwargs, mask=_local_mask(kwargs.get("mask"), offset, count))
        expected = oracle_softmax(scores, causal=True, head_offset=offset, **oracle_kwargs)
        assert_matches_oracle(out, expected, torch.float32)


def _sharded(full, total, world, **kwargs):
    outs = []
    for rank in range(world):
        module = TPSoftmax(total, rank=rank, world_size=world)
        offset, count = module.head_offset, module.local_heads
        outs.append(module(full[:, offset:offset + count].contiguous(), **kwargs))
    return torch.cat(outs, dim=1)


SHARDING_CASES = [
    # (id, (B, HT, Q, K), builder of the global keyword arguments)
    ("prefill causal", (2, 14, 33, 33), lambda b, t, q, k, g: dict(causal=True)),
    ("decode alibi tensor pad mask", (3, 14, 1, 257),
     lambda b, t, q, k, g: dict(alibi=make_alibi((b * t, 1, k), torch.float32, g),
                                mask=make_mask((b, 1, 1, k), torch.float32, g))),
    ("chunk slopes window", (2, 12, 5, 129),
     lambda b, t, q, k, g: dict(alibi_slopes=make_slopes((t,), g), causal=True, window=17)),
    ("per-head bool mask", (2, 7, 4, 50), lambda b, t, q, k, g: dict(mask=make_mask((b, t, q, k), torch.bool, g))),
    ("window only, slopes [B,HT]", (2, 9, 6, 1025),
     lambda b, t, q, k, g: dict(alibi_slopes=make_slopes((b, t), g), window=100, layer_scale=0.125)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d) for d in DTYPES])
@pytest.mark.parametrize("case", SHARDING_CASES, ids=[c[0] for c in SHARDING_CASES])
def test_sharded_equals_single_bit_for_bit(case, dtype):
    _, (b, total, q, k), build = case
    gen = generator(42)
    kwargs = build(b, total, q, k, gen)
    full = make_scores((b, total, q, k), dtype, gen)
    single = attention_softmax(full, **kwargs)
    for world in range(1, min(total, 5) + 1):
        sharded = _sharded(full, total, world, **kwargs)
        assert torch.equal(sharded, single), f"world size {world}: sharded differs from single"


@pytest.mark.parametrize("k", [4097, 40000])
def test_sharded_equals_single_with_one_row_per_rank(k):
    """A decode step with one head per rank: each shard is a single row."""
    gen = generator(43)
    full = make_scores((1, 4, 1, k), torch.float32, gen)
    single = attention_softmax(full)
    assert torch.equal(_sharded(full, 4, 4), single)
    slopes = make_slopes((4,), gen) * 1e-4  # small: every key must count in the row's sum
    single = attention_softmax(full, alibi_slopes=slopes, causal=True)
    assert torch.equal(_sharded(full, 4, 4, alibi_slopes=slopes, causal=True), single)
