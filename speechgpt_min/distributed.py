"""Several processes training one model (launched by torchrun): joining the process group, each
process's share of a micro-batch, the DDP or FSDP wrapper, gradient sync, sums over processes.

With one plain process each function is the identity or does nothing, so the training loop
(trainer.train) reads the same either way.

    torchrun --nproc_per_node 2 script.py     # the script calls init_distributed() first
"""
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .model import Block


def init_distributed():
    """Join the process group when launched by torchrun (RANK and WORLD_SIZE set): NCCL with CUDA,
    gloo otherwise. Returns (rank, world_size); (0, 1) for a plain single process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def world():
    """(rank, world_size) of this process."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_sum(values, device):
    """Sum a list of floats over all processes."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def shard(items, rank, world_size):
    """This process's contiguous share of one micro-batch."""
    per = len(items) // world_size
    return items[rank * per:(rank + 1) * per]


def wrap(model, cfg, device):
    """DDP or FSDP around the model when several processes train; the model itself otherwise."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in [m for m in model.modules() if isinstance(m, Block)]:
            fully_shard(block)  # each block's weights are gathered just for its forward and backward
        fully_shard(model)
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def grad_sync(model, sync):
    """Skip the cross-process gradient reduction on all but the last micro-batch of a step."""
    if isinstance(model, DistributedDataParallel):
        return nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP
        model.set_requires_gradient_sync(sync)
    return nullcontext()
