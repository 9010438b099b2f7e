"""torchrun command lines for jobs that ismctl starts itself (``ismctl ablate --launch torchrun``).

One node: ``--standalone`` (a private rendezvous on a free port). Several nodes: every node
runs the same command with its own ``--node-rank`` (node 0 reports); the agents meet at a c10d
rendezvous endpoint (``host:port`` reachable from every node, usually node 0's) and torchrun
assigns the global ranks (the static backend takes the node rank instead). The run and
ablation folders must then sit on a filesystem that every node shares: rank 0 writes the
checkpoints and results, and a resumed run loads them on every rank.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from ismctl.utils.errors import UserError

RDZV_BACKENDS = ("c10d", "static", "etcd", "etcd-v2")


@dataclass(frozen=True)
class Torchrun:
    """How to start one job: processes per node, nodes, and where the nodes meet."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_id: str = "ismctl"
    rdzv_backend: str = "c10d"

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise UserError(f"--nproc-per-node {self.nproc_per_node}: must be >= 1")
        if self.nnodes < 1:
            raise UserError(f"--nnodes {self.nnodes}: must be >= 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"--node-rank {self.node_rank}: must be in 0..{self.nnodes - 1} "
                            f"for --nnodes {self.nnodes}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise UserError(f"--nnodes {self.nnodes}: needs --rdzv-endpoint HOST:PORT, an "
                            "address every node can reach (usually node 0's)")
        if self.rdzv_endpoint is not None and not re.fullmatch(r"[^\s:]+:\d+",
                                                               self.rdzv_endpoint):
            raise UserError(f"--rdzv-endpoint {self.rdzv_endpoint!r}: expected HOST:PORT, "
                            "e.g. node0.cluster:29400")
        if self.rdzv_backend not in RDZV_BACKENDS:
            raise UserError(f"--rdzv-backend {self.rdzv_backend!r}: expected one of "
                            f"{', '.join(RDZV_BACKENDS)}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.rdzv_id):
            raise UserError(f"--rdzv-id {self.rdzv_id!r}: use letters, digits, '.', '_', '-'")

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1 or self.rdzv_endpoint is not None

    @property
    def is_main_node(self) -> bool:
        return self.node_rank == 0

    def command(self, job: str = "") -> list[str]:
        """``python -m torch.distributed.run ... -m ismctl``; ``job`` makes the rendezvous id
        unique per job, so that consecutive jobs on the same endpoint never meet each other."""
        cmd = [sys.executable, "-m", "torch.distributed.run",
               f"--nproc_per_node={self.nproc_per_node}"]
        if not self.multi_node:
            cmd.append("--standalone")
        else:
            suffix = re.sub(r"[^A-Za-z0-9_.-]", "-", job)
            rdzv_id = f"{self.rdzv_id}-{suffix}" if job else self.rdzv_id
            cmd += [f"--nnodes={self.nnodes}", f"--rdzv_backend={self.rdzv_backend}",
                    f"--rdzv_endpoint={self.rdzv_endpoint}", f"--rdzv_id={rdzv_id}"]
            if self.rdzv_backend == "static":  # c10d assigns the ranks at the rendezvous
                cmd.append(f"--node_rank={self.node_rank}")
        return [*cmd, "-m", "ismctl"]
