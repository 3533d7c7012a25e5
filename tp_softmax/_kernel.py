"""Dispatch to the fused CUDA kernel: when it can run, and how it is called."""

from typing import List

import torch

from . import _build
from .ops import Prepared

__all__ = ["unsupported_reasons", "environment_reasons", "run", "row_config"]

_KERNEL_MASK_DTYPES = (torch.bool, torch.float32)
_KERNEL_BIAS_DTYPES = (torch.float32,)
_fakes_registered = False


def environment_reasons(device=None) -> List[str]:
    """Why the kernel cannot run on this machine / device (empty when it can)."""
    reasons = []
    if not torch.cuda.is_available():
        return ["CUDA is not available"]
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else device
    major, minor = torch.cuda.get_device_capability(dev)
    if major < 9:
        reasons.append(f"{torch.cuda.get_device_name(dev)} has compute capability {major}.{minor}; "
                       "the kernel needs 9.0 or newer (thread-block clusters)")
    if not reasons and not _load():
        reasons.append(f"the CUDA extension could not be built or loaded ({_build.load_error()})")
    return reasons


def _load() -> bool:
    global _fakes_registered
    ok = _build.load()
    if ok and not _fakes_registered:
        _register_fakes()
        _fakes_registered = True
    return ok


def _register_fakes() -> None:
    @torch.library.register_fake("tp_softmax::attention_softmax")
    def _(scores, mask, bias, slopes, layer_scale, causal, window):
        return scores.new_empty(scores.shape)

    @torch.library.register_fake("tp_softmax::attention_softmax_")
    def _(scores, mask, bias, slopes, layer_scale, causal, window):
        return None


def unsupported_reasons(p: Prepared) -> List[str]:
    """Why this call cannot take the kernel (empty list: it can)."""
    reasons = environment_reasons(p.scores.device)
    if p.scores.size(-1) >= 2 ** 31:
        reasons.append(f"K = {p.scores.size(-1)} >= 2^31")
    return reasons


def _kernel_operand(t, allowed, scores_dtype):
    """Masks / biases of another float dtype are read as float32 (a copy of the un-expanded view)."""
    if t is None or t.dtype in allowed or t.dtype == scores_dtype:
        return t
    return t.to(torch.float32)


def run(p: Prepared) -> torch.Tensor:
    mask = _kernel_operand(p.mask, _KERNEL_MASK_DTYPES, p.scores.dtype)
    bias = _kernel_operand(p.bias, _KERNEL_BIAS_DTYPES, p.scores.dtype)
    window = 0 if p.window is None else p.window
    if p.inplace:
        torch.ops.tp_softmax.attention_softmax_(p.scores, mask, bias, p.slopes, p.layer_scale, p.causal, window)
        return p.scores
    return torch.ops.tp_softmax.attention_softmax(p.scores, mask, bias, p.slopes, p.layer_scale, p.causal, window)


def row_config(k_len: int, dtype: torch.dtype, two_operands: bool = False) -> str:
    """How the kernel computes a row of ``k_len`` keys in ``dtype`` (one read or two);
    ``two_operands``: the call reads both a mask and an alibi tensor (4 chunks per thread, not 8)."""
    if not _load():
        return f"unavailable: {_build.load_error()}"
    return torch.ops.tp_softmax.row_config(k_len, dtype, two_operands)
