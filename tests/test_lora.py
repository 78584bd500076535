"""LoRA: the layer's math, merge/unmerge, trainable parameters, and PEFT's adapter files both ways."""
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from speechgpt_min.lora import (LoRAConfig, LoRAError, LoRALinear, inject, load_adapter, lora_layers,
                                lora_state_dict, merge, merge_and_unload, save_adapter, unmerge)
from speechgpt_min.model import LMConfig, Transformer

CFG = LMConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(CFG).eval()


def randomize_lora(model, seed=1):
    """Training-like adapter: B nonzero (it starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.3)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.3)


@pytest.fixture
def ids():
    return torch.randint(0, CFG.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- config and layer

def test_config_presets():
    cfg = LoRAConfig.from_preset("speechgpt")
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules) == (8, 16, 0.05, ("q_proj", "v_proj"))
    assert cfg == LoRAConfig() and cfg.scaling == 2.0
    with pytest.raises(ValueError, match="valid presets: speechgpt"):
        LoRAConfig.from_preset("speech")
    assert LoRAConfig.from_preset("toy", r=4).r == 4
    with pytest.raises(ValueError, match="rank"):  # checked after the overrides
        LoRAConfig.from_preset("toy", r=0)
    with pytest.raises(ValueError, match=r"unknown LoRAConfig field\(s\) \['rank'\]; fields: r, alpha"):
        LoRAConfig.from_preset("toy", rank=4)
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(r=0)


def test_lora_linear_math():
    torch.manual_seed(0)
    base = nn.Linear(20, 12, bias=True)
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.0)
    x = torch.randn(3, 5, 20)
    torch.testing.assert_close(layer(x), x @ w.T + b)  # B = 0: the base layer exactly
    bound = 1 / 20 ** 0.5  # kaiming_uniform(a=sqrt(5)) as PEFT: U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > bound / 2
    assert torch.all(layer.lora_B.weight == 0)
    nn.init.normal_(layer.lora_B.weight)
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    torch.testing.assert_close(layer(x), x @ w.T + b + 2.0 * (x @ A.T @ B.T))


def test_inject_replaces_targets_and_freezes_the_rest(ids):
    model = tiny_model()
    before = model(ids)
    inject(model, LoRAConfig())
    assert sorted(lora_layers(model)) == [f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert isinstance(model.layers[0].self_attn.k_proj, nn.Linear)
    torch.testing.assert_close(model(ids), before)  # B starts at zero
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(lora_state_dict(model)) and len(trainable) == 8
    # The base keys are unchanged; the adapter adds lora_A / lora_B.
    assert "layers.0.self_attn.q_proj.weight" in model.state_dict()
    assert "layers.0.self_attn.q_proj.lora_A.weight" in model.state_dict()

    model.train()
    _, loss = model(ids, ids)
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    # With B = 0 only B gets a nonzero gradient at the first step (dL/dA has a factor B).
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)
    assert all(p.grad is not None for n, p in model.named_parameters() if ".lora_A." in n)
    with pytest.raises(LoRAError, match="already has LoRA"):
        inject(model, LoRAConfig())


def test_inject_errors():
    with pytest.raises(LoRAError, match="no module named"):
        inject(tiny_model(), LoRAConfig(target_modules=("query",)))
    with pytest.raises(LoRAError, match="only nn.Linear"):
        inject(tiny_model(), LoRAConfig(target_modules=("norm",)))


def test_merge_equals_unmerged_and_unmerge_restores(ids):
    model = inject(tiny_model(), LoRAConfig())
    base_weight = model.layers[1].self_attn.v_proj.weight.detach().clone()
    randomize_lora(model)
    unmerged = model(ids)
    merge(model)
    assert not torch.allclose(model.layers[1].self_attn.v_proj.weight, base_weight)
    torch.testing.assert_close(model(ids), unmerged, atol=1e-5, rtol=1e-5)
    unmerge(model)
    torch.testing.assert_close(model.layers[1].self_attn.v_proj.weight, base_weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(ids), unmerged)

    merge_and_unload(model)
    assert not lora_layers(model) and type(model.layers[0].self_attn.q_proj) is nn.Linear
    assert set(model.state_dict()) == set(tiny_model().state_dict())
    torch.testing.assert_close(model(ids), unmerged, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- PEFT files

@pytest.mark.parametrize("safetensors", [True, False])
def test_save_load_round_trip(tmp_path, ids, safetensors):
    model = inject(tiny_model(), LoRAConfig())
    randomize_lora(model)
    save_adapter(model, tmp_path, LoRAConfig(), base_model_name_or_path="toy")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.05)
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["base_model_name_or_path"] == "toy"
    if not safetensors:  # the .bin layout of the released SpeechGPT-7B-com
        torch.save(load_file(tmp_path / "adapter_model.safetensors"), tmp_path / "adapter_model.bin")
        (tmp_path / "adapter_model.safetensors").unlink()

    fresh = tiny_model()  # same base weights, no LoRA yet: load_adapter injects
    assert load_adapter(fresh, tmp_path) == LoRAConfig()
    torch.testing.assert_close(fresh(ids), model(ids))


def test_saved_keys_follow_peft(tmp_path):
    model = inject(tiny_model(), LoRAConfig())
    save_adapter(model, tmp_path, LoRAConfig())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 8
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 32)
    assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (16, 8)


def test_load_accepts_adapter_name_in_keys(tmp_path, ids):
    model = inject(tiny_model(), LoRAConfig())
    randomize_lora(model)
    save_adapter(model, tmp_path, LoRAConfig())
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}, path)
    fresh = tiny_model()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids), model(ids))


def edit_adapter(directory, edit):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 31)}),
     r"layers.0.self_attn.q_proj.lora_A.weight: shape \(8, 31\)"),
    (lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"),
     r"no tensor for 1 LoRA parameters, e.g. \['layers.1.self_attn.v_proj.lora_B.weight'\]"),
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(8, 32)}),
     "k_proj.lora_A.weight: the model has no LoRA parameter"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 32)}),
     "model.layers.0.self_attn.q_proj.lora_A.weight: expected the key prefix"),
])
def test_load_errors_name_the_tensor(tmp_path, edit, message):
    save_adapter(inject(tiny_model(), LoRAConfig()), tmp_path, LoRAConfig())
    edit_adapter(tmp_path, edit)
    with pytest.raises(LoRAError, match=message):
        load_adapter(tiny_model(), tmp_path)


def test_load_refuses_unsupported_configs(tmp_path):
    with pytest.raises(LoRAError, match="no adapter_config.json"):
        load_adapter(tiny_model(), tmp_path)
    save_adapter(inject(tiny_model(), LoRAConfig()), tmp_path, LoRAConfig())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True)))
    with pytest.raises(LoRAError, match="use_dora=True is not supported"):
        load_adapter(tiny_model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(LoRAError, match="no adapter weights"):
        load_adapter(tiny_model(), tmp_path)
    merged = inject(tiny_model(), LoRAConfig())
    merge(merged)
    with pytest.raises(LoRAError, match="unmerge"):
        load_adapter(merged, tmp_path)


# ----------------------------------------------------------------------------- against the peft library

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, transformers):
    """A tiny random transformers LlamaForCausalLM saved to disk, the same shape as CFG."""
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=CFG.vocab_size, hidden_size=CFG.dim, intermediate_size=CFG.ffn_dim,
        num_hidden_layers=CFG.n_layers, num_attention_heads=CFG.n_heads, num_key_value_heads=CFG.n_kv_heads,
        max_position_embeddings=CFG.max_seq_len, rms_norm_eps=CFG.norm_eps, tie_word_embeddings=False)
    d = tmp_path_factory.mktemp("hf_llama")
    transformers.LlamaForCausalLM(hf_config).save_pretrained(d)
    return d


def hf_model(hf_dir):
    import transformers
    return transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def our_model(hf_dir):
    from speechgpt_min.weights import load_pretrained
    return load_pretrained(hf_dir).eval()


def test_loads_adapter_saved_by_peft(hf_dir, tmp_path, ids, peft):
    peft_model = peft.get_peft_model(hf_model(hf_dir), peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():  # training-like adapter: B (zero at init) and A random
        g = torch.Generator().manual_seed(3)
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    expected = peft_model(ids).logits
    assert not torch.allclose(expected, hf_model(hf_dir)(ids).logits, atol=1e-3)  # the adapter matters

    ours = our_model(hf_dir)
    config = load_adapter(ours, tmp_path)
    assert (config.r, config.alpha, config.dropout) == (8, 16, 0.05)
    assert set(config.target_modules) == {"q_proj", "v_proj"}  # peft saves a set: any order
    torch.testing.assert_close(ours(ids), expected, atol=1e-5, rtol=1e-5)

    plain_hf = hf_model(hf_dir)  # the HF module tree, stripped of peft: paths already start with "model."
    load_adapter(plain_hf, tmp_path, prefix="base_model.model.")
    torch.testing.assert_close(plain_hf(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_peft_loads_adapter_saved_by_us(hf_dir, tmp_path, ids, peft):
    ours = inject(our_model(hf_dir), LoRAConfig.from_preset("speechgpt"))
    randomize_lora(ours)
    save_adapter(ours, tmp_path, LoRAConfig.from_preset("speechgpt"), base_model_name_or_path=str(hf_dir))
    peft_model = peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path).eval()
    assert peft_model.peft_config["default"].r == 8 and peft_model.peft_config["default"].lora_alpha == 16
    assert not torch.allclose(ours(ids), hf_model(hf_dir)(ids).logits, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(peft_model(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
