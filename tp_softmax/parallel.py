"""Tensor parallelism: the head split rule and the per-rank softmax module."""

from typing import Optional, Tuple

import torch

__all__ = ["head_partition", "TPSoftmax", "group_rank_and_size"]


def head_partition(total_heads: int, world_size: int, rank: int) -> Tuple[int, int]:
    """Return ``(offset, count)``: the contiguous block of global heads owned by ``rank``.

    Heads are split in contiguous blocks; when ``total_heads % world_size != 0`` the first
    ``total_heads % world_size`` ranks get one extra head. This is the only place that knows
    the rule: head offsets, alibi slicing and weight sharding all ask it.

    Example: 14 heads on 4 ranks -> (0, 4), (4, 4), (8, 3), (11, 3).
    """
    for name, value in (("total_heads", total_heads), ("world_size", world_size), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"head_partition: {name} must be an int, got {type(value).__name__}")
    if world_size < 1:
        raise ValueError(f"head_partition: world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"head_partition: rank must be in [0, {world_size}), got {rank}")
    if total_heads < world_size:
        raise ValueError(
            f"head_partition: total_heads ({total_heads}) must be >= world_size ({world_size}): "
            "every rank needs at least one head"
        )
    base, extra = divmod(total_heads, world_size)
    count = base + (1 if rank < extra else 0)
    offset = rank * base + min(rank, extra)
    return offset, count


def group_rank_and_size(group=None, rank: Optional[int] = None,
                        world_size: Optional[int] = None) -> Tuple[int, int]:
    """Rank and world size in ``group``; explicit values win; no process group means (0, 1)."""
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither")
    if rank is not None:
        return rank, world_size
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialized")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class TPSoftmax(torch.nn.Module):
    """Attention softmax of one tensor-parallel rank.

    ``TPSoftmax(total_heads, group=None, *, rank=None, world_size=None)``: the rank and world
    size come from ``group`` (``None`` is the default group; without an initialised process
    group this is rank 0 of 1) or are given explicitly. The head block of this rank comes from
    :func:`head_partition`.

    ``forward(scores, **kwargs)`` takes the local scores ``[B, H_local, Q, K]`` and the keyword
    arguments of :func:`tp_softmax.attention_softmax` except ``head_offset``. ``alibi``,
    ``alibi_slopes`` and per-head masks are the *global* ones (all ``total_heads`` heads): this
    module slices them. A mask whose head dimension (dim -3) is ``total_heads`` is sliced to the
    local heads; a head dimension of 1 is broadcast.
    """

    def __init__(self, total_heads: int, group=None, *, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        super().__init__()
        self.rank, self.world_size = group_rank_and_size(group, rank, world_size)
        self.total_heads = total_heads
        self.head_offset, self.local_heads = head_partition(total_heads, self.world_size, self.rank)

    def extra_repr(self) -> str:
        return (f"total_heads={self.total_heads}, rank={self.rank}, world_size={self.world_size}, "
                f"heads=[{self.head_offset}, {self.head_offset + self.local_heads})")

    def local_mask(self, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Slice a global per-head mask (head dim = dim -3) to this rank's heads (a view)."""
        if mask is None or not isinstance(mask, torch.Tensor) or mask.dim() < 3:
            return mask
        heads = mask.size(-3)
        if heads == 1:
            return mask
        if heads != self.total_heads:
            raise ValueError(
                f"TPSoftmax: mask has {heads} heads in dim -3 (shape {tuple(mask.shape)}); "
                f"expected 1 or the global head count {self.total_heads}"
            )
        return mask.narrow(-3, self.head_offset, self.local_heads)

    def forward(self, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        from .ops import attention_softmax

        if "head_offset" in kwargs:
            raise TypeError("TPSoftmax.forward: head_offset comes from the process group; do not pass it")
        if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
            raise ValueError("TPSoftmax: scores must be a 4-D tensor [B, H_local, Q, K], got "
                             f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
        if scores.size(1) != self.local_heads:
            raise ValueError(
                f"TPSoftmax: scores has {scores.size(1)} heads in dim 1 (shape {tuple(scores.shape)}), "
                f"but rank {self.rank} of {self.world_size} owns {self.local_heads} of {self.total_heads} heads"
            )
        kwargs["mask"] = self.local_mask(kwargs.get("mask"))
        return attention_softmax(scores, head_offset=self.head_offset, **kwargs)
