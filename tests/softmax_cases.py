"""Inputs and the comparison rule shared by the CPU tests of attention_softmax.

Layouts are named by their shape, with ``HT`` the global (total) head count and ``H`` the
local one. Every tensor is made from an explicit ``torch.Generator``.
"""

import torch

from oracle import oracle_softmax

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# One tolerance per dtype, for |out - oracle| <= atol + rtol * |oracle| (float64 oracle).
# fp16 / bf16: two units of rounding of the stored result (2**-10, 2**-7 relative), the only
# error that matters once everything is computed in float32. fp32: each term of x is rounded
# to float32 (relative 6e-8 of |x|, and |x| reaches a few hundred with alibi), so allow 1e-4.
TOLERANCE = {
    torch.float16: dict(atol=1e-5, rtol=2.0 ** -10),
    torch.bfloat16: dict(atol=1e-5, rtol=2.0 ** -7),
    torch.float32: dict(atol=1e-6, rtol=1e-4),
}

MASK_LAYOUTS = {
    "[B,1,1,K]": lambda b, h, q, k: (b, 1, 1, k),
    "[B,1,Q,K]": lambda b, h, q, k: (b, 1, q, k),
    "[1,1,Q,K]": lambda b, h, q, k: (1, 1, q, k),
    "[B,H,Q,K]": lambda b, h, q, k: (b, h, q, k),
    "[1,H,1,K]": lambda b, h, q, k: (1, h, 1, k),
    "[B,1,Q,1]": lambda b, h, q, k: (b, 1, q, 1),
    "[H,Q,K]": lambda b, h, q, k: (h, q, k),
    "[Q,K]": lambda b, h, q, k: (q, k),
    "[K]": lambda b, h, q, k: (k,),
}
MASK_DTYPES = (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64)

ALIBI_LAYOUTS = {
    "[B*HT,1,K]": lambda b, ht, q, k: (b * ht, 1, k),
    "[B*HT,Q,K]": lambda b, ht, q, k: (b * ht, q, k),
    "[1,HT,1,K]": lambda b, ht, q, k: (1, ht, 1, k),
    "[1,HT,Q,K]": lambda b, ht, q, k: (1, ht, q, k),
    "[B,HT,1,K]": lambda b, ht, q, k: (b, ht, 1, k),
    "[B,HT,Q,K]": lambda b, ht, q, k: (b, ht, q, k),
}
SLOPE_LAYOUTS = {
    "[HT]": lambda b, ht: (ht,),
    "[1,HT]": lambda b, ht: (1, ht),
    "[B,HT]": lambda b, ht: (b, ht),
}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_scores(shape, dtype, gen) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * 3).to(dtype)


def make_mask(shape, dtype, gen) -> torch.Tensor:
    """bool: about a quarter of the keys hidden; float: N(0, 2) with about 15% -inf."""
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.25
    values = torch.randn(shape, generator=gen) * 2
    values[torch.rand(shape, generator=gen) < 0.15] = float("-inf")
    return values.to(dtype)


def make_alibi(shape, dtype, gen) -> torch.Tensor:
    """A BLOOM-like bias ``slope * j`` (slope < 0.1) plus noise, for every (row, head)."""
    k = shape[-1]
    slope = torch.rand(shape[:-1] + (1,), generator=gen) * 0.1
    noise = torch.randn(shape, generator=gen) * 0.5
    return (slope * torch.arange(k, dtype=torch.float32) + noise).to(dtype)


def make_slopes(shape, gen) -> torch.Tensor:
    return torch.rand(shape, generator=gen) * 0.9 + 0.05


def assert_matches_oracle(out: torch.Tensor, expected: torch.Tensor, dtype) -> None:
    """``out`` (from the op) against the float64 oracle, with the tolerance of ``dtype``."""
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    assert out.shape == expected.shape, f"output shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    got = out.detach().cpu().to(torch.float64)
    nan_got, nan_expected = got.isnan(), expected.isnan()
    assert torch.equal(nan_got, nan_expected), (
        f"NaN at {nan_got.sum().item()} positions, the oracle has {nan_expected.sum().item()}"
    )
    hidden = expected == 0
    assert torch.all(got[hidden] == 0), (
        f"{int((got[hidden] != 0).sum())} entries that must be exactly 0 are not "
        f"(max {got[hidden].abs().max().item():.3g})"
    )
    torch.testing.assert_close(got, expected, equal_nan=True, **TOLERANCE[dtype])


def check_against_oracle(scores: torch.Tensor, **kwargs) -> torch.Tensor:
    """Run the op and the oracle on the same arguments; compare; return the op's output."""
    from tp_softmax import attention_softmax

    expected = oracle_softmax(scores, **{k: v for k, v in kwargs.items() if k != "inplace"})
    out = attention_softmax(scores, **kwargs)
    assert_matches_oracle(out, expected, scores.dtype)
    return out
