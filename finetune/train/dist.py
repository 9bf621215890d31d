"""This process's place in a `torchrun` job: rank, world size, barriers and the DDP wrapper.

torchrun --nproc-per-node 2 -m finetune DATA --out runs/NAME
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn


@dataclass
class Dist:
    """This process's place in a `torchrun` job (world 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device_kind: str) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group("nccl" if device_kind == "cuda" else "gloo")
        return cls(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def agree(self, value):
        """Rank 0's `value` in every process (a decision each rank would otherwise take on
        its own clock, and could take differently: then the ranks hang in an all-reduce)."""
        if self.world <= 1:
            return value
        import torch.distributed as td

        box = [value]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Leave the process group (torchrun warns about one left open at exit)."""
        if self.world > 1:
            import torch.distributed as td

            td.barrier()
            td.destroy_process_group()

    def wrap(self, module: nn.Module) -> nn.Module:
        """DistributedDataParallel over the parameters that train now (rebuilt when the
        trainable set changes: DDP registers them at construction)."""
        if self.world <= 1 or not any(p.requires_grad for p in module.parameters()):
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if next(module.parameters()).is_cuda else None
        # Some backbones hold parameters the pooled features never use (BERT's pooler).
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)
