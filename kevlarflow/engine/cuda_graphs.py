"""Decode steps at static, padded shapes, replayed from CUDA graphs.

A pure decode step (one token per sequence) of n sequences runs at the
smallest size S of batch_sizes() that holds it. Its inputs are written into
static buffers made once, as large as the largest size: token ids (first
stage) or hidden states, positions, slot mapping, block tables as wide as the
blocks of the longest context a padded step holds (max_context / block_size),
seq lens, query start offsets and, on the last stage, the rows to compute
logits for. The forward pass reads the first S rows of each: a fixed set of
addresses and shapes per size, so that a CUDA graph captured once per size
replays it.

Rows n..S-1 are padding: slot -1 (reshape_and_cache skips it, so they write
no K/V) and a context of one token at position 0 of block 0 (something to
attend to, never written by them). Every op of the forward pass works row by
row (matmuls, norms, RoPE) or sequence by sequence (attention), so padding
cannot change a real row; only the real rows' outputs are returned.

PaddedDecode runs that padded, static-shape forward eagerly: on the CPU it
is how the padding is tested, and on a GPU the reference for the graphs.
GraphedDecode captures it on CUDA and replays it.
"""
from __future__ import annotations

import contextlib
import time

import torch

from kevlarflow.model.attention_metadata import AttentionMetadata
from kevlarflow.model.stage import DecoderStage

Chunk = tuple[int, int, list[int]]  # (tokens, first position, block table)

# The longest context a graph replays (as vLLM's max_seq_len_to_capture): a
# graph's attention launches work for max_context keys per sequence, most of
# it idle at short contexts; decode steps past it run eagerly. Models with
# 128k positions would otherwise pay for 128k at every step.
MAX_GRAPH_CONTEXT = 8192

# Rows of the int64 buffer.
_POSITIONS, _SLOTS, _ROWS, _IDS = range(4)


def batch_sizes(max_num_seqs: int) -> list[int]:
    """The padded sizes: 1, 2, 4, 8, then multiples of 8, up to max_num_seqs
    (itself the last). At most 7 padding rows past 8 sequences."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs]
    sizes += range(8, max_num_seqs, 8)
    return sizes + [max_num_seqs]


class PaddedDecode:
    """Decode steps of a stage on its KV caches at static, padded shapes, run
    eagerly. Call it with a step's inputs; None when the step is not a pure
    decode step it can hold (the caller runs it as usual)."""

    def __init__(self, stage: DecoderStage, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 block_size: int, max_num_seqs: int, max_context: int,
                 attention_backend: str = "native"):
        self.stage, self.kv_caches, self.block_size = stage, kv_caches, block_size
        self.attention_backend = attention_backend
        self.device = kv_caches[0][0].device
        self.sizes = batch_sizes(max_num_seqs)
        self.max_context = max_context
        self.max_blocks = -(-max_context // block_size)
        cap = self.sizes[-1]
        cfg = stage.cfg
        # Made in inference mode like the forward pass's own tensors: they
        # are written in place inside it.
        with torch.inference_mode(), torch.device(self.device):
            # Positions, slots, sampled rows, token ids: one buffer, one copy.
            self._index = torch.zeros(4, cap, dtype=torch.int64)
            # Seq lens, then the block tables: one buffer, one copy of the
            # prefix a step uses.
            self._int32 = torch.zeros(cap * (1 + self.max_blocks), dtype=torch.int32)
            self.query_start_loc = torch.arange(cap + 1, dtype=torch.int32)
            self.hidden = None if stage.spec.is_first else \
                torch.zeros(cap, cfg.hidden_size, dtype=cfg.dtype)
        if self.device.type == "cuda":
            # Filled on the host, then one asynchronous copy each: nothing in
            # a step waits for the GPU.
            self._host_index = torch.zeros(self._index.shape, dtype=torch.int64, pin_memory=True)
            self._host_int32 = torch.zeros(self._int32.shape, dtype=torch.int32, pin_memory=True)
            self._copied = torch.cuda.Event()
        else:
            self._host_index, self._host_int32 = self._index, self._int32
        with torch.inference_mode(), self._on_device():
            self._fill_padding(0, cap)
            self._upload(cap)

    # Sizes -------------------------------------------------------------------

    def size_for(self, chunks: list[Chunk]) -> int | None:
        """The padded size of a pure decode step, None for any other step
        (a prefill chunk, more sequences than the largest size, a context
        past max_context)."""
        if not chunks or len(chunks) > self.sizes[-1]:
            return None
        if any(n != 1 or begin >= self.max_context for n, begin, _ in chunks):
            return None
        return next(s for s in self.sizes if s >= len(chunks))

    # One step ----------------------------------------------------------------

    def __call__(self, inputs: torch.Tensor, chunks: list[Chunk],
                 rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """inputs: token ids (first stage) or hidden states, one per chunk,
        on the host or the device. rows (last stage): the rows to return
        logits for, None for all. Returns what the stage would return for
        the unpadded step; None if it is not a decode step that fits."""
        size = self.size_for(chunks)
        if size is None:
            return None
        with torch.inference_mode(), self._on_device():
            real = self._fill(inputs, chunks, rows, size)
            return self._run(size, real)

    def _run(self, size: int, real: int) -> torch.Tensor:
        return self._forward(size)[:real]

    def _forward(self, size: int) -> torch.Tensor:
        """The stage on the first `size` rows of the static buffers."""
        index, mb = self._index, self.max_blocks
        cap = self.sizes[-1]
        meta = AttentionMetadata(
            positions=index[_POSITIONS, :size], slot_mapping=index[_SLOTS, :size],
            block_tables=self._int32[cap:cap + size * mb].view(size, mb),
            seq_lens=self._int32[:size], query_start_loc=self.query_start_loc[:size + 1],
            max_query_len=1)
        inputs = index[_IDS, :size] if self.hidden is None else self.hidden[:size]
        rows = index[_ROWS, :size] if self.stage.spec.is_last else None
        return self.stage(inputs, meta, self.kv_caches, logits_indices=rows,
                          attention_backend=self.attention_backend)

    def _on_device(self):
        # Copies and replays go to this device's current stream, whichever
        # device is the caller's current one.
        return torch.cuda.device(self.device) if self.device.type == "cuda" \
            else contextlib.nullcontext()

    # Filling the buffers -------------------------------------------------------

    def _fill(self, inputs: torch.Tensor, chunks: list[Chunk], rows: torch.Tensor | None,
              size: int) -> int:
        """Write a step into the buffers, padded to size; the number of rows
        it returns (sampled rows on the last stage, else one per chunk)."""
        n, bs, cap = len(chunks), self.block_size, self.sizes[-1]
        if inputs.shape[0] != n:
            raise ValueError(f"{inputs.shape[0]} input rows for {n} decode chunks")
        last = self.stage.spec.is_last
        real = n if rows is None or not last else rows.numel()
        self._wait_for_upload()
        host = self._host_index
        positions = [begin for _, begin, _ in chunks]
        host[_POSITIONS, :n] = torch.tensor(positions, dtype=torch.int64)
        host[_SLOTS, :n] = torch.tensor([table[p // bs] * bs + p % bs
                                         for p, (_, _, table) in zip(positions, chunks)],
                                        dtype=torch.int64)
        host_int32 = self._host_int32
        host_int32[:n] = torch.tensor([p + 1 for p in positions], dtype=torch.int32)
        # Only the blocks a context covers: the kernels read no column past
        # them, so what earlier steps left there does not matter.
        width = max(positions) // bs + 1
        tables = host_int32[cap:cap + n * self.max_blocks].view(n, self.max_blocks)
        tables[:, :width] = torch.tensor(
            [table[:p // bs + 1] + [0] * (width - p // bs - 1)
             for p, (_, _, table) in zip(positions, chunks)], dtype=torch.int32)
        self._fill_padding(n, size)
        if last:
            host[_ROWS, :size] = 0  # padding rows of the logits: any real row
            if rows is None:
                host[_ROWS, :n] = torch.arange(n)
            elif not rows.is_cuda:
                host[_ROWS, :real] = rows
        if self.hidden is None and not inputs.is_cuda:
            host[_IDS, :n] = inputs
        self._upload(size)
        # What is already on the device is copied there, after the upload.
        if self.hidden is not None:
            self.hidden[:n].copy_(inputs)
        elif inputs.is_cuda:
            self._index[_IDS, :n].copy_(inputs)
        if last and rows is not None and rows.is_cuda:
            self._index[_ROWS, :real].copy_(rows)
        return real

    def _fill_padding(self, begin: int, end: int) -> None:
        """Rows begin..end-1 of the host buffers become padding rows."""
        host, cap = self._host_index, self.sizes[-1]
        host[_POSITIONS, begin:end] = 0
        host[_SLOTS, begin:end] = -1          # reshape_and_cache skips them
        host[_IDS, begin:end] = 0
        self._host_int32[begin:end] = 1        # one key: position 0...
        tables = self._host_int32[cap:].view(cap, self.max_blocks)
        tables[begin:end, 0] = 0               # ...of block 0

    def _upload(self, size: int) -> None:
        if self._host_index is self._index:
            return
        cap = self.sizes[-1]
        self._index.copy_(self._host_index, non_blocking=True)
        used = cap + size * self.max_blocks
        self._int32[:used].copy_(self._host_int32[:used], non_blocking=True)
        self._copied.record()

    def _wait_for_upload(self) -> None:
        """The host buffers are rewritten only once the previous step's copy
        from them is done (it almost always is: its results were used)."""
        if self._host_index is not self._index and not self._copied.query():
            self._copied.synchronize()


class GraphedDecode(PaddedDecode):
    """PaddedDecode replayed from one CUDA graph per size, all captured by
    capture() into one memory pool."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.replays = 0  # decode steps run from a graph
        self.capture_s = 0.0

    def capture(self) -> None:
        """Capture every size, largest first: the pool's memory, freed at the
        end of a capture, is reused by the smaller graphs captured after it.
        Every row is padding meanwhile, so no capture writes K/V."""
        start = time.perf_counter()
        with torch.inference_mode(), torch.cuda.device(self.device):
            self._wait_for_upload()
            self._fill_padding(0, self.sizes[-1])
            self._upload(self.sizes[-1])
            pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            for size in reversed(self.sizes):
                # A run before the capture, on a side stream as torch asks:
                # kernels compile (Triton) and lazy initialisation happens
                # outside the graph.
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self._forward(size)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=side):
                    self._outputs[size] = self._forward(size)
                self.graphs[size] = graph
            torch.cuda.current_stream().synchronize()
        self.capture_s = time.perf_counter() - start

    def _run(self, size: int, real: int) -> torch.Tensor:
        graph = self.graphs.get(size)
        if graph is None:  # not captured (yet): the same step, eagerly
            return super()._run(size, real)
        graph.replay()
        self.replays += 1
        # A copy: the next replay overwrites the graph's output (so may the
        # other sizes' graphs, whose pool memory it may share), while a
        # caller may still hold this one (a send to the next stage).
        return self._outputs[size][:real].clone()
