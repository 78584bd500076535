"""Resumable training: what trainer.train saves every checkpoint_every steps, and resumes from.

A checkpoint holds the trainable parameters (the whole model, or only the LoRA matrices when the
base is frozen), the optimizer, the step, the data position (epoch and index in its permutation),
and every process's RNG states (python, numpy, torch, CUDA). The learning-rate schedule is a
function of the step, so the step is its whole state. The file is written to a temporary name and
renamed over the old one, so a crash while writing leaves the previous checkpoint whole. Under
FSDP the full state is gathered for the first process: `checkpoint_state` is collective (every
process calls it), `save_checkpoint` is the first process's alone.
"""
import os
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict,
)

from .distributed import world

# full (unsharded) tensors on the CPU, trainable parameters only (a LoRA run saves its adapter alone)
STATE_OPTIONS = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def rng_state():
    """This process's random generators (python, numpy, torch, CUDA), as tensors and plain values
    that torch.load(weights_only=True) accepts."""
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                       "cached_gaussian": cached}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what `rng_state` took."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state, path):
    """torch.save to a temporary file, flushed to disk, then renamed over `path` (atomic)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def checkpoint_state(model, optimizer, step, order, cfg):
    """Everything needed to continue; collective under FSDP (every process must call it).
    order: the loop's trainer.DataOrder (its epoch and index are the data position)."""
    rank, world_size = world()
    rngs = [None] * world_size
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    return {"model": get_model_state_dict(model, options=STATE_OPTIONS),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=STATE_OPTIONS),
            "step": step, "epoch": order.epoch, "index": order.index, "rng": rngs,
            "world_size": world_size, "train_config": asdict(cfg)}


def load_checkpoint(path, model, optimizer, cfg):
    """Restore model, optimizer and this process's RNG; returns (step, epoch, index)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    saved = ckpt["train_config"]
    for key in ("seed", "batch_size", "grad_accum"):
        if saved[key] != getattr(cfg, key):
            raise ValueError(f"{path} was written with {key}={saved[key]}, this run has {getattr(cfg, key)}: "
                             f"the data order would differ; use another out_dir or the same {key}")
    # the names only: sharded (no gathering), since a full state dict is given to the first process alone
    expected = set(get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)))
    if set(ckpt["model"]) != expected:
        raise ValueError(f"{path} does not fit this model's trainable parameters: missing "
                         f"{sorted(expected - set(ckpt['model']))[:3]}, unexpected {sorted(set(ckpt['model']) - expected)[:3]}")
    set_model_state_dict(model, ckpt["model"], options=STATE_OPTIONS)
    set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=STATE_OPTIONS)
    rank, world_size = world()
    if ckpt["world_size"] == world_size:  # another process count continues the data, not the dropout masks
        set_rng_state(ckpt["rng"][rank])
    return ckpt["step"], ckpt["epoch"], ckpt["index"]
