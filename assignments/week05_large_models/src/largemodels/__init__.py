"""Week 5 assignment: splitting one model's work over several processes.

- `largemodels.tp_attention`: tensor-parallel attention, the heads split over the ranks (Megatron-LM).
- `largemodels.ulysses`: sequence-parallel attention, the sequence split over the ranks (DeepSpeed-Ulysses).

Import the modules themselves (`from largemodels.tp_attention import ...`): this file imports nothing, so a
mistake in one module cannot break the others. Every function here is called on every rank of a process group
that is already initialised (`common.distributed.launch`, or torchrun, did it).
"""
