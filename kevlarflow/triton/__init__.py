"""Triton kernels (optional dependency: ``pip install kevlarflow[triton]``)."""
from .paged_attention import paged_attention_triton

__all__ = ["paged_attention_triton"]
