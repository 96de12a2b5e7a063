"""Distributed training from its parts (weeks 4-6), each module one technique, applied to a plain model.

- launch: run a function on N processes (gloo on CPU, NCCL on GPUs), or as one rank under torchrun.
- collectives: all-reduce, reduce-scatter, all-gather and broadcast built from point-to-point messages.
- cost_model: the alpha-beta model of those algorithms, fitted to measurements, for what can't be measured.
- ddp: data parallelism from scratch: gradient buckets, all-reduce overlapped with backward, no_sync().
- tensor_parallel: Megatron tensor and sequence parallelism (autograd f/g pairs, column/row-parallel linears,
  a plan dict), the same through torch's DTensor API, DeepSpeed-Ulysses attention, and the bytes each sends.
- pipeline: pipeline parallelism (GPipe, 1F1B) on a plain Llama: balanced stages, schedules as data, their
  simulated bubble, a measured step's timeline.
- zero: ZeRO stages 1 and 2 around any elementwise torch.optim optimizer: optimizer states, then gradients,
  sharded over the ranks.
- fsdp: FSDP2 (ZeRO stage 3) with torch's fully_shard on the Llama, and the loop every scheme is tested with.

README.md in this folder says what each module teaches and how to run it on one machine or a cluster.
"""
