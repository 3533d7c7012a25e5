"""The pure-PyTorch implementation of SPEC section 1.

This is the CPU path, the fallback on CUDA when the fused kernel cannot run, and the
definition the kernel is held to. It works on the normalised arguments that
:func:`tp_softmax.ops.prepare` produces (validated, 4-D broadcastable views, local heads).
Nothing here expands a broadcast mask or builds a ``[B, H, Q, K]`` boolean tensor: causal and
window masking is one ``[Q, K]`` index comparison.
"""

from typing import Optional

import torch

__all__ = ["hidden_keys", "alibi_distance", "softmax_reference"]


def _key_offsets(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """``[Q, K]`` ``j - p``: key j relative to query row i at absolute position ``p = i + K - Q``."""
    pos = torch.arange(q_len, device=device).unsqueeze(1) + (k_len - q_len)
    return torch.arange(k_len, device=device).unsqueeze(0) - pos


def hidden_keys(q_len: int, k_len: int, causal: bool, window: Optional[int],
                device: torch.device) -> Optional[torch.Tensor]:
    """``[Q, K]`` bool, True where causal / window masking hides key j from query row i.

    Bottom-right aligned: row i sits at absolute position ``p = i + K - Q``; causal hides
    ``j > p``; a window ``w`` hides ``j <= p - w``.
    """
    if not causal and window is None:
        return None
    rel = _key_offsets(q_len, k_len, device)
    if causal and window is not None:
        return (rel > 0) | (rel <= -window)
    if causal:
        return rel > 0
    return rel <= -window


def alibi_distance(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """``[Q, K]`` float32 ``|i + K - Q - j|`` (FlashAttention's ALiBi distance)."""
    return _key_offsets(q_len, k_len, device).abs().to(torch.float32)


def softmax_reference(scores: torch.Tensor, *, layer_scale: float = 1.0,
                      bias: Optional[torch.Tensor] = None,
                      slopes: Optional[torch.Tensor] = None,
                      mask: Optional[torch.Tensor] = None,
                      causal: bool = False, window: Optional[int] = None,
                      inplace: bool = False) -> torch.Tensor:
    """Masked, biased softmax over the last dim of ``scores`` ``[B, H, Q, K]``, in float32.

    ``bias``: float, broadcastable 4-D (the local heads' alibi). ``slopes``: float32
    ``[B|1, H]`` (the local heads' slopes). ``mask``: bool (True = attend) or float (added),
    broadcastable 4-D. The arguments are assumed validated (``ops.prepare``).
    """
    q_len, k_len = scores.shape[-2], scores.shape[-1]
    # A contiguous float32 copy, whatever the strides of scores: a row's bits must not depend
    # on the layout of the tensor it came in.
    x = scores.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    if x.numel() == 0:
        return scores if inplace else x.to(scores.dtype)
    if layer_scale != 1.0:
        x.mul_(layer_scale)
    if bias is not None:
        x.add_(bias)
    if slopes is not None:
        dist = alibi_distance(q_len, k_len, scores.device)
        x.addcmul_(slopes.unsqueeze(-1).unsqueeze(-1), dist, value=-1.0)
    if mask is not None:
        if mask.dtype == torch.bool:
            x.masked_fill_(mask.logical_not(), float("-inf"))
        else:
            x.add_(mask)
    hidden = hidden_keys(q_len, k_len, causal, window, scores.device)
    if hidden is not None:
        x.masked_fill_(hidden, float("-inf"))
    # A row with no visible key (max -inf) is all zeros, where torch.softmax gives NaN.
    no_key = x.amax(dim=-1, keepdim=True) == float("-inf")
    # torch.softmax reduces every row on its own, in the same order whatever B, H and Q are.
    # A plain x.sum(-1) does not: with a single row of K >= 32768 it splits the row across
    # threads, so a one-row shard would differ in the last bit from the same row in the full batch.
    x = torch.softmax(x, dim=-1).masked_fill_(no_key, 0.0)
    if inplace:
        return scores.copy_(x)
    return x.to(scores.dtype)
