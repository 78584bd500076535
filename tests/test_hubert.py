"""HuBERT encoder: parity with transformers' HubertModel, checkpoint formats, pretraining, framing, and the
whole recipe (train_unit_encoder)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from speechgpt_min.audio import mfcc
from speechgpt_min.hubert import HuBERT, HubertConfig, extract_features, frame_lengths
from speechgpt_min import hubert_training
from speechgpt_min.hubert_training import mfcc_features, pretrain, span_mask, train_unit_encoder
from speechgpt_min.units import speech_to_units


SMALL = dict(conv_dim=(16, 16, 24, 24, 24, 32, 32), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=48, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, transformers):
    """A random-init transformers HubertModel saved as config.json + model.safetensors."""
    torch.manual_seed(0)
    model = transformers.HubertModel(transformers.HubertConfig(**SMALL)).eval()
    directory = tmp_path_factory.mktemp("hf_hubert")
    model.save_pretrained(directory)
    return directory, model


def test_parity_every_layer(hf_dir):
    directory, hf = hf_dir
    ours = HuBERT.from_pretrained(directory)
    wav = torch.randn(2, 8000)
    with torch.no_grad():
        ref = hf(wav, output_hidden_states=True).hidden_states
        hidden, pad_mask = ours(wav)
    assert pad_mask is None and len(hidden) == len(ref) == SMALL["num_hidden_layers"] + 1
    for layer, (a, b) in enumerate(zip(hidden, ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"layer {layer}")
        torch.testing.assert_close(ours.features(wav, layer)[0], b, rtol=1e-4, atol=1e-4)


def test_padded_batch_matches_each_utterance_alone(hf_dir):
    """A padded batch gives every utterance exactly what HF gives it alone (the first conv layer's
    group norm ignores padding; padded frames are masked out of attention)."""
    directory, hf = hf_dir
    ours = HuBERT.from_pretrained(directory)
    wavs = [torch.randn(n) for n in (8000, 5123, 3300)]
    feats = extract_features(ours, wavs, layer=2, batch_size=3)
    with torch.no_grad():
        for wav, feat in zip(wavs, feats):
            ref = hf(wav[None], output_hidden_states=True).hidden_states[2][0]
            assert feat.shape == ref.shape
            torch.testing.assert_close(feat, ref, rtol=1e-4, atol=1e-4)


def test_padded_batch_with_attention_mask_matches_hf_where_norm_is_unaffected(hf_dir):
    """With an attention mask, HF masks the same frames as we do; its group norm sees the padding
    though, so compare on the longest utterance, whose statistics have no padding."""
    directory, hf = hf_dir
    ours = HuBERT.from_pretrained(directory)
    lengths = torch.tensor([8000, 4000])
    wav = torch.randn(2, 8000)
    wav[1, 4000:] = 0
    attention = (torch.arange(8000)[None] < lengths[:, None]).long()
    with torch.no_grad():
        ref = hf(wav, attention_mask=attention, output_hidden_states=True).hidden_states
        hidden, pad_mask = ours(wav, lengths)
    assert pad_mask.sum(1).tolist() == [0, 24 - 12]
    for a, b in zip(hidden, ref):
        torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-4)


def test_legacy_weight_g_weight_v_layout(hf_dir, tmp_path, transformers):
    directory, hf = hf_dir
    tensors = load_file(str(directory / "model.safetensors"))
    prefix = "encoder.pos_conv_embed.conv."
    assert prefix + "parametrizations.weight.original0" in tensors  # transformers 5.x layout
    tensors[prefix + "weight_g"] = tensors.pop(prefix + "parametrizations.weight.original0")
    tensors[prefix + "weight_v"] = tensors.pop(prefix + "parametrizations.weight.original1")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    legacy, modern = HuBERT.from_pretrained(tmp_path), HuBERT.from_pretrained(directory)
    wav = torch.randn(1, 6000)
    with torch.no_grad():
        torch.testing.assert_close(legacy.features(wav, 2)[0], modern.features(wav, 2)[0])
    # and the legacy file loads into transformers itself to the same outputs
    with torch.no_grad():
        hf_legacy = transformers.HubertModel.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(hf_legacy(wav).last_hidden_state, hf(wav).last_hidden_state)


def test_import_errors_name_the_tensor(hf_dir, tmp_path):
    directory, _ = hf_dir
    tensors = load_file(str(directory / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    bad = dict(tensors, **{"encoder.layers.0.attention.q_proj.weight": torch.zeros(3, 3)})
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="encoder.layers.0.attention.q_proj.weight"):
        HuBERT.from_pretrained(tmp_path)
    extra = dict(tensors, **{"encoder.surprise": torch.zeros(1)})
    save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="encoder.surprise"):
        HuBERT.from_pretrained(tmp_path)
    missing = {k: v for k, v in tensors.items() if k != "encoder.layer_norm.bias"}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="lacks 1 tensors"):
        HuBERT.from_pretrained(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, do_stable_layer_norm=True)))
    with pytest.raises(ValueError, match="do_stable_layer_norm"):
        HuBERT.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        HuBERT.from_pretrained(tmp_path / "nowhere")


def test_own_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = HuBERT(HubertConfig.from_preset("toy", num_hidden_layers=1)).eval()
    model.save_pretrained(tmp_path)
    loaded = HuBERT.from_pretrained(tmp_path)
    assert loaded.config == model.config
    wav = torch.randn(1, 4000)
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(wav, 1)[0], model.features(wav, 1)[0])


def test_presets():
    base = HubertConfig.from_preset("hubert-base")
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads, base.intermediate_size,
            base.conv_dim, base.downsampling) == (768, 12, 12, 3072, (512,) * 7, 320)
    assert HubertConfig.from_preset("toy").downsampling == 320
    with pytest.raises(ValueError, match="hubert-base, toy"):
        HubertConfig.from_preset("hubert-large")
    with pytest.raises(ValueError, match="not divisible"):  # checked after the overrides
        HubertConfig.from_preset("toy", hidden_size=190)
    with pytest.raises(ValueError, match="unknown HubertConfig field"):
        HubertConfig.from_preset("toy", layers=2)


def test_frame_counts_mfcc_equals_conv():
    config = HubertConfig.from_preset("toy")
    model = HuBERT(HubertConfig.from_preset("toy", conv_dim=(4,) * 7, hidden_size=8, num_attention_heads=2,
                                            num_hidden_layers=0, intermediate_size=8))
    for n in [400, 719, 720, 721, 1039, 1040, 4321, 16000, 16399, 16400, 33333]:
        expected = (n - 400) // 320 + 1
        assert int(frame_lengths(config, torch.tensor(n))) == expected
        assert mfcc(torch.randn(n), hop_length=320, n_fft=400, center=False).shape[-1] == expected
        assert mfcc_features(torch.randn(n)).shape == (expected, 39)
        with torch.no_grad():
            assert model(torch.randn(1, n))[0][0].shape[1] == expected


def test_span_mask_covers_about_half():
    mask = span_mask(torch.tensor([500] * 8, dtype=torch.long), 500, 0.08, 10, torch.Generator().manual_seed(0))
    assert 0.4 < mask.float().mean() < 0.6
    short = span_mask(torch.tensor([30, 5]), 30, 0.08, 10, torch.Generator().manual_seed(0))
    assert short[1, 5:].sum() == 0 and short[1].any()


def test_pretraining_lowers_masked_prediction_loss():
    torch.manual_seed(0)
    config = HubertConfig.from_preset("toy", conv_dim=(32,) * 7, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64, num_clusters=4, final_dim=16,
                                      num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)
    model = HuBERT(config)
    # targets the context determines: a tone held for 20 frames (20 ms each), its pitch class the target
    wavs, targets = [], []
    t = torch.arange(320 * 20) / 16000
    for i in range(8):
        classes = torch.randint(0, 4, (3,))
        wavs.append(torch.cat([torch.sin(2 * torch.pi * (300 + 500 * c) * t) for c in classes] + [torch.zeros(80)]))
        targets.append(classes.repeat_interleave(20))
    losses = pretrain(model, wavs, targets, steps=40, lr=1e-2, batch_size=4, seed=0, progress=False)
    # chance is ln 4 = 1.39; a masked frame is guessable from the unmasked frames of its tone
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10 and sum(losses[-10:]) / 10 < 1.2
    with pytest.raises(ValueError, match="utterance 0: 3 targets"):
        pretrain(model, wavs[:1], [torch.zeros(3, dtype=torch.long)], steps=1, progress=False)


TINY = dict(conv_dim=(16,) * 7, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, num_clusters=4, final_dim=8)


@pytest.mark.parametrize("steps", [(2, 2), (3,)])  # both of HuBERT's iterations; one (the toy default)
def test_train_unit_encoder(steps):
    torch.manual_seed(0)
    config = HubertConfig.from_preset("toy", **TINY)
    wavs = [torch.randn(n) for n in (8000, 9000, 10000)]
    result = train_unit_encoder(wavs, config, n_units=4, steps=steps, target_layer=1, unit_layer=2,
                                batch_size=2, max_frames=16, warm_start=True, progress=False)
    assert [len(l) for l in result["losses"]] == list(steps) and result["layer"] == 2
    assert result["kmeans"].n_clusters == 4
    assert (result["encoder"] is result["iteration1"]) == (len(steps) == 1)  # the last iteration's encoder
    units = speech_to_units(wavs, result["encoder"], result["layer"], result["kmeans"])
    assert [len(u) for u in units] == [24, 27, 31]  # (T - 400) // 320 + 1


def test_hubert_training_follows_the_device(devices_seen, no_cuda, monkeypatch):
    """device="cpu" trains exactly as the default; every forward runs on the resolved device and the
    encoder stays there; "cuda" on a machine without it fails in one clear line before any work."""
    config = HubertConfig.from_preset("toy", **TINY)
    wavs = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (8000, 9000)]
    default, on_cpu = (train_unit_encoder(wavs, config, n_units=4, steps=(2,), batch_size=2, max_frames=16,
                                          progress=False, **device) for device in ({}, {"device": "cpu"}))
    assert on_cpu["losses"] == default["losses"]
    assert all(torch.equal(a, b) for a, b in zip(on_cpu["encoder"].state_dict().values(),
                                                 default["encoder"].state_dict().values()))
    assert torch.equal(on_cpu["kmeans"].centroids, default["kmeans"].centroids)
    assert devices_seen == {torch.device("cpu")}
    assert {p.device for p in on_cpu["encoder"].parameters()} == {torch.device("cpu")}

    devices_seen.clear()
    monkeypatch.setattr(hubert_training, "mfcc_features", lambda wav: pytest.fail("MFCCs before the device check"))
    with pytest.raises(ValueError, match="CUDA is not available"):
        train_unit_encoder(wavs, config, n_units=4, steps=(2,), progress=False, device="cuda")
    targets = [torch.zeros(int(frame_lengths(config, torch.tensor(len(w)))), dtype=torch.long) for w in wavs]
    with pytest.raises(ValueError, match="CUDA is not available"):
        pretrain(HuBERT(config), wavs, targets, steps=1, progress=False, device="cuda")
    assert not devices_seen  # no forward ran
