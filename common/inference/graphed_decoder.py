"""A static-cache decoder that replays one hand-captured CUDA graph per input length.

    decoder = GraphedDecoder(model, batch_size=1, max_len=512)   # on a CUDA device
    logits = decoder.feed(prompt)     # the first feed of a length compiles, warms up and captures a graph
    logits = decoder.feed(token)      # later feeds of that length copy the tokens in and replay it
    decoder.rollback(n)               # as CachedDecoder: the graphs read the start position from the GPU

Why not `decoder.compile(mode="reduce-overhead")`, which also records CUDA graphs: every call of a compiled
module first runs Dynamo's guards and the bookkeeping of CUDA-graph trees (which graph, are its outputs
still alive, may it replay) on the host. That host time is paid per call, whatever the call's size. A
batch-1 decode step of a small model, or a draft model's step in speculative decoding, can take less GPU
time than that, and then the GPU waits for the host. A graph captured by hand is replayed by one driver
call: what is left on the host is a copy of the tokens, the start position written into a GPU tensor, and
the replay, a few microseconds each (torch.cuda.graphs). The forward inside is still compiled by
torch.compile, without its own CUDA graphs, so Inductor's fused kernels are what the graph replays. Where
the GPU's work dominates a call (the speculative benchmark's 16-layer fp32 target), there is little host
time to save; a draft's step is where it counts.

What capturing demands, and how the decoder meets it: a graph replays fixed kernels on fixed addresses, so
every input lives in a buffer kept beside the graph (the tokens, the start position), the cache is written in
place (CachedDecoder already does), and nothing in the forward may sync with the host (CachedDecoder's
forward does not). A new input length is a new graph; a decoding run sees a handful (the prompt, one
token, the k + 1 tokens of a speculative round, ...). Each graph's output is a buffer that its next
replay overwrites, so `feed` returns a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.inference.kv_cache import CachedDecoder
from common.models.llama import Llama

# Calls before a capture: the first compiles and autotunes, the next run as the graph will (allocations and
# cuBLAS workspaces settled), so that the capture records only the forward's kernels.
WARMUP_CALLS = 2


@dataclass
class _Graph:
    """One captured forward and the buffers it is replayed through: the input tokens it reads and the logits
    it writes (both must stay alive: a graph holds only addresses, and a freed buffer's memory would go to
    other tensors, which every replay would then read or overwrite)."""

    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor
    logits: torch.Tensor


class GraphedDecoder(CachedDecoder):
    """A CachedDecoder whose feeds replay a CUDA graph captured per input length (CUDA devices only).

    compile: run the forward through torch.compile (fullgraph, `dynamic` as given: None lets Dynamo turn a
    dimension dynamic when a second size appears, so a few compilations serve every length; False compiles
    each length for its own shape). Compilation happens at a length's first feed, so compiler settings that
    must hold (e.g. `fused_dequantization()`) must be active then. attention: as CachedDecoder's.
    """

    def __init__(
        self,
        model: Llama,
        batch_size: int,
        max_len: int,
        *,
        compile: bool = True,
        dynamic: bool | None = None,
        attention: str = "sdpa",
    ) -> None:
        device = model.tok_embeddings.weight.device
        if device.type != "cuda":
            raise ValueError(
                f"GraphedDecoder captures CUDA graphs, but the model is on {device}: use CachedDecoder there"
            )
        super().__init__(model, batch_size, max_len, attention)
        self.device = device
        self.start = torch.zeros((), dtype=torch.long, device=device)  # first position of the next feed
        self._forward = (
            torch.compile(self.forward, fullgraph=True, dynamic=dynamic) if compile else self.forward
        )
        self._graphs: dict[int, _Graph] = {}

    @torch.no_grad()  # inference: with autograd on, the compiled forward would also build a backward
    def _run(self, tokens: torch.Tensor) -> torch.Tensor:
        s = tokens.shape[1]
        self.start.fill_(self.length)  # a kernel with the value as argument: no host-device sync
        if s not in self._graphs:
            self._graphs[s] = self._capture(s)
        captured = self._graphs[s]
        captured.tokens.copy_(tokens)
        captured.graph.replay()
        return captured.logits.clone()  # the next replay overwrites the graph's own buffer

    def _capture(self, s: int) -> _Graph:
        """Warm the forward up for s tokens at positions start ... start + s - 1, then capture it.

        The warm-up calls write keys and values at exactly the positions the feed is about to write, so
        the valid cache (positions before start) is untouched. The positions are computed inside the graph
        from `start`, which `_run` fills before every replay."""
        tokens = torch.zeros(self.batch_size, s, dtype=torch.long, device=self.device)

        def forward() -> torch.Tensor:
            return self._forward(tokens, self.start + torch.arange(s, device=self.device))

        # Warm up on a side stream and capture on that same stream (as common.bench does), so that the
        # allocations and cuBLAS workspaces the capture meets are the ones the warm-up settled.
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                forward()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            logits = forward()
        current.wait_stream(side)
        return _Graph(graph, tokens, logits)
