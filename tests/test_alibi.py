"""alibi_slopes: the published BLOOM / MPT values, and their per-rank slices."""

import pytest
import torch

from tp_softmax import alibi_slopes, head_partition

# The slopes of Press et al. as BLOOM publishes them. With n a power of two they are
# 2**(-8k/n), k = 1..n; otherwise the n' = largest power of two below n come first, then the
# odd-numbered slopes of 2n' heads (2**(-4(2m+1)/n')).
SLOPES_8 = [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]
SLOPES_12 = SLOPES_8 + [0.7071067811865476, 0.3535533905932738, 0.1767766952966369, 0.08838834764831845]
SLOPES_16 = [
    0.7071067811865476, 0.5, 0.3535533905932738, 0.25, 0.1767766952966369, 0.125,
    0.08838834764831845, 0.0625, 0.04419417382415922, 0.03125, 0.02209708691207961, 0.015625,
    0.011048543456039806, 0.0078125, 0.005524271728019903, 0.00390625,
]
# BLOOM-176B: 64 slopes 2**(-k/8), then 48 slopes 2**(-(2m+1)/16).
SLOPES_112 = [2.0 ** (-k / 8) for k in range(1, 65)] + [2.0 ** (-(2 * m + 1) / 16) for m in range(48)]
PUBLISHED = {8: SLOPES_8, 12: SLOPES_12, 16: SLOPES_16, 112: SLOPES_112}


@pytest.mark.parametrize("heads", sorted(PUBLISHED))
def test_published_bloom_slopes(heads):
    got = alibi_slopes(heads)
    assert got.dtype == torch.float32 and got.shape == (heads,)
    torch.testing.assert_close(got, torch.tensor(PUBLISHED[heads], dtype=torch.float32), rtol=1e-6, atol=0)


def test_bloom_176b_spot_values():
    got = alibi_slopes(112)
    for index, value in [(0, 0.9170040432046712), (63, 0.00390625), (64, 0.9576032806985737),
                         (111, 0.01631677785042834)]:
        assert abs(got[index].item() - value) <= 1e-7 * value, index


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 6, 7, 9, 14, 20, 40, 56, 71, 96, 128])
def test_any_head_count(heads):
    got = alibi_slopes(heads).double()
    power = 1 << (heads.bit_length() - 1)
    expected = [2.0 ** (-8 * k / power) for k in range(1, power + 1)]
    expected += [2.0 ** (-4 * (2 * m + 1) / power) for m in range(heads - power)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    assert torch.all(got > 0) and torch.all(got < 1)
    assert len(set(got.tolist())) == heads, "every head needs its own slope"


@pytest.mark.parametrize("heads,world", [(8, 2), (12, 5), (14, 4), (16, 3), (112, 8), (112, 3), (7, 7), (71, 4)])
def test_per_rank_slices_concatenate_to_the_global_slopes(heads, world):
    """Each rank slices the global slopes at its head_partition block (not with the local head
    count, not with ceil(heads / world)); together they are the global slopes."""
    global_slopes = alibi_slopes(heads)
    blocks = [head_partition(heads, world, rank) for rank in range(world)]
    pieces = [global_slopes[offset:offset + count] for offset, count in blocks]
    assert torch.equal(torch.cat(pieces), global_slopes)
    if heads in PUBLISHED:
        torch.testing.assert_close(torch.cat(pieces), torch.tensor(PUBLISHED[heads], dtype=torch.float32),
                                   rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError), ("8", TypeError)])
def test_bad_head_count(bad, error):
    with pytest.raises(error, match="total_heads"):
        alibi_slopes(bad)
