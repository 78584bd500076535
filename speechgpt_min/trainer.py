"""The one training loop every stage uses (nanoGPT's train.py, made resumable and distributed).

    cfg = TrainConfig(out_dir="runs/stage2", steps=500, batch_size=16, lr=3e-4)
    history = train(model, train_examples, cfg, val_examples)   # data.Example lists

Each optimizer step reads batch_size * grad_accum examples, in the order of a seeded permutation
of the training set (a new permutation each epoch). The loss is the mean cross-entropy over every
target token of the step, however the examples are cut into micro-batches or spread over
processes, so one process and N processes with the same batch_size compute the same update.

What the loop does, step by step:
    lr from the schedule (`lr_at`: linear warmup, then cosine down to min_lr)
    grad_accum micro-batches: forward (bf16 autocast where the hardware has fast bf16; a prefix all rows
        share, the system prompt, computed once), backward, gradients summed
    with a text_set, a second stream: text_batch_size of its examples, their own mean loss added
        (times text_weight), so that text learnt beside the main examples takes no share of their loss
    clip the gradient norm, AdamW step (weight decay on matrices only)
    log loss, lr, grad norm and tokens/s to metrics.jsonl and the progress bar
    every eval_every steps: validation loss, and task scores (a callback that decodes a few held-out
        examples: CER, accuracy); every checkpoint_every steps: a checkpoint

A checkpoint (`ckpt.pt` in out_dir) holds everything needed to go on (checkpoint.py says what);
a run restarted with the same out_dir continues from it as if never interrupted (bit for bit on CPU).

Several processes: launch with `torchrun --nproc_per_node N script.py`, call
`distributed.init_distributed()` first; each process takes its shard of every micro-batch. The
model is wrapped in DistributedDataParallel, or with fsdp=True sharded by FSDP (one unit per Block),
for models whose weights and optimizer state do not fit on one device.

This file reads top to bottom: TrainConfig, the loop (`train`), then the pieces it calls. The
plumbing under it lives beside it: distributed.py (several processes) and checkpoint.py (saving
and resuming).
"""
import json
import math
import os
import random
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import checkpoint_state, load_checkpoint, save_checkpoint
from .data import collate, n_targets
from .device import fast_bfloat16, resolve_device
from .distributed import all_sum, grad_sync, shard, world, wrap
from .model import IGNORE_INDEX

CHECKPOINT_FILE = "ckpt.pt"
METRICS_FILE = "metrics.jsonl"
DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class TrainConfig:
    out_dir: str = "out"
    steps: int = 200                  # optimizer steps
    batch_size: int = 8               # examples per micro-batch, over all processes together
    grad_accum: int = 1               # micro-batches per optimizer step
    lr: float = 1e-3                  # peak learning rate, after warmup
    min_lr: float = 1e-4              # the cosine ends here at the last step
    warmup_steps: int = 20
    weight_decay: float = 0.1         # on matrices (dim >= 2) only, not on norms' gains
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0            # max global gradient norm; 0 turns clipping off
    text_batch_size: int = 0          # examples per step from train()'s text_set, a second stream
    text_weight: float = 1.0          # the text stream's mean loss is added to the step's with this weight
    eval_every: int = 100             # validation loss every this many steps (and at the end); 0: never
    eval_batches: int | None = None   # micro-batches per evaluation; None: the whole validation set
    checkpoint_every: int = 100       # and at the end; 0: only at the end
    seed: int = 0
    device: str = "auto"              # "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:1", "mps"
    dtype: str = "auto"               # "auto" (bf16 autocast where fast_bfloat16(device)), "float32", "bfloat16"
    gradient_checkpointing: bool = False  # recompute activations in backward: for large presets
    fsdp: bool = False                # with several processes: shard weights, gradients, optimizer
    resume: bool = True               # continue from out_dir/ckpt.pt when it exists
    progress: bool = True             # tqdm progress bar (first process only)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPES)}")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.text_batch_size < 0 or self.text_weight < 0:
            raise ValueError(f"text_batch_size and text_weight must be >= 0, got {self.text_batch_size}, {self.text_weight}")
        if self.warmup_steps < 0 or self.min_lr > self.lr:
            raise ValueError(f"need warmup_steps >= 0 and min_lr <= lr, got {self.warmup_steps}, {self.min_lr}, {self.lr}")


# ----------------------------------------------------------------------------- the loop

def train(model, train_set, cfg, val_set=None, score_tasks=None, text_set=None):
    """Train `model` in place on train_set (a list of data.Example; val_set likewise, optional).

    Only parameters with requires_grad are optimized and checkpointed: for stage 3, call
    lora.inject(model, LoRAConfig.from_preset("speechgpt")) first. A checkpoint in cfg.out_dir is
    resumed from (cfg.resume). score_tasks(model) -> {name: score}, optional, runs at every
    evaluation (first process only) on the unwrapped model: what the model can *do* so far, beside
    its loss. Returns the metric records of the steps this call ran, as written to metrics.jsonl:
    {"step", "loss", "lr", "grad_norm", "tokens_per_s", "seconds" (the step's own, evaluation apart), "epoch"[,
    "text_loss", "val_loss", task scores]}.

    text_set: a second list of examples, read as a stream of its own: cfg.text_batch_size of them in
    every step (a seeded permutation per epoch, its position a function of the step, so a resumed run
    continues it), their mean loss ("text_loss") added to the step's loss times cfg.text_weight.
    """
    rank, world_size = world()
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {world_size} processes")
    if not train_set:
        raise ValueError("the training set is empty")
    if text_set and (cfg.text_batch_size < 1 or cfg.text_batch_size % world_size):
        raise ValueError(f"a text_set needs a text_batch_size >= 1 divisible by the {world_size} processes, "
                         f"got {cfg.text_batch_size}")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and fast_bfloat16(device))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = out_dir / CHECKPOINT_FILE, out_dir / METRICS_FILE

    torch.manual_seed(cfg.seed + rank)  # dropout masks (LoRA); overwritten by a checkpoint's RNG
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    model.to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing = True  # the model's own switch (model.Transformer)
    model.train()
    unwrapped, model = model, wrap(model, cfg, device)
    optimizer = make_optimizer(model, cfg, device)

    step, epoch, index = 0, 0, 0
    if cfg.resume and ckpt_path.exists():
        step, epoch, index = load_checkpoint(ckpt_path, model, optimizer, cfg)
    if rank == 0:
        keep_metrics_until(metrics_path, step)
    order = DataOrder(len(train_set), cfg.seed, epoch, index)
    if text_set:  # the second stream's position follows from the step: text_batch_size examples per step
        text_order = DataOrder(len(text_set), cfg.seed + 1, *divmod(step * cfg.text_batch_size, len(text_set)))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if rank == 0:
        print(f"training {n_trainable / 1e6:.2f}M parameters on {device} x {world_size}, "
              f"{len(train_set)} examples, from step {step} to {cfg.steps}")

    history = []
    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress or rank != 0, desc=out_dir.name)
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # The step's examples, the same on every process; each process trains on its shard of each micro-batch.
        micro = [[train_set[i] for i in order.take(cfg.batch_size)] for _ in range(cfg.grad_accum)]
        step_targets = max(1, sum(n_targets(e) for batch in micro for e in batch))
        step_tokens = sum(len(e.tokens) - 1 for batch in micro for e in batch)
        text_batch = [text_set[i] for i in text_order.take(cfg.text_batch_size)] if text_set else []
        text_targets = max(1, sum(n_targets(e) for e in text_batch))
        step_tokens += sum(len(e.tokens) - 1 for e in text_batch)
        loss_sum = 0.0
        for m, batch in enumerate(micro):
            last = m == cfg.grad_accum - 1 and not text_batch  # DDP syncs gradients in the step's last backward
            loss_sum += backward(model, shard(batch, rank, world_size), step_targets, 1.0, last, cfg, device, autocast)
        text_loss = 0.0
        if text_batch:  # the text stream: its own mean over its targets, added with text_weight
            text_loss = backward(model, shard(text_batch, rank, world_size), text_targets, cfg.text_weight, True,
                                 cfg, device, autocast)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        loss_value, text_loss_value = all_sum([loss_sum, text_loss], device)
        dt = time.perf_counter() - t0
        record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens_per_s": step_tokens / dt, "seconds": dt, "epoch": order.epoch}
        if text_batch:
            record["text_loss"] = text_loss_value
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            if val_set:
                record["val_loss"] = evaluate(model, val_set, cfg, device, autocast)
            if score_tasks is not None and rank == 0 and not cfg.fsdp:  # FSDP: weights are sharded
                unwrapped.eval()
                with torch.no_grad(), autocast:
                    record.update(score_tasks(unwrapped))
                unwrapped.train()
        history.append(record)
        if rank == 0:
            log_line(metrics_path, record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")

        if step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            state = checkpoint_state(model, optimizer, step, order, cfg)
            if rank == 0:
                save_checkpoint(state, ckpt_path)
            if dist.is_initialized():
                dist.barrier()
    bar.close()
    return history


# ----------------------------------------------------------------------------- pieces of the loop

DECAYS = ("cosine", "linear")


def lr_at(step, steps, lr, min_lr=0.0, warmup_steps=0, decay="cosine"):
    """Learning rate of optimizer step `step` (0-based) of `steps`: the one schedule of every training
    loop here (the LM's, HuBERT's, the phone recogniser's, both vocoders'). It rises linearly over
    the first `warmup_steps` steps to `lr`, then falls to `min_lr` at the last step along a cosine
    or (decay="linear") a straight line. min_lr == lr keeps it constant after the warmup."""
    if decay not in DECAYS:
        raise ValueError(f"unknown decay {decay!r}; valid: {', '.join(DECAYS)}")
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    progress = min((step - warmup_steps) / max(1, steps - 1 - warmup_steps), 1.0)  # 0 -> 1
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress  # 1 -> 0
    return min_lr + shape * (lr - min_lr)


def make_optimizer(model, cfg, device):
    """AdamW over the trainable parameters; weight decay on matrices (embeddings, projections) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


class DataOrder:
    """Where the loop is in the data: epoch, and index in that epoch's seeded permutation."""

    def __init__(self, n, seed, epoch=0, index=0):
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index
        self.perm = self._permutation()

    def _permutation(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)  # new order each epoch
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, count):
        """The next `count` example indices, running into the next epoch when this one ends."""
        out = []
        while len(out) < count:
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self.perm = self._permutation()
            take = min(count - len(out), self.n - self.index)
            out += self.perm[self.index:self.index + take]
            self.index += take
        return out


def backward(model, examples, step_targets, weight, sync, cfg, device, autocast):
    """Forward and backward over one process's examples of a micro-batch, in prefix groups (a shared
    prefix computed once). Each part's mean loss is re-weighted to its share of the step's
    `step_targets` target tokens, times `weight`, so the gradients summed over parts, micro-batches and
    processes are those of one mean over the step. sync: let DDP/FSDP average the gradients over
    processes in this call's last backward. Returns this call's share of the step's mean loss."""
    world_size = world()[1]
    parts = prefix_groups(examples, cfg.gradient_checkpointing)
    loss_sum = 0.0
    for p, part in enumerate(parts):
        b = collate(part)
        x, y = b["input_ids"].to(device), b["labels"].to(device)  # (b, T) each
        with grad_sync(model, sync=sync and p == len(parts) - 1):
            with autocast:
                _, loss = model(x, y, shared_prefix=shared_prefix(b, cfg.gradient_checkpointing))  # mean over targets
            loss = loss * (sum(n_targets(e) for e in part) / step_targets)
            (loss * weight * world_size).backward()  # DDP/FSDP average over processes
        loss_sum += loss.item()
    return loss_sum


@torch.no_grad()
def shared_prefix(batch, gradient_checkpointing, at_least=16):
    """How many leading tokens every row of a collated batch shares with no target among them (BOS
    and the system prompt): the model then computes them once (model.SharedPrefix). 0 when fewer
    than `at_least`, with one row, with gradient checkpointing (which needs whole rows), or with
    several processes (DDP and FSDP expect every process to run the same graph)."""
    x, y = batch["input_ids"], batch["labels"]
    if len(x) < 2 or gradient_checkpointing or world()[1] > 1:
        return 0
    same = (x == x[:1]).all(0).long()  # (T,) 1 where every row has the first row's token
    n = int(same.cumprod(0).sum())  # length of the common prefix
    targeted = (y != IGNORE_INDEX).any(0).nonzero()
    n = min(n, int(targeted[0]) if len(targeted) else n, int(batch["lengths"].min()) - 1)
    return n if n >= at_least else 0


def prefix_groups(examples, gradient_checkpointing, head=16):
    """A micro-batch in at most two parts: the rows that start as most of its rows do (BOS and the
    system prompt, when instruction examples are mixed with text lines), and the others, when the
    first part then has a shared prefix to compute once (`shared_prefix`); else the batch whole. The
    step's loss and gradient are the same sums either way."""
    heads = Counter(tuple(e.tokens[:head]) for e in examples)
    common, count = heads.most_common(1)[0]
    if count < 2 or count == len(examples):
        return [examples]
    alike = [e for e in examples if tuple(e.tokens[:head]) == common]
    if shared_prefix(collate(alike), gradient_checkpointing, at_least=head) == 0:
        return [examples]  # nothing to save (targets in the common start, checkpointing, several processes)
    return [alike, [e for e in examples if tuple(e.tokens[:head]) != common]]


def evaluate(model, examples, cfg, device, autocast):
    """Mean loss per target token over the validation examples (each process takes a share)."""
    rank, world_size = world()
    model.eval()
    examples = examples[:len(examples) - len(examples) % world_size]  # equal shares: FSDP needs them
    if not examples:
        raise ValueError(f"the validation set has fewer examples than the {world_size} processes")
    mine = examples[rank::world_size]
    per = max(1, cfg.batch_size // world_size)
    batches = [mine[i:i + per] for i in range(0, len(mine), per)][:cfg.eval_batches]
    total, count = 0.0, 0
    for batch in batches:
        b = collate(batch)
        with autocast:
            _, loss = model(b["input_ids"].to(device), b["labels"].to(device),
                            shared_prefix=shared_prefix(b, cfg.gradient_checkpointing))
        n = sum(n_targets(e) for e in batch)
        total, count = total + loss.item() * n, count + n
    model.train()
    total, count = all_sum([total, count], device)
    return total / max(count, 1)


def keep_metrics_until(path, step):
    """Keep the metrics of the steps a checkpoint has; forget those done after it (they will be
    done again), and a last line torn by a crash."""
    kept = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= step:
            kept.append(line + "\n")
    path.write_text("".join(kept))


def log_line(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
