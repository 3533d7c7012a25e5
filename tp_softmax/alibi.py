"""ALiBi slopes (Press et al.), for any number of heads."""

import math

import torch

__all__ = ["alibi_slopes"]


def alibi_slopes(total_heads: int) -> torch.Tensor:
    """Return the standard ALiBi slopes of ``total_heads`` heads as float32 ``[total_heads]``.

    For a power of two ``n`` the slopes are ``2**(-8 * (k + 1) / n)`` for ``k = 0 .. n - 1``.
    For other head counts (BLOOM / MPT formula) the slopes of the largest power of two
    ``n <= total_heads`` come first, followed by every other slope of ``2 * n`` heads
    (odd positions) until ``total_heads`` slopes are produced.

    These are the slopes of all heads (global); a tensor-parallel rank uses
    ``slopes[offset:offset + count]`` with ``(offset, count) = head_partition(...)``.
    """
    if isinstance(total_heads, bool) or not isinstance(total_heads, int):
        raise TypeError(f"alibi_slopes: total_heads must be an int, got {type(total_heads).__name__}")
    if total_heads < 1:
        raise ValueError(f"alibi_slopes: total_heads must be >= 1, got {total_heads}")
    closest = 2 ** math.floor(math.log2(total_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (k + 1) for k in range(closest)]
    if closest != total_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        extra = total_heads - closest
        slopes += [extra_base ** (2 * k + 1) for k in range(extra)]
    return torch.tensor(slopes, dtype=torch.float32)
