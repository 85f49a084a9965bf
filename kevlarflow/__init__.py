"""KevlarFlow: a fault-tolerant LLM serving engine."""
from kevlarflow import ops  # noqa: F401  (registers torch.ops.kevlarflow.*)

__version__ = "0.1.0"
