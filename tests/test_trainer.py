"""The training loop: learning on all three stages, exact resume after kill -9, LoRA-only training,
two gloo processes equal to one, metrics and atomic checkpoints, a text stream beside the examples."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import FSDPModule

from speechgpt_min.data import (
    CHAIN_VARIANTS, encode_dialogues, pack_blocks, stage1_texts, stage2_dialogues, stage3_dialogues,
)
from speechgpt_min.lora import LoRAConfig, inject, lora_state_dict
from speechgpt_min.model import IGNORE_INDEX, LMConfig, Transformer
from speechgpt_min.tokenizer import Tokenizer
from speechgpt_min.checkpoint import save_checkpoint
from speechgpt_min.device import resolve_device
from speechgpt_min.distributed import init_distributed
from speechgpt_min.trainer import (
    CHECKPOINT_FILE, METRICS_FILE, DataOrder, TrainConfig, keep_metrics_until, lr_at, shared_prefix, train,
)

WORDS = "the a frog cat dog sings sleeps runs red blue green big small one two three four".split()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and far faster on a shared, busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def corpus(n_rows=32, n_pairs=16, k=16, seed=0):
    """Synthetic utterances and spoken question/answer pairs with made-up units."""
    rng = random.Random(seed)
    rows = [{"id": f"u{i}", "split": "train", "text": " ".join(rng.choices(WORDS, k=rng.randint(3, 5)))}
            for i in range(n_rows)]
    pairs = [{"id": f"p{i}", "split": "train",
              "question": {"text": f"what is {WORDS[i % 5]}", "audio": [f"q{i}"]},
              "answer": {"text": f"it is {WORDS[(i + 1) % 5]}", "audio": [f"a{i}"]}} for i in range(n_pairs)]
    ids = [r["id"] for r in rows] + [f"q{i}" for i in range(n_pairs)] + [f"a{i}" for i in range(n_pairs)]
    units = {i: [rng.randrange(k) for _ in range(rng.randint(6, 14))] for i in ids}
    return rows, pairs, units


def setup_run(out_dir, stage=2, model_seed=0, **overrides):
    """A tiny model, a tokenizer and one stage's examples; returns (model, train_set, val_set, cfg)."""
    rows, pairs, units = corpus()
    d2 = stage2_dialogues(rows, units)
    d3 = stage3_dialogues(pairs, units, variants=CHAIN_VARIANTS)
    tok = Tokenizer.train([d.text(system_prompt="") for d in d2 + d3], n_units=16)
    if stage == 1:
        examples = pack_blocks(tok, stage1_texts(rows, units), block_size=32)
    else:  # a short system prompt keeps the examples small
        examples = encode_dialogues(tok, d2 if stage == 2 else d3, max_len=128, system_prompt="sys\n")
    torch.manual_seed(model_seed)
    model = Transformer(LMConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, ffn_dim=64,
                                 max_seq_len=128))
    # float32: the same numbers on every machine ("auto" would pick bf16 autocast where it is fast)
    fields = dict(out_dir=str(out_dir), steps=30, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=3,
                  eval_every=10, checkpoint_every=10, device="cpu", dtype="float32", progress=False)
    fields.update(overrides)
    return model, examples[4:], examples[:4], TrainConfig(**fields)


def losses(out_dir):
    return [json.loads(line)["loss"] for line in (Path(out_dir) / METRICS_FILE).read_text().splitlines()]


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- learning

@pytest.mark.parametrize("stage", [1, 2, 3])
def test_loss_falls_on_each_stage(tmp_path, stage):
    model, train_set, val_set, cfg = setup_run(tmp_path, stage=stage, steps=40, eval_every=40)
    history = train(model, train_set, cfg, val_set)
    first, last = history[0]["loss"], sum(r["loss"] for r in history[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert history[-1]["val_loss"] < first - 1.0


def test_metrics_jsonl_and_schedule(tmp_path):
    model, train_set, val_set, cfg = setup_run(tmp_path, steps=12, eval_every=5)
    history = train(model, train_set, cfg, val_set)
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert lines == history and [r["step"] for r in lines] == list(range(1, 13))
    assert [r["step"] for r in lines if "val_loss" in r] == [5, 10, 12]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["seconds"] > 0 for r in lines)
    lrs = [lr_at(s, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps) for s in range(12)]
    assert [r["lr"] for r in lines] == lrs
    assert lrs[0] < lrs[2] < lrs[3] == pytest.approx(cfg.lr) and lrs[11] == pytest.approx(cfg.min_lr)


def test_the_one_schedule_warms_up_then_decays_along_a_cosine_or_a_line():
    assert [lr_at(s, 5, 1.0, 0.0, warmup_steps=1) for s in range(5)] == pytest.approx([0.5, 1.0, 0.75, 0.25, 0.0])
    assert [lr_at(s, 5, 1.0, 0.0, warmup_steps=1, decay="linear") for s in range(5)] == pytest.approx(
        [0.5, 1.0, 2 / 3, 1 / 3, 0.0])
    assert [lr_at(s, 3, 0.1, min_lr=0.1) for s in range(3)] == [0.1, 0.1, 0.1]  # constant
    with pytest.raises(ValueError, match="valid: cosine, linear"):
        lr_at(0, 3, 0.1, decay="step")


def test_data_order_is_a_seeded_permutation_per_epoch():
    order = DataOrder(5, seed=3)
    first, second = order.take(5), order.take(5)
    assert sorted(first) == sorted(second) == list(range(5)) and first != second
    resumed = DataOrder(5, seed=3, epoch=0, index=3)
    assert resumed.take(4) == first[3:] + second[:2]


def test_seeded_runs_are_reproducible(tmp_path):
    for name in ("a", "b"):
        model, train_set, val_set, cfg = setup_run(tmp_path / name, steps=6)
        train(model, train_set, cfg, val_set)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


# ----------------------------------------------------------------------------- resume

KILLED_RUN = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from test_trainer import setup_lora_run
from speechgpt_min.trainer import train
torch.set_num_threads({threads})
model, train_set, val_set, cfg = setup_lora_run({out!r}, **{overrides!r})
forward, metrics = model.forward, os.path.join({out!r}, "metrics.jsonl")
def forward_then_die(*args, **kwargs):
    if os.path.exists(metrics) and len(open(metrics).readlines()) == {kill_after}:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handlers: a real crash
    return forward(*args, **kwargs)
model.forward = forward_then_die
train(model, train_set, cfg, val_set)
"""


class SimulatedCrash(Exception):
    pass


def crash_after(model, out_dir, logged_steps):
    """Make the model's forward raise SimulatedCrash once `logged_steps` steps are in out_dir's metrics."""
    forward = model.forward

    def forward_then_raise(*args, **kwargs):
        if len(losses(out_dir)) == logged_steps:
            raise SimulatedCrash
        return forward(*args, **kwargs)

    model.forward = forward_then_raise


@pytest.mark.parametrize("stage, crash", [(2, "exception"), (3, "kill -9")])
def test_resume_after_a_crash_is_exact(tmp_path, stage, crash):
    overrides = dict(stage=stage, steps=14, grad_accum=2, eval_every=4, checkpoint_every=4)
    if stage == 3:  # LoRA with dropout: the RNG state must be restored too
        overrides.update(lora=True)
    model, train_set, val_set, cfg = setup_lora_run(tmp_path / "straight", **overrides)
    train(model, train_set, cfg, val_set)
    expected = params(model)

    # the first forward once step 9 is logged is in step 10, after the step-8 checkpoint
    if crash == "kill -9":
        script = KILLED_RUN.format(tests=str(Path(__file__).parent), threads=torch.get_num_threads(),
                                   out=str(tmp_path / "crashed"), overrides=overrides, kill_after=9)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert done.returncode == -signal.SIGKILL, done.stderr
    else:
        model, train_set, val_set, cfg = setup_lora_run(tmp_path / "crashed", **overrides)
        crash_after(model, tmp_path / "crashed", 9)
        with pytest.raises(SimulatedCrash):
            train(model, train_set, cfg, val_set)
    assert len(losses(tmp_path / "crashed")) == 9  # step 9 was logged, then the run died in step 10
    assert torch.load(tmp_path / "crashed" / CHECKPOINT_FILE, weights_only=True)["step"] == 8

    # a full model restarts from other initial weights (the checkpoint has them all); a LoRA run from
    # the same frozen base (the previous stage's model), its adapter from the checkpoint
    model_seed = 0 if stage == 3 else 1
    model, train_set, val_set, cfg = setup_lora_run(tmp_path / "crashed", model_seed=model_seed, **overrides)
    history = train(model, train_set, cfg, val_set)
    assert [r["step"] for r in history] == list(range(9, 15))
    straight = [json.loads(line) for line in (tmp_path / "straight" / METRICS_FILE).read_text().splitlines()]
    resumed = [json.loads(line) for line in (tmp_path / "crashed" / METRICS_FILE).read_text().splitlines()]
    for a, b in zip(straight, resumed, strict=True):  # bit for bit, including the validation losses
        assert (a["step"], a["loss"], a["grad_norm"], a.get("val_loss")) == (b["step"], b["loss"], b["grad_norm"],
                                                                              b.get("val_loss"))
    got = params(model)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def setup_lora_run(out_dir, lora=False, **kwargs):
    """setup_run, and for lora=True a LoRA (r=4, dropout 0.1) on q_proj/v_proj with the base frozen."""
    model, train_set, val_set, cfg = setup_run(out_dir, **kwargs)
    if lora:
        inject(model, LoRAConfig(r=4, alpha=8, dropout=0.1))
    return model, train_set, val_set, cfg


def test_resume_refuses_a_different_data_order(tmp_path):
    model, train_set, val_set, cfg = setup_run(tmp_path, steps=2)
    train(model, train_set, cfg, val_set)
    model, train_set, val_set, cfg = setup_run(tmp_path, steps=4, batch_size=2)
    with pytest.raises(ValueError, match="batch_size=4, this run has 2"):
        train(model, train_set, cfg, val_set)


def test_checkpoint_write_crash_keeps_the_previous_one(tmp_path, monkeypatch):
    model, train_set, val_set, cfg = setup_run(tmp_path, steps=4, checkpoint_every=2)
    train(model, train_set, cfg, val_set)  # checkpoint of step 4
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()

    def half_written_then_crash(obj, f):
        f.write(b"\x00" * 1000)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_written_then_crash)
    model, train_set, val_set, cfg = setup_run(tmp_path, steps=6, checkpoint_every=2)
    with pytest.raises(OSError, match="disk full"):
        train(model, train_set, cfg, val_set)  # resumes at 4, crashes while writing step 6
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE, METRICS_FILE]
    with pytest.raises(OSError):
        save_checkpoint({"x": torch.zeros(1)}, tmp_path / CHECKPOINT_FILE)
    assert torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["step"] == 4


def test_metrics_after_the_checkpoint_and_a_torn_line_are_forgotten(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo')
    keep_metrics_until(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


# ----------------------------------------------------------------------------- LoRA

def test_lora_training_leaves_the_base_untouched(tmp_path):
    model, train_set, val_set, cfg = setup_lora_run(tmp_path, lora=True, stage=3, steps=5)
    base = {k: v for k, v in params(model).items() if ".lora_" not in k}
    lora_before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    train(model, train_set, cfg, val_set)
    after = params(model)
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert all(not torch.equal(after[k], v) for k, v in lora_before.items() if ".lora_B." in k)
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["model"]
    assert set(saved) == set(lora_before)  # only the adapter is checkpointed


# ----------------------------------------------------------------------------- processes

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_worker(rank, world_size, port, tmp_path, overrides):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert init_distributed() == (rank, world_size)  # as under torchrun
    try:
        for fsdp in (False, True):
            out_dir = tmp_path / f"two_fsdp{fsdp}"
            model, train_set, val_set, cfg = setup_run(out_dir, fsdp=fsdp, **dict(overrides, steps=3))
            train(model, train_set, cfg, val_set)
            assert isinstance(model, FSDPModule) == fsdp  # FSDP shards the model in place
            # resume, from other initial weights: everything must come from the checkpoint
            model, train_set, val_set, cfg = setup_run(out_dir, fsdp=fsdp, model_seed=1, **overrides)
            train(model, train_set, cfg, val_set)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path):
    """DDP and FSDP over two processes (2 examples each per micro-batch), stopped at step 3 and
    resumed, against one process (4 examples per micro-batch) running straight through."""
    overrides = dict(steps=6, batch_size=4, grad_accum=2, eval_every=3, checkpoint_every=6)
    model, train_set, val_set, cfg = setup_run(tmp_path / "one", **overrides)
    train(model, train_set, cfg, val_set)
    mp.start_processes(distributed_worker, args=(2, free_port(), tmp_path, overrides), nprocs=2, start_method="spawn")

    one = [json.loads(line) for line in (tmp_path / "one" / METRICS_FILE).read_text().splitlines()]
    weights_one = torch.load(tmp_path / "one" / CHECKPOINT_FILE, weights_only=True)["model"]
    for fsdp in (False, True):
        two = [json.loads(line) for line in (tmp_path / f"two_fsdp{fsdp}" / METRICS_FILE).read_text().splitlines()]
        for key in ("loss", "grad_norm"):
            torch.testing.assert_close(torch.tensor([r[key] for r in two]), torch.tensor([r[key] for r in one]))
        torch.testing.assert_close(torch.tensor([r["val_loss"] for r in two if "val_loss" in r]),
                                   torch.tensor([r["val_loss"] for r in one if "val_loss" in r]))
        weights_two = torch.load(tmp_path / f"two_fsdp{fsdp}" / CHECKPOINT_FILE, weights_only=True)["model"]
        torch.testing.assert_close(weights_two, weights_one)


# ----------------------------------------------------------------------------- configuration

def test_activation_checkpointing_and_cpu_bf16(tmp_path):
    model, train_set, val_set, cfg = setup_run(tmp_path / "plain", steps=4)
    plain = [r["loss"] for r in train(model, train_set, cfg, val_set)]
    model, train_set, val_set, cfg = setup_run(tmp_path / "ckpt", steps=4, gradient_checkpointing=True)
    recomputed = [r["loss"] for r in train(model, train_set, cfg, val_set)]  # whole rows, no shared prefix
    torch.testing.assert_close(torch.tensor(recomputed), torch.tensor(plain), rtol=1e-6, atol=1e-6)
    assert model.gradient_checkpointing
    model, train_set, val_set, cfg = setup_run(tmp_path / "bf16", steps=4, dtype="bfloat16")
    bf16 = [r["loss"] for r in train(model, train_set, cfg, val_set)]
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(plain), rtol=0.05, atol=0.05)
    assert bf16 != plain  # autocast did run in bfloat16


def test_config_and_device_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="valid: auto, float32, bfloat16"):
        TrainConfig(dtype="fp16")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0)


def test_a_shared_prefix_is_computed_once_with_the_same_loss_and_gradients():
    """Rows that start alike (BOS + system prompt) run their common prefix once: same loss, same gradients."""
    torch.manual_seed(0)
    model = Transformer(LMConfig.from_preset("toy", vocab_size=300, n_layers=2, n_kv_heads=2))
    x = torch.randint(0, 300, (4, 50))
    x[:, :20] = x[0, :20]
    y = torch.randint(0, 300, (4, 50))
    y[:, :23] = IGNORE_INDEX  # the prompt carries no loss
    batch = {"input_ids": x, "labels": y, "lengths": torch.tensor([50, 45, 50, 50])}
    assert shared_prefix(batch, gradient_checkpointing=False) == 20
    assert shared_prefix(batch, gradient_checkpointing=True) == 0
    assert shared_prefix({**batch, "labels": torch.zeros_like(y)}, gradient_checkpointing=False) == 0  # targets in it
    results = []
    for prefix in (0, 20):
        model.zero_grad()
        _, loss = model(x, y, shared_prefix=prefix)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_mixed_batch_splits_into_prefix_groups_with_the_same_loss_and_gradients():
    """Instruction examples (BOS + system prompt) mixed with text lines: the loop runs the two kinds as
    two parts, each part's loss weighted by its share of the targets, which sums to the whole batch's."""
    from speechgpt_min.data import Example, collate, n_targets
    from speechgpt_min.trainer import prefix_groups

    torch.manual_seed(0)
    prompt = torch.randint(4, 300, (20,)).tolist()
    prompted = [Example(prompt + torch.randint(4, 300, (n,)).tolist(), [IGNORE_INDEX] * 22 +
                        torch.randint(4, 300, (n - 2,)).tolist()) for n in (12, 30, 18)]
    lines = [Example(t, t) for t in (torch.randint(4, 300, (n,)).tolist() for n in (7, 9))]
    batch = [prompted[0], lines[0], prompted[1], lines[1], prompted[2]]
    parts = prefix_groups(batch, gradient_checkpointing=False)
    assert parts == [prompted, lines]
    assert prefix_groups(prompted, False) == [prompted] and prefix_groups(lines, False) == [lines]
    assert prefix_groups(batch, gradient_checkpointing=True) == [batch]  # checkpointing needs whole rows
    model = Transformer(LMConfig.from_preset("toy", vocab_size=300, n_layers=2))
    total = sum(n_targets(e) for e in batch)

    def loss_and_grads(groups):
        model.zero_grad()
        value = 0.0
        for part in groups:
            b = collate(part)
            _, loss = model(b["input_ids"], b["labels"], shared_prefix=shared_prefix(b, False))
            loss = loss * sum(n_targets(e) for e in part) / total
            loss.backward()
            value += loss.item()
        return value, [p.grad.clone() for p in model.parameters()]

    whole, split = loss_and_grads([batch]), loss_and_grads(parts)
    assert whole[0] == pytest.approx(split[0], rel=1e-5)
    for a, b in zip(whole[1], split[1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_a_text_stream_adds_its_own_mean_loss_and_resumes_exactly(tmp_path):
    """train(text_set=...): each step also reads text_batch_size examples of a second list, whose mean
    loss is added to the step's mean (times text_weight); a run that dies continues both streams exactly."""
    from contextlib import nullcontext

    from speechgpt_min.data import collate, n_targets
    from speechgpt_min.trainer import backward

    model, train_set, val_set, cfg = setup_run(tmp_path / "grads", steps=10, text_batch_size=4, text_weight=0.5)
    main, text = train_set[:4], train_set[4:12]
    model.zero_grad()
    backward(model, main, sum(n_targets(e) for e in main), 1.0, True, cfg, torch.device("cpu"), nullcontext())
    backward(model, text, sum(n_targets(e) for e in text), 0.5, True, cfg, torch.device("cpu"), nullcontext())
    streamed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (b1, b2) = collate(main), collate(text)
    (model(b1["input_ids"], b1["labels"])[1] + 0.5 * model(b2["input_ids"], b2["labels"])[1]).backward()
    for a, b in zip(streamed, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    with pytest.raises(ValueError, match="text_batch_size >= 1"):
        train(model, train_set, TrainConfig(**{**cfg.__dict__, "text_batch_size": 0}), val_set, text_set=text)

    overrides = dict(steps=10, text_batch_size=4, text_weight=0.5, checkpoint_every=4)
    model, train_set, val_set, cfg = setup_run(tmp_path / "straight", **overrides)
    straight = train(model, train_set[:20], cfg, val_set, text_set=train_set[20:])
    assert all("text_loss" in r for r in straight) and straight[-1]["text_loss"] < straight[0]["text_loss"]

    model, train_set, val_set, cfg = setup_run(tmp_path / "crashed", **overrides)
    crash_after(model, tmp_path / "crashed", 6)
    with pytest.raises(SimulatedCrash):
        train(model, train_set[:20], cfg, val_set, text_set=train_set[20:])
    model, train_set, val_set, cfg = setup_run(tmp_path / "crashed", model_seed=1, **overrides)
    resumed = train(model, train_set[:20], cfg, val_set, text_set=train_set[20:])
    assert [r["step"] for r in resumed] == list(range(5, 11))  # from the step-4 checkpoint
    for a, b in zip(straight[4:], resumed, strict=True):
        assert (a["loss"], a["text_loss"], a["grad_norm"]) == (b["loss"], b["text_loss"], b["grad_norm"])
