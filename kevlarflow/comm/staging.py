"""How a tensor crosses a link: as it is, or staged through pinned host memory.

Gloo moves host memory only. A GPU tensor sent over Gloo is copied into a
pinned host buffer on a side stream, once the compute stream has produced
it; a buffer received over Gloo is copied to the GPU on the compute stream,
so the forward pass that reads it follows it with no host wait. NCCL links
and CPU tensors need neither: Direct passes them through."""
from __future__ import annotations

import torch


class Direct:
    """The link takes the tensor where it is (CPU over Gloo, GPU over NCCL)."""

    def __init__(self, device: torch.device):
        self.device = device

    def outgoing(self, tensor: torch.Tensor) -> torch.Tensor:
        """What the link sends: the bytes of `tensor`, ready to be read."""
        return tensor

    def incoming(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Where the link receives."""
        return torch.empty(shape, dtype=dtype, device=self.device)

    def arrived(self, buffer: torch.Tensor) -> torch.Tensor:
        """A received buffer as a tensor on this device."""
        return buffer


class PinnedHost(Direct):
    """A GPU's tensors over Gloo."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.stream = torch.cuda.Stream(device)

    def outgoing(self, tensor: torch.Tensor) -> torch.Tensor:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(self.stream)  # its memory is not reused before the copy
        # Gloo reads the buffer on its own thread, which knows no stream.
        self.stream.synchronize()
        return host

    def incoming(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def arrived(self, buffer: torch.Tensor) -> torch.Tensor:
        # On the current (compute) stream; torch's pinned allocator keeps the
        # buffer from reuse until the copy is done.
        return buffer.to(self.device, non_blocking=True)


def staging_for(device: torch.device, backend: str) -> Direct:
    if device.type == "cuda" and backend == "gloo":
        return PinnedHost(device)
    return Direct(device)
