"""An independent float64 statement of SPEC.md section 1, for the tests.

Written as plainly as possible and sharing nothing with ``tp_softmax``: it reads the raw user
arguments (global alibi tensor or slopes, a mask of any broadcast shape, head_offset) and
walks the rows one by one, doing every step of the contract in float64 NumPy:

    x[j] = scores[b,h,i,j] * layer_scale + bias[b,g,i,j] + mask[b,h,i,j]     g = head_offset + h
    x[j] = -inf where key j is hidden (bool mask False, causal, window)
    out[b,h,i,:] = softmax(x), or all zeros when every x[j] is -inf

The only vectorisation is over the keys j of one row.
"""

import math

import numpy as np
import torch

__all__ = ["oracle_softmax"]


def _numpy(t):
    """A float64 (or bool) NumPy copy of a tensor, whatever its dtype, strides or device."""
    if t.dtype == torch.bool:
        return t.detach().cpu().numpy().copy()
    return t.detach().cpu().to(torch.float64).numpy().copy()


def _pick(array, index):
    """``array[index]`` under broadcasting: leading dims missing, size-1 dims read at 0.

    ``index`` is the full index of the target, except its last dim (the keys), which stays
    whole: the result is one row, of the array's own length in the last dim (1 or K).
    """
    lead = len(index) - (array.ndim - 1)
    assert lead >= 0, "more dims than the target"
    row = array
    for i in index[lead:]:
        row = row[0 if row.shape[0] == 1 else i]
    return row


def _alibi_row(alibi, b, g, i, batch):
    """Row ``(b, g, i)`` of the global alibi tensor, 3-D batch-major or 4-D."""
    if alibi.ndim == 3:
        heads = alibi.shape[0] // batch
        plane = alibi[b * heads + g]
        return plane[0 if plane.shape[0] == 1 else i]
    assert alibi.ndim == 4
    block = alibi[0 if alibi.shape[0] == 1 else b]
    plane = block[g]
    return plane[0 if plane.shape[0] == 1 else i]


def _slope(slopes, b, g):
    if slopes.ndim == 1:
        return slopes[g]
    return slopes[0 if slopes.shape[0] == 1 else b][g]


def oracle_softmax(scores, *, layer_scale=1.0, alibi=None, alibi_slopes=None, mask=None,
                   causal=False, window=None, head_offset=0):
    """The contract's output for these arguments, as a float64 CPU tensor ``[B, H, Q, K]``."""
    batch, heads, q_len, k_len = scores.shape
    s = _numpy(scores)
    bias = None if alibi is None else _numpy(alibi)
    slopes = None if alibi_slopes is None else _numpy(alibi_slopes)
    m = None if mask is None else _numpy(mask)
    keys = np.arange(k_len)
    out = np.zeros((batch, heads, q_len, k_len), dtype=np.float64)
    for b in range(batch):
        for h in range(heads):
            g = head_offset + h
            for i in range(q_len):
                p = i + k_len - q_len  # absolute position of query row i (bottom-right)
                x = s[b, h, i, :] * layer_scale
                visible = np.ones(k_len, dtype=bool)
                if bias is not None:
                    x = x + _alibi_row(bias, b, g, i, batch)
                if slopes is not None:
                    x = x - _slope(slopes, b, g) * np.abs(p - keys)
                if m is not None:
                    row = _pick(m, (b, h, i))
                    if m.dtype == np.bool_:
                        visible &= np.broadcast_to(row, (k_len,))
                    else:
                        x = x + row
                if causal:
                    visible &= keys <= p
                if window is not None:
                    visible &= keys > p - window
                x = np.where(visible, x, -math.inf)
                if np.all(x == -math.inf):
                    continue  # no visible key: the row stays all zeros
                with np.errstate(invalid="ignore", over="ignore"):
                    e = np.exp(x - np.max(x))  # np.max propagates NaN: a NaN row stays NaN
                    out[b, h, i, :] = e / np.sum(e)
    return torch.from_numpy(out)
