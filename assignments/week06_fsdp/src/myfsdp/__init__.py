"""Week 6 assignment: fully sharded data parallelism (ZeRO-3) written from its parts.

- `myfsdp.sharding`: a parameter cut into equal row blocks, this rank's block kept as a DTensor (`Shard(0)`).
- `myfsdp.unit`: one unit of parameters gathered, freed and reduce-scattered together (one collective each).
- `myfsdp.fsdp`: `shard_model`, the hooks that run a unit's collectives at the right moments, with prefetch.

Import the modules themselves (`from myfsdp.fsdp import shard_model`): this file imports nothing, so a
mistake in one module cannot break the others.
"""
