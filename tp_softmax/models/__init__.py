"""Tensor-parallel models that use tp_softmax: small, readable examples to copy from.

``tp_softmax.models.bloom``: BLOOM (ALiBi) sharded from a Hugging Face ``BloomForCausalLM``;
it needs ``transformers`` only to build the model it shards.
"""

from .bloom import TPBloomForCausalLM

__all__ = ["TPBloomForCausalLM"]
