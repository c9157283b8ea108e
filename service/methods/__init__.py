"""Parameter-efficient methods, one module each, registered by name in `base.REGISTRY`."""
from service.methods import adapter, demos, exits, head, lora, prefix, prompt, verbalizer  # noqa: F401  (import registers)
from service.methods.base import REGISTRY, Method, MethodBatch, TaskWeights

__all__ = ["REGISTRY", "Method", "MethodBatch", "TaskWeights"]
