"""The alpha-beta model of collectives: predict what you can't measure, from what you can.

    link = fit_link(measurements)                         # alpha, beta of gloo on this machine
    predict("ring", 256 * 2**20, Topology.single(4, link)).time_s
    compare_at_scale()                                    # 1024 GPUs: ring vs hierarchical

Sending n bytes over a link costs alpha + n * beta: alpha the latency (s), beta = 1/bandwidth (s/byte).
An algorithm is a number of sequential steps, each paying alpha, and a number of bytes each rank sends
one after the other, each paying beta. For an all-reduce of n bytes over p ranks:

    algorithm                 steps (x alpha)            bytes per rank (x beta)
    ring                      2(p-1)                     2(p-1)/p * n       bandwidth-optimal
    halving-doubling          2 log2 p                   2(p-1)/p * n       (+2 steps of n if p is no power of 2)
    tree (double binary)      2 log2 p                   2 n                pipelined; NCCL's choice across nodes
    hierarchical (g per node) ring reduce-scatter in the node, all-reduce of n/g across the N nodes, all-gather
                              in the node: the network carries n/g per GPU instead of n

Reading them: at small n the steps dominate (a ring over 1024 GPUs takes 2046 latencies), at large n the
bytes do, and then only the slowest link a step crosses matters. A flat ring over several nodes has a
network hop in every step, so every step goes at the network's pace; the hierarchical algorithm sends
only 1/g of the data over the network, and pays the network latency only 2(N-1) times.

Measured results are reported as nccl-tests does (its PERFORMANCE.md): algorithm bandwidth algbw = n / t,
and bus bandwidth busbw = algbw * 2(p-1)/p for all-reduce ((p-1)/p for reduce-scatter and all-gather, 1
for broadcast), the rate each link runs at, comparable across p and with the link's bandwidth.

Not modelled: the reduction's own arithmetic (on a CPU it is part of the fitted beta), caches (on a CPU a
message that fits in them moves faster than one that doesn't, so no single beta fits every size exactly),
congestion and contention between flows, NCCL's protocols (LL, LL128, Simple) and channels, in-network
reduction (SHARP, NVLS). How far the fit to gloo misses on one CPU machine, size by size, is in
common/distributed/README.md; at scale, treat predictions as the shape of the answer, not its third digit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ALGORITHMS",
    "Cost",
    "Link",
    "Measurement",
    "Prediction",
    "Topology",
    "bus_bandwidth_factor",
    "compare_at_scale",
    "fit_link",
    "halving_doubling_cost",
    "predict",
    "ring_cost",
    "tree_cost",
]


@dataclass(frozen=True)
class Link:
    """A link's latency alpha (s) and bandwidth (bytes/s); beta = 1 / bandwidth."""

    alpha_s: float
    bandwidth: float

    @property
    def beta(self) -> float:
        return 1.0 / self.bandwidth

    def __str__(self) -> str:
        return f"alpha {self.alpha_s * 1e6:.3g} us, bandwidth {self.bandwidth / 1e9:.3g} GB/s"


# Illustrative links of a current GPU cluster (datasheet rates, typical latencies), for what-if questions.
NVLINK_H100 = Link(alpha_s=3e-6, bandwidth=450e9)  # NVLink 4: 900 GB/s both ways = 450 GB/s each way
INFINIBAND_NDR = Link(alpha_s=6e-6, bandwidth=50e9)  # 400 Gb/s per GPU (one NIC per GPU)


@dataclass(frozen=True)
class Cost:
    """An algorithm's cost in link units: `steps` latencies and `bytes` sent one after another per rank."""

    steps: float
    bytes: float

    def time(self, link: Link) -> float:
        return self.steps * link.alpha_s + self.bytes * link.beta


def ring_cost(nbytes: float, p: int) -> Cost:
    """Ring all-reduce: p-1 steps of reduce-scatter and p-1 of all-gather, each sending n/p bytes."""
    return Cost(2 * (p - 1), 2 * (p - 1) / p * nbytes)


def halving_doubling_cost(nbytes: float, p: int) -> Cost:
    """Recursive halving then doubling over the largest power of two <= p; the rest fold in and out."""
    power = 1 << (p.bit_length() - 1)
    k = power.bit_length() - 1
    fold = 0 if power == p else 1  # one step with the whole tensor before, one after
    return Cost(2 * k + 2 * fold, 2 * (power - 1) / power * nbytes + 2 * fold * nbytes)


def tree_cost(nbytes: float, p: int) -> Cost:
    """Pipelined (double) binary tree: reduce up, broadcast down; each byte crosses a rank's link twice."""
    return Cost(2 * math.ceil(math.log2(p)) if p > 1 else 0, 2 * nbytes if p > 1 else 0)


FlatCost = Callable[[float, int], Cost]
LAWSON_ITERATIONS = 500  # re-weightings of the minimax fit; it settles within a fraction of a percent
FLAT_ALGORITHMS: dict[str, FlatCost] = {
    "ring": ring_cost,
    "halving_doubling": halving_doubling_cost,
    "tree": tree_cost,
}


@dataclass(frozen=True)
class Topology:
    """nodes x gpus_per_node ranks: `intra` links inside a node (NVLink), `inter` between nodes (per GPU)."""

    nodes: int
    gpus_per_node: int
    intra: Link
    inter: Link

    @classmethod
    def single(cls, ranks: int, link: Link) -> Topology:
        """One node of `ranks` ranks joined by `link` (e.g. gloo processes on one machine)."""
        return cls(1, ranks, link, link)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def slowest(self) -> Link:
        """The link a flat algorithm's steps wait for: once it spans nodes, some hop of every step is remote."""
        return self.inter if self.nodes > 1 else self.intra


def hierarchical_time(nbytes: float, topology: Topology, across_nodes: FlatCost = ring_cost) -> float:
    """Reduce-scatter in each node (ring), all-reduce of n/g across nodes, all-gather in each node (ring).

    The g GPUs of a node run their cross-node all-reduces in parallel, each over its own share of the network.
    """
    g, nodes = topology.gpus_per_node, topology.nodes
    in_node = Cost(g - 1, (g - 1) / g * nbytes)  # reduce-scatter, or all-gather: half a ring all-reduce
    return 2 * in_node.time(topology.intra) + across_nodes(nbytes / g, nodes).time(topology.inter)


ALGORITHMS = (*FLAT_ALGORITHMS, "hierarchical")


def bus_bandwidth_factor(collective: str, p: int) -> float:
    """nccl-tests' busbw / algbw: what each link carries, relative to the message, for this collective."""
    factors = {
        "all_reduce": 2 * (p - 1) / p,
        "reduce_scatter": (p - 1) / p,
        "all_gather": (p - 1) / p,
        "all_to_all": (p - 1) / p,  # each rank keeps 1/p of its message and sends the rest, once
        "broadcast": 1.0,
    }
    if collective not in factors:
        raise ValueError(f"collective must be one of {sorted(factors)}, got {collective!r}")
    return factors[collective]


@dataclass(frozen=True)
class Prediction:
    """Predicted all-reduce time and the two bandwidths nccl-tests reports (bytes/s)."""

    algorithm: str
    nbytes: float
    world: int
    time_s: float

    @property
    def algbw(self) -> float:
        return self.nbytes / self.time_s

    @property
    def busbw(self) -> float:
        return self.algbw * bus_bandwidth_factor("all_reduce", self.world)


def predict(algorithm: str, nbytes: float, topology: Topology) -> Prediction:
    """All-reduce time of nbytes over the topology with one of ALGORITHMS."""
    if algorithm == "hierarchical":
        time_s = hierarchical_time(nbytes, topology)
    elif algorithm in FLAT_ALGORITHMS:
        time_s = FLAT_ALGORITHMS[algorithm](nbytes, topology.world).time(topology.slowest)
    else:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    return Prediction(algorithm, nbytes, topology.world, time_s)


# ----------------------------------------------------------------------------------------------------
# Fitting alpha and beta to measurements
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """One measured all-reduce: message size, number of ranks, time."""

    nbytes: float
    world: int
    time_s: float


def fit_link(measurements: Iterable[Measurement], algorithm: str = "ring") -> Link:
    """The alpha and beta with which `algorithm`'s cost misses the measured times by the least, in the worst case.

    Every flat algorithm's time is linear in alpha and beta (steps * alpha + bytes * beta), so relative
    errors are linear too: row i is (steps_i / t_i, bytes_i / t_i), and we want that row times (alpha, beta)
    close to 1 for every i. Least squares would let a few sizes miss by a lot to fit the others a bit
    better; the claim we check is "within x% at every size", so the fit minimises the largest relative
    error instead (Lawson's algorithm: least squares, re-weighted towards the rows that miss the most).
    Both must be positive; where the best fit says otherwise (a latency too small to see), that one is
    pinned near zero and the other fitted alone.
    """
    rows = [(FLAT_ALGORITHMS[algorithm](m.nbytes, m.world), m.time_s) for m in measurements]
    if len(rows) < 2:
        raise ValueError(f"fitting alpha and beta needs at least 2 measurements, got {len(rows)}")
    a = np.array([[cost.steps / t, cost.bytes / t] for cost, t in rows])
    weights = np.full(len(rows), 1 / len(rows))
    for _ in range(LAWSON_ITERATIONS):
        root = np.sqrt(weights)
        (alpha, beta), *_ = np.linalg.lstsq(a * root[:, None], root, rcond=None)
        miss = np.abs(a @ (alpha, beta) - 1)
        if miss.max() < 1e-12:  # the data lie on the model exactly
            break
        weights = weights * miss / (weights @ miss)
    if alpha <= 0 or beta <= 0:
        column = a[:, 1 if alpha <= 0 else 0]  # keep the term the data can see
        value = 2 / (column.max() + column.min())  # the one-parameter minimax fit: equal misses at both ends
        alpha, beta = (1e-12, value) if alpha <= 0 else (value, 1e-18)
    return Link(alpha_s=float(alpha), bandwidth=1.0 / float(beta))


def compare_at_scale(
    sizes: Iterable[float] = (2**10, 2**16, 2**20, 2**24, 2**28, 2**30),
    nodes: int = 128,
    gpus_per_node: int = 8,
    intra: Link = NVLINK_H100,
    inter: Link = INFINIBAND_NDR,
) -> list[dict[str, float]]:
    """Ring vs tree vs hierarchical all-reduce on nodes x gpus_per_node GPUs: rows of time and busbw per size.

    The question a student cannot measure: 1024 GPUs as 128 nodes of 8 NVLinked GPUs.
    """
    topology = Topology(nodes, gpus_per_node, intra, inter)
    rows = []
    for nbytes in sizes:
        row: dict[str, float] = {"nbytes": nbytes}
        for algorithm in ("ring", "tree", "hierarchical"):
            prediction = predict(algorithm, nbytes, topology)
            row[f"{algorithm}_s"] = prediction.time_s
            row[f"{algorithm}_busbw"] = prediction.busbw
        rows.append(row)
    return rows
