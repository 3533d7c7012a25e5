"""tp_softmax: the attention softmax of tensor-parallel transformer inference."""

from .alibi import alibi_slopes
from .ops import attention_softmax
from .parallel import TPSoftmax, head_partition

__all__ = ["attention_softmax", "alibi_slopes", "head_partition", "TPSoftmax"]
__version__ = "0.1.0"
