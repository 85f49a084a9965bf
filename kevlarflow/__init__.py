"""KevlarFlow: a fault-tolerant LLM serving engine."""
from kevlarflow import ops  # noqa: F401  (registers torch.ops.kevlarflow.*)

__version__ = "0.1.0"

# The serving API pulls in transformers and the engine: loaded on first use, so
# that importing the kernels stays light.
_LAZY = {
    "LLM": "kevlarflow.engine.llm",
    "SamplingParams": "kevlarflow.engine.params",
    "AsyncEngine": "kevlarflow.engine.async_engine",
    "EngineConfig": "kevlarflow.engine.llm_engine",
    "LLMEngine": "kevlarflow.engine.llm_engine",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kevlarflow' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "AsyncEngine", "EngineConfig", "LLMEngine", "ops"]
