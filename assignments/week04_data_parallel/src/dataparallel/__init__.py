"""Week 4 assignment: data-parallel training from its parts, on top of torch.distributed.

- `dataparallel.printing`: printing from every rank in rank order.
- `dataparallel.sync_batchnorm`: SyncBatchNorm as an autograd Function, one collective per pass.
- `dataparallel.accumulation`: gradient accumulation that communicates only when the optimizer steps.
- `dataparallel.evaluation`: distributed evaluation that sees every sample exactly once.
- `dataparallel.hierarchical`: a two-level (node, then leaders) all-reduce.

Import the modules themselves (`from dataparallel.printing import ...`): this file imports nothing, so a
mistake in one module cannot break the others. Every function here is called on every rank of a process
group that is already initialised (`common.distributed.launch`, or torchrun, did it).
"""
