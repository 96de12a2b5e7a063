"""Week 5 assignment: one model's work over several processes, or one device's memory over time.

- `largemodels.offload`: a model larger than the GPU, one layer at a time from host memory.
- `largemodels.tp_attention`: tensor-parallel attention from a fused QKV weight (Megatron-LM, grouped-query).
- `largemodels.ulysses`: sequence-parallel attention, the sequence split over the ranks (DeepSpeed-Ulysses).
- `largemodels.pipeline`: one training step of a pipeline of any stages on the 1F1B schedule.

Import the modules themselves (`from largemodels.tp_attention import ...`): this file imports nothing, so a
mistake in one module cannot break the others.
"""
