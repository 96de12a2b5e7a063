"""The week-6 seminar's instruments (week06_fsdp/fsdp_runs.py): the log of collectives its tables are read
from, on gloo ranks, and the GPU section's measurements on one GPU.

The seminar itself runs in CI under nbval at small size, where its asserts check every scheme against one
process; these tests check the tools those asserts rely on against what the ranks are known to have called.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from common.distributed.launch import launch
from common.models.llama import LlamaConfig
from week06_fsdp.fsdp_runs import Collective, CollectiveLog, gpu_tour


def call_three_collectives() -> list[Collective]:
    """An all-gather in bf16 over every rank, a reduce-scatter in fp32, an all-reduce in fp64 over a group
    of one rank: the log must say which, with the whole message's bytes, its dtype and the group's size."""
    rank, world = dist.get_rank(), dist.get_world_size()
    alone = [dist.new_group([r]) for r in range(world)]  # every rank takes part in creating every group
    log = CollectiveLog()
    with log:
        gathered = torch.empty(3 * world, dtype=torch.bfloat16)
        dist.all_gather_into_tensor(gathered, torch.ones(3, dtype=torch.bfloat16))
        dist.reduce_scatter_tensor(torch.empty(2), torch.ones(2 * world))
        dist.all_reduce(torch.ones(5, dtype=torch.float64), group=alone[rank])
    return log.calls


@pytest.mark.distributed
def test_collective_log_records_kind_message_dtype_and_group() -> None:
    world = 2
    expected = [  # no model: no block's forward has started, so every call is "before block 0"
        Collective("all-gather", 3 * world * 2, "bfloat16", world, 0),
        Collective("reduce-scatter", 2 * world * 4, "float32", world, 0),
        Collective("all-reduce", 5 * 8, "float64", 1, 0),
    ]
    for rank, calls in launch(call_three_collectives, world, backend="gloo").items():
        assert calls == expected, rank


@pytest.mark.gpu
def test_gpu_tour_measures_offload_a_trace_and_a_snapshot(tmp_path) -> None:
    """On one GPU: CPU offload lowers the peak (AdamW's fp32 state leaves the GPU), the trace names FSDP2's
    hooks and no all-gather (one rank has nothing to gather), the snapshot is written, MFU is a fraction."""
    config = LlamaConfig(
        vocab_size=512, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=704, max_seq_len=128
    )
    report = launch(
        gpu_tour, 1, args=(config, 2, 128, str(tmp_path)), backend="nccl", start_method="spawn", timeout_s=600
    )[0]
    assert report["FSDP2, CPU offload"]["peak_bytes"] < report["FSDP2"]["peak_bytes"]
    assert (tmp_path / "fsdp2_trace.json").is_file() and (tmp_path / "fsdp2_snapshot.pickle").is_file()
    # One rank: FSDP2 copies the shard (the whole parameter) instead of all-gathering it; its hooks still run.
    ranges = report["fsdp ranges"]
    assert any(n.startswith("FSDP::pre_forward") for n in ranges), ranges
    assert not any(n.startswith("FSDP::all_gather") for n in ranges), ranges
    assert 0 < report["FSDP2"]["mfu"] < 1
