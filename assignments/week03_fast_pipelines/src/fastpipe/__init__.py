"""Week 3 assignment: the pieces of a fast training pipeline, written from scratch.

- `fastpipe.loss_scaling`: static and dynamic loss scaling for fp16 training.
- `fastpipe.batching`: length-bucketed batches, first-fit-decreasing bin packing, packed sequences with a
  block-diagonal attention mask.
- `fastpipe.profiler`: a module-level forward/backward profiler with a wait/warmup/active schedule and a
  Chrome trace export.

Import the modules themselves (`from fastpipe.batching import ...`): this file imports nothing, so a mistake
in one module cannot break the others.
"""
