"""The alpha-beta cost model: formulas against hand counts, the fit against known links, the at-scale answer."""

from __future__ import annotations

import math

import pytest

from common.distributed.cost_model import (
    INFINIBAND_NDR,
    NVLINK_H100,
    Link,
    Measurement,
    Topology,
    bus_bandwidth_factor,
    compare_at_scale,
    fit_link,
    halving_doubling_cost,
    predict,
    ring_cost,
    tree_cost,
)

MIB = 2**20


def test_costs_count_steps_and_bytes_per_rank() -> None:
    assert ring_cost(1000, 4) == ring_cost(1000.0, 4)
    assert (ring_cost(1000, 4).steps, ring_cost(1000, 4).bytes) == (6, 1500)  # 2(p-1), 2(p-1)/p n
    assert (halving_doubling_cost(1000, 8).steps, halving_doubling_cost(1000, 8).bytes) == (6, 1750)
    # 6 ranks: halving-doubling over 4, plus folding 2 ranks in and out (one full-tensor step each way)
    assert (halving_doubling_cost(1000, 6).steps, halving_doubling_cost(1000, 6).bytes) == (6, 1500 + 2000)
    assert (tree_cost(1000, 5).steps, tree_cost(1000, 5).bytes) == (6, 2000)
    link = Link(alpha_s=1e-5, bandwidth=1e9)
    assert ring_cost(1e6, 2).time(link) == pytest.approx(2 * 1e-5 + 1e6 / 1e9)


def test_bus_bandwidth_follows_nccl_tests() -> None:
    link = Link(alpha_s=0.0, bandwidth=10e9)
    prediction = predict("ring", 256 * MIB, Topology.single(8, link))
    assert prediction.algbw == pytest.approx(256 * MIB / prediction.time_s)
    # A latency-free ring runs every link at full speed: bus bandwidth = link bandwidth, whatever p is.
    assert prediction.busbw == pytest.approx(10e9)
    assert bus_bandwidth_factor("all_gather", 4) == 0.75 and bus_bandwidth_factor("broadcast", 4) == 1.0


def test_fit_recovers_the_link_that_made_the_data() -> None:
    truth = Link(alpha_s=50e-6, bandwidth=2e9)
    samples = [
        Measurement(n, p, ring_cost(n, p).time(truth)) for p in (2, 4) for n in (2**16, 2**20, 2**24, 2**28)
    ]
    fitted = fit_link(samples)
    assert fitted.alpha_s == pytest.approx(truth.alpha_s, rel=1e-9)
    assert fitted.bandwidth == pytest.approx(truth.bandwidth, rel=1e-9)


def test_fit_keeps_alpha_and_beta_positive() -> None:
    # Pure bandwidth data with a little noise could fit a negative latency: it is pinned near zero instead.
    samples = [
        Measurement(n, 2, n / 1e9 * (1.01 if i % 2 else 0.99)) for i, n in enumerate((2**20, 2**22, 2**24))
    ]
    fitted = fit_link(samples)
    assert 0 < fitted.alpha_s < 1e-9 and fitted.bandwidth == pytest.approx(1e9, rel=0.02)


def test_hierarchical_on_one_node_is_a_ring() -> None:
    one_node = Topology(1, 8, NVLINK_H100, INFINIBAND_NDR)
    expected = ring_cost(64 * MIB, 8).time(NVLINK_H100)
    assert predict("hierarchical", 64 * MIB, one_node).time_s == pytest.approx(expected)


def test_1024_gpus_hierarchical_beats_a_flat_ring_at_every_size() -> None:
    rows = compare_at_scale()
    for row in rows:
        assert row["hierarchical_s"] < row["ring_s"], row
    small, large = rows[0], rows[-1]
    # 1 KiB: the flat ring pays 2 x 1023 network latencies, the hierarchical one 2 x 127 plus 14 NVLink ones.
    assert small["ring_s"] == pytest.approx(2 * 1023 * INFINIBAND_NDR.alpha_s, rel=0.01)
    assert small["ring_s"] / small["hierarchical_s"] > 5
    # 1 GiB: the flat ring runs at the network's pace, and its 2046 latencies still cost 22% of its bus
    # bandwidth; the hierarchical one sends only 1/8 of the data over the network.
    n, p = large["nbytes"], 1024
    assert large["ring_s"] == pytest.approx(
        2 * (p - 1) * (INFINIBAND_NDR.alpha_s + n / p / INFINIBAND_NDR.bandwidth)
    )
    assert 0.75 < large["ring_busbw"] / INFINIBAND_NDR.bandwidth < 0.8
    assert large["ring_s"] / large["hierarchical_s"] > 4


def test_unknown_algorithm_is_named() -> None:
    with pytest.raises(ValueError, match="algorithm must be one of"):
        predict("butterfly", 1, Topology.single(2, Link(1e-6, 1e9)))
    assert math.isclose(predict("tree", 0, Topology.single(1, Link(1e-6, 1e9))).time_s, 0.0)
