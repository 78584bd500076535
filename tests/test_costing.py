"""The full-size recipe's arithmetic: parameter counts against transformers and PEFT, the memory of
weights, gradients and AdamW against tensors allocated on CPU, one block's activations against what
autograd saves, and the dry run's command line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from speechgpt_min.costing import (STAGES, block_activation_bytes, closed_form_lora_params, closed_form_params,
                                   matmul_params, memory_per_gpu, param_counts, report, speechgpt_config,
                                   split_batch, stage_settings)
from speechgpt_min.lora import LoRAConfig, inject
from speechgpt_min.model import LMConfig, Transformer
from speechgpt_min.trainer import TrainConfig, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
SMALL = LMConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=32)
LLAMA_7B = 6_738_415_616  # LLaMA-7B's parameters at its own vocabulary of 32000


# ----------------------------------------------------------------------------- parameters

def test_7b_count_matches_transformers_llama_and_the_closed_form(transformers):
    cfg = speechgpt_config("llama-7b", n_units=1000)
    assert cfg.vocab_size == 32000 + 1000 + 6 == 33006  # SpeechGPT-7B-cm's vocabulary
    hf_config = transformers.LlamaConfig(vocab_size=33006, hidden_size=4096, intermediate_size=11008,
                                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                         max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_config)
    n_hf = sum(p.numel() for p in hf.parameters())
    assert param_counts(cfg)["total"] == closed_form_params(cfg) == n_hf == 6_746_656_768
    assert n_hf - LLAMA_7B == 2 * 1006 * 4096  # one new row of embed_tokens and of lm_head per added token
    assert closed_form_params(LMConfig.from_preset("llama-7b")) == LLAMA_7B
    # the FLOPs' M: every matrix a token is multiplied with, lm_head included, the embedding lookup not
    assert matmul_params(cfg) == sum(m.weight.numel() for m in hf.modules() if isinstance(m, nn.Linear))


def test_released_lora_count_matches_peft(transformers, peft):
    cfg, lora = speechgpt_config("llama-7b"), LoRAConfig.from_preset("speechgpt")
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=33006, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
            tie_word_embeddings=False))
        peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                             task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]))
    trainable, total = peft_model.get_nb_trainable_parameters()
    counts = param_counts(cfg, lora)
    assert counts["trainable"] == closed_form_lora_params(cfg, lora) == trainable == 32 * 2 * 8 * (4096 + 4096)
    assert counts["total"] == total and counts["trainable_tensors"] == 32 * 2 * 2  # A and B of q and v


def test_closed_forms_hold_for_grouped_query_and_tied_models():
    tied = LMConfig.from_preset("smollm2-135m")
    assert param_counts(tied)["total"] == closed_form_params(tied)
    every = LoRAConfig.from_preset("toy")
    assert param_counts(SMALL, every)["trainable"] == closed_form_lora_params(SMALL, every)


# ----------------------------------------------------------------------------- memory

def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("lora", [None, LoRAConfig.from_preset("speechgpt")], ids=["full", "lora"])
def test_weights_gradients_and_adamw_take_what_the_formula_says(lora):
    torch.manual_seed(0)
    model = Transformer(SMALL)
    if lora is not None:
        inject(model, lora)
    optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))  # the trainer's AdamW
    ids = torch.randint(0, SMALL.vocab_size, (2, 17))
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    optimizer.step()
    measured = {"weights": nbytes(model.parameters()),
                "gradients": nbytes(p.grad for p in model.parameters() if p.grad is not None),
                "adamw": nbytes(t for state in optimizer.state.values() for t in state.values())}
    counts = param_counts(SMALL, lora)
    one = memory_per_gpu(SMALL, counts, n_gpus=1, micro=2, seq_len=16)
    assert {part: one[part] for part in measured} == measured
    # over 4 GPUs every sharded part divides by 4; the step counts (one per tensor) stay whole
    four, steps = memory_per_gpu(SMALL, counts, n_gpus=4, micro=2, seq_len=16), 4 * counts["trainable_tensors"]
    assert four["weights"] == one["weights"] / 4 and four["gradients"] == one["gradients"] / 4
    assert four["adamw"] - steps == (one["adamw"] - steps) / 4
    assert one["fsdp_whole_layers"] == 0 < four["fsdp_whole_layers"]  # no FSDP on one GPU


@pytest.mark.parametrize("cfg", [SMALL, LMConfig(vocab_size=96, dim=96, n_layers=1, n_heads=6, ffn_dim=256)])
def test_one_blocks_saved_activations_are_counted(cfg):
    """What autograd keeps for one block's backward under bf16 autocast, fp32 residual stream in:
    measured per token from two batch sizes, so the weights' bf16 copies cancel."""
    model, T = Transformer(cfg), 24
    block, cos, sin = model.layers[0], model.rope_cos[:T], model.rope_sin[:T]

    def saved_bytes(batch):
        storages = {}

        def keep(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        x = torch.randn(batch, T, cfg.dim, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            block(x, cos, sin)
        return sum(storages.values())
    assert (saved_bytes(3) - saved_bytes(1)) / (2 * T) == block_activation_bytes(cfg)


def test_autocast_keeps_a_bf16_copy_of_trainable_weights_only():
    """The estimate's autocast term: within one autocast region a trainable weight is cast once and the
    copy kept (it lives until the region ends); a frozen weight is cast anew at every use."""
    linear = nn.Linear(8, 8, bias=False)
    for trainable in (True, False):
        linear.weight.requires_grad_(trainable)
        copies = []

        def keep(t):
            if t.shape == (8, 8):
                copies.append(t.data_ptr())
            return t
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            linear(torch.randn(2, 8, requires_grad=True))
            linear(torch.randn(2, 8, requires_grad=True))
        assert (copies[0] == copies[1]) == trainable


# ----------------------------------------------------------------------------- the recipe

@pytest.mark.parametrize("n_gpus", [1, 8, 64])
def test_stage_batches_split_into_the_trainers_settings(n_gpus):
    for stage in STAGES:
        batch_size, grad_accum = split_batch(stage, n_gpus)
        assert batch_size * grad_accum == stage.batch and batch_size % n_gpus == 0
        assert batch_size // n_gpus <= stage.micro
    settings = stage_settings(n_gpus)
    assert settings["stage0"]["steps"] == 0 and all(TrainConfig(**settings[s.name]).fsdp for s in STAGES)


def test_a_batch_that_does_not_split_is_named():
    with pytest.raises(ValueError, match="stage3's batch of 128 sequences does not split over 96 GPUs"):
        split_batch(STAGES[2], 96)
    text = report("llama-7b", 1000, 11, "speechgpt", n_gpus=96, mfu=0.4)  # the paper's 96 GPUs of stages 1-2
    assert "stage3 its batch of 128 sequences does not split over 96 GPUs" in text
    assert text.count("torchrun --nnodes 12 --nproc_per_node 8") == 2


def run_train(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_dry_run_prints_every_stage_and_its_command():
    result = run_train("--preset", "speechgpt-7b", "--dry-run", "--nproc", "8")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "vocabulary 32000 text + 1000 units (HuBERT layer 11, k-means K=1000) + 6 special = 33006" in lines[0]
    for stage, params in (("stage1", "6.75B (6.75B)"), ("stage2", "6.75B (6.75B)"), ("stage3", "6.75B (4.19M)")):
        assert any(line.startswith(stage) and params in line for line in lines)
        assert any(line.startswith(f"torchrun --standalone --nproc_per_node 8 train.py --preset speechgpt-7b "
                                   f"--stage {stage} ") for line in lines)


def test_full_size_without_dry_run_refuses_in_one_line():
    result = run_train("--preset", "speechgpt-7b")
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "--init-from" in result.stderr and "GPUs" in result.stderr
