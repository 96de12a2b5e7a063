"""Training a model that does not fit: where a step's memory goes, and the techniques that shrink it (week 5).

- anatomy: a predictor of a training step's memory (parameters, gradients, optimizer states, activations
  per layer, temporary buffers), each term a formula written out, checked against measured peaks.
- checkpointing: full and selective activation checkpointing applied to a plain model.
- offload: parameters streamed from pinned host memory with prefetch, optimizer states on the host,
  activations offloaded through saved-tensor hooks.
- probe: live tensor storage bytes and their peak, for the CPU, where the allocator keeps no statistics.
- sharded (week 6): one rank's memory under DDP, ZeRO-1, ZeRO-2 and FSDP2, predicted and measured.
"""
