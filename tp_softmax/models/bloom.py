"""A small tensor-parallel BLOOM built from a Hugging Face ``BloomForCausalLM``.

What is split across the ranks of the tensor-parallel group, and how:

=========================  ==============================================================
fused QKV projection       by heads, with :func:`tp_softmax.head_partition` (uneven splits
                           included): BLOOM lays the output dim out as ``[H, 3, head_dim]``,
                           so a rank takes the rows of its heads, q, k and v together
attention softmax          :class:`tp_softmax.TPSoftmax` with the *global* ALiBi slopes, a
                           bottom-right causal mask and the padding mask ``[B, 1, 1, K]``
attention output proj.     row-parallel (the input columns of the local heads), all-reduce,
                           then the bias, once
MLP                        ``dense_h_to_4h`` column-parallel, ``dense_4h_to_h`` row-parallel
                           with an all-reduce; the ``4 * hidden`` width is split with the
                           same contiguous-block rule as the heads (``head_partition``)
embeddings, LM head,       replicated (the Hugging Face modules themselves, not copies)
layer norms
=========================  ==============================================================

ALiBi: BLOOM adds ``slope * (position of key j)``, where positions count only the visible
(non-padding) tokens. For a query at padded index ``p`` and a visible key ``j <= p`` this
is ``slope * (j - pad_b)``, while tp_softmax's ``-slope * |p - j|`` is ``slope * (j - p)``:
they differ by ``slope * (p - pad_b)``, a constant of the row, so the softmax is the same.

Usage::

    model = TPBloomForCausalLM.from_hf(hf_model, group)       # every rank, same hf_model
    logits, cache = model(input_ids, attention_mask)          # prefill
    logits, cache = model(next_ids, attention_mask, cache)    # decode, Q == 1
"""

import math
import weakref
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..alibi import alibi_slopes
from ..parallel import TPSoftmax, group_rank_and_size, head_partition

__all__ = ["TPBloomAttention", "TPBloomMLP", "TPBloomBlock", "TPBloomForCausalLM", "KVCache"]

KVCache = List[Tuple[torch.Tensor, torch.Tensor]]  # per layer: k, v [B, H_local, K, head_dim]


def _group_handle(group):
    """A callable returning ``group`` without keeping it alive. A model that outlives
    ``destroy_process_group()`` must not hold the default gloo group: PyTorch aborts at exit."""
    return (lambda: None) if group is None else weakref.ref(group)


def _all_reduce(x: torch.Tensor, group, world_size: int) -> torch.Tensor:
    if world_size > 1:
        torch.distributed.all_reduce(x, group=group)
    return x


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    """An ``nn.Linear`` that owns copies of ``weight`` ``[out, in]`` and ``bias`` ``[out]``."""
    layer = nn.Linear(weight.size(1), weight.size(0), bias=bias is not None,
                      device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class TPBloomAttention(nn.Module):
    """BLOOM self-attention on the heads ``[head_offset, head_offset + local_heads)`` of this rank."""

    def __init__(self, hf_attention: nn.Module, group, rank: int, world_size: int):
        super().__init__()
        total_heads = hf_attention.num_heads
        head_dim = hf_attention.head_dim
        hidden = hf_attention.hidden_size
        self.group, self.world_size = _group_handle(group), world_size
        self.head_offset, self.local_heads = head_partition(total_heads, world_size, rank)
        self.head_dim = head_dim
        heads = slice(self.head_offset, self.head_offset + self.local_heads)

        qkv = hf_attention.query_key_value
        w = qkv.weight.detach().view(total_heads, 3, head_dim, hidden)[heads]
        b = qkv.bias.detach().view(total_heads, 3, head_dim)[heads]
        self.query_key_value = _linear(w.reshape(-1, hidden), b.reshape(-1))

        dense = hf_attention.dense.weight.detach().view(hidden, total_heads, head_dim)[:, heads]
        self.dense = _linear(dense.reshape(hidden, -1), None)
        self.dense_bias = nn.Parameter(hf_attention.dense.bias.detach().clone(), requires_grad=False)

        self.softmax = TPSoftmax(total_heads, group, rank=rank, world_size=world_size)
        # The global slopes, float32 (a plain attribute: a dtype cast of the model leaves it alone).
        self.slopes = alibi_slopes(total_heads).to(qkv.weight.device)
        self.scale = 1.0 / math.sqrt(head_dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor,
                past: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """``x`` ``[B, Q, hidden]``, ``key_mask`` bool ``[B, 1, 1, K]`` (True = real token, K
        counts the cache), ``past`` the cached ``(k, v)`` ``[B, H_local, K - Q, head_dim]``.

        Returns the attention output before the residual ``[B, Q, hidden]`` (the same on
        every rank) and the new ``(k, v)``.
        """
        batch, q_len, _ = x.shape
        qkv = self.query_key_value(x).view(batch, q_len, self.local_heads, 3, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(3))  # [B, H_local, Q, head_dim]
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)

        if self.slopes.device != q.device:
            self.slopes = self.slopes.to(q.device)
        scores = torch.matmul(q, k.transpose(-1, -2))  # [B, H_local, Q, K]
        probs = self.softmax(scores, layer_scale=self.scale, alibi_slopes=self.slopes,
                             mask=key_mask, causal=True, inplace=not scores.requires_grad)
        context = torch.matmul(probs, v).transpose(1, 2).reshape(batch, q_len, -1)

        out = _all_reduce(self.dense(context), self.group(), self.world_size)
        return out + self.dense_bias, (k, v)


class TPBloomMLP(nn.Module):
    """BLOOM's MLP: ``dense_h_to_4h`` split by output rows, ``dense_4h_to_h`` by input columns."""

    def __init__(self, hf_mlp: nn.Module, group, rank: int, world_size: int):
        super().__init__()
        width = hf_mlp.dense_h_to_4h.out_features
        offset, count = head_partition(width, world_size, rank)
        cols = slice(offset, offset + count)
        self.group, self.world_size = _group_handle(group), world_size
        up, down = hf_mlp.dense_h_to_4h, hf_mlp.dense_4h_to_h
        self.dense_h_to_4h = _linear(up.weight.detach()[cols], up.bias.detach()[cols])
        self.dense_4h_to_h = _linear(down.weight.detach()[:, cols], None)
        self.dense_4h_to_h_bias = nn.Parameter(down.bias.detach().clone(), requires_grad=False)

    @staticmethod
    def gelu(x: torch.Tensor) -> torch.Tensor:
        """BLOOM's tanh approximation of GELU."""
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense_4h_to_h(self.gelu(self.dense_h_to_4h(x)))
        return _all_reduce(out, self.group(), self.world_size) + self.dense_4h_to_h_bias


class TPBloomBlock(nn.Module):
    def __init__(self, hf_block: nn.Module, group, rank: int, world_size: int):
        super().__init__()
        self.input_layernorm = hf_block.input_layernorm
        self.post_attention_layernorm = hf_block.post_attention_layernorm
        self.self_attention = TPBloomAttention(hf_block.self_attention, group, rank, world_size)
        self.mlp = TPBloomMLP(hf_block.mlp, group, rank, world_size)
        self.residual_post_layernorm = hf_block.apply_residual_connection_post_layernorm

    def forward(self, x, key_mask, past=None):
        normed = self.input_layernorm(x)
        attn, present = self.self_attention(normed, key_mask, past)
        x = attn + (normed if self.residual_post_layernorm else x)
        normed = self.post_attention_layernorm(x)
        x = self.mlp(normed) + (normed if self.residual_post_layernorm else x)
        return x, present


class TPBloomForCausalLM(nn.Module):
    """BLOOM for causal LM, tensor-parallel over ``group``; build it with :meth:`from_hf`."""

    def __init__(self, hf_model: nn.Module, group=None):
        super().__init__()
        config = hf_model.config
        if getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
            raise ValueError("slow_but_exact BLOOM checkpoints are not supported")
        self.rank, self.world_size = group_rank_and_size(group)
        hf = hf_model.transformer
        self.word_embeddings = hf.word_embeddings
        self.word_embeddings_layernorm = hf.word_embeddings_layernorm
        self.h = nn.ModuleList(TPBloomBlock(block, group, self.rank, self.world_size) for block in hf.h)
        self.ln_f = hf.ln_f
        self.lm_head = hf_model.lm_head

    @classmethod
    @torch.no_grad()
    def from_hf(cls, hf_model: nn.Module, group=None) -> "TPBloomForCausalLM":
        """Shard ``hf_model`` (a ``transformers.BloomForCausalLM``, the same on every rank) over
        ``group``: the tensor-parallel process group; ``None`` is the default group, or a single
        process when torch.distributed is not initialized."""
        return cls(hf_model, group).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> Tuple[torch.Tensor, KVCache]:
        """``input_ids`` ``[B, Q]``: the new tokens; ``attention_mask`` ``[B, K]`` (1 = real
        token, 0 = padding) over the cache *and* the new tokens, or None; ``cache`` from the
        previous call. Returns logits ``[B, Q, vocab]`` and the new cache.
        """
        batch, q_len = input_ids.shape
        past_len = cache[0][0].size(2) if cache else 0
        if attention_mask is None:
            key_mask = None
        else:
            if attention_mask.shape != (batch, past_len + q_len):
                raise ValueError(f"attention_mask must be [B, K] = {(batch, past_len + q_len)}, "
                                 f"got {tuple(attention_mask.shape)}")
            key_mask = attention_mask.bool()[:, None, None, :]
        x = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
        presents = []
        for i, block in enumerate(self.h):
            x, present = block(x, key_mask, cache[i] if cache else None)
            presents.append(present)
        return self.lm_head(self.ln_f(x)), presents
