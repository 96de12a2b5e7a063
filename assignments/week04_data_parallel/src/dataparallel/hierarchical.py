"""A hierarchical all-reduce: reduce inside each node, all-reduce across the nodes' leaders, broadcast back.

On a cluster of nodes with G GPUs each, GPUs of one node talk over NVLink (hundreds of GB/s) and nodes over
the network (tens of GB/s, and a latency per message). A flat ring all-reduce over all W GPUs pays 2(W - 1)
network latencies; the hierarchical one moves the data over the network only between the W / G leaders:

    1. reduce     inside each node, to its leader (its lowest rank)
    2. all-reduce between the leaders, one per node
    3. broadcast  inside each node, from its leader

`common.distributed.cost_model` compares the two at scale. Here the "nodes" are consecutive blocks of ranks.
Process groups are built once, in the constructor: creating a group is itself a collective of every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class HierarchicalAllReduce:
    """A sum all-reduce over the default group, in two levels: nodes of `ranks_per_node` consecutive ranks.

    Node k holds ranks k*G .. k*G + G - 1 (G = ranks_per_node); its leader is rank k*G. Every rank of the
    default group constructs it (with the same G) before any rank calls it.

    Raises:
        ValueError: (its message names ranks_per_node) if G < 1 or G does not divide the world size.
    """

    def __init__(self, ranks_per_node: int) -> None:
        # BEGIN SOLUTION: HierarchicalAllReduce.__init__: check G, build every node's group and the leaders' group (on every rank, same order)
        world_size, rank = dist.get_world_size(), dist.get_rank()
        if ranks_per_node < 1 or world_size % ranks_per_node:
            raise ValueError(
                f"ranks_per_node={ranks_per_node} must be >= 1 and divide the world size {world_size}"
            )
        self.rank = rank
        self.leader = rank - rank % ranks_per_node
        for first in range(0, world_size, ranks_per_node):
            group = dist.new_group(
                list(range(first, first + ranks_per_node))
            )  # every rank creates every group
            if first == self.leader:
                self.node_group = group
        self.leaders_group = dist.new_group(list(range(0, world_size, ranks_per_node)))
        # END SOLUTION

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over every rank, in place, and return it; the same on every rank.

        Collectives: a reduce in this rank's node to its leader, an all-reduce among the leaders (leaders
        only), a broadcast in the node from its leader. Nothing else (a collective in a group of one rank is
        allowed: it moves nothing).
        """
        # BEGIN SOLUTION: HierarchicalAllReduce.__call__: reduce to the node's leader, all-reduce among leaders, broadcast from the leader
        dist.reduce(tensor, dst=self.leader, group=self.node_group)
        if self.rank == self.leader:
            dist.all_reduce(tensor, group=self.leaders_group)
        dist.broadcast(tensor, src=self.leader, group=self.node_group)
        return tensor
        # END SOLUTION
