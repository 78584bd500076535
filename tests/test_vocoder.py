"""Unit vocoders: the released unit HiFi-GAN format (golden vector), the toy's mel vocoder and its
Griffin-Lim, presets, save/load of either kind, errors on bad input, and training."""
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from speechgpt_min.mel_vocoder import MelVocoder, MelVocoderConfig, griffin_lim, load_vocoder
from speechgpt_min.vocoder import UnitVocoder, VocoderConfig, VocoderInputError

# A small generator of the same architecture, for fast tests.
SMALL = VocoderConfig(num_embeddings=100, embedding_dim=16, upsample_initial_channel=32, dur_hidden_dim=16,
                      resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3, 5),))
SMALL_MEL = MelVocoderConfig(num_embeddings=100, channels=16, encoder_layers=1, decoder_dilations=(1, 2),
                             dur_hidden_dim=8)


@pytest.fixture(scope="module")
def expected(unit_hifigan_reference):
    return load_file(str(unit_hifigan_reference / "tiny_expected.safetensors"))


def released_dir(unit_hifigan_reference, tmp_path, weights):
    """The released layout: a checkpoint file with config.json beside it."""
    shutil.copy(unit_hifigan_reference / weights, tmp_path / weights)
    shutil.copy(unit_hifigan_reference / "tiny_config.json", tmp_path / "config.json")
    return tmp_path / weights


def check_golden(vocoder, expected):
    codes = expected["codes"]
    with torch.inference_mode():
        assert torch.equal(vocoder.predict_durations(codes), expected["durations"])
        torch.testing.assert_close(vocoder(codes), expected["wav_with_duration_prediction"][:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(vocoder(codes, torch.ones_like(codes)),
                                   expected["wav_without_duration_prediction"][:, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("weights", ["g_tiny.pt", "tiny_generator.safetensors"])
def test_released_checkpoint_reproduces_golden_vector(unit_hifigan_reference, expected, tmp_path, weights):
    vocoder = UnitVocoder.from_pretrained(released_dir(unit_hifigan_reference, tmp_path, weights))
    assert not vocoder.training
    check_golden(vocoder, expected)
    check_golden(load_vocoder(released_dir(unit_hifigan_reference, tmp_path, weights)), expected)  # the one entry point
    # durations given explicitly reproduce the predicted-duration waveform
    with torch.inference_mode():
        wav = vocoder(expected["codes"], expected["durations"])
    torch.testing.assert_close(wav, expected["wav_with_duration_prediction"][:, 0], atol=1e-5, rtol=0)


def test_directory_path_finds_released_checkpoint(unit_hifigan_reference, expected, tmp_path):
    released_dir(unit_hifigan_reference, tmp_path, "g_tiny.pt")
    check_golden(UnitVocoder.from_pretrained(tmp_path), expected)


def test_remove_weight_norm_keeps_output(unit_hifigan_reference, expected, tmp_path):
    vocoder = UnitVocoder.from_pretrained(released_dir(unit_hifigan_reference, tmp_path, "g_tiny.pt"))
    vocoder.remove_weight_norm()
    assert not any("parametrizations" in key for key in vocoder.state_dict())
    check_golden(vocoder, expected)


def test_save_pretrained_round_trip(unit_hifigan_reference, expected, tmp_path):
    vocoder = UnitVocoder.from_pretrained(released_dir(unit_hifigan_reference, tmp_path, "g_tiny.pt"))
    vocoder.save_pretrained(tmp_path / "ours")
    assert set(load_file(str(tmp_path / "ours" / "model.safetensors"))) == \
        set(torch.load(unit_hifigan_reference / "g_tiny.pt", weights_only=True)["generator"])
    check_golden(UnitVocoder.from_pretrained(tmp_path / "ours"), expected)
    # weight norm folded away, saved again as weight_g / weight_v: same waveform
    vocoder.remove_weight_norm().save_pretrained(tmp_path / "folded")
    check_golden(UnitVocoder.from_pretrained(tmp_path / "folded"), expected)


def test_km1000_preset_matches_released_layout(unit_hifigan_reference):
    layout = json.loads((unit_hifigan_reference / "km1000_layout.json").read_text())
    with torch.device("meta"):
        vocoder = UnitVocoder(VocoderConfig.from_preset("unit-hifigan-km1000"))
    shapes = {key: list(value.shape) for key, value in vocoder.released_state_dict().items()}
    assert shapes == layout["keys"]
    assert sum(p.numel() for p in vocoder.parameters()) == layout["num_params"]
    assert VocoderConfig.from_dict(layout["config"]) == VocoderConfig.from_preset("unit-hifigan-km1000")


def test_config_json_round_trip():
    config = VocoderConfig.from_preset("toy")
    assert VocoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="toy.*unit-hifigan-km1000"):
        VocoderConfig.from_preset("unit-hifigan")
    assert VocoderConfig.from_preset("toy", num_embeddings=50).num_embeddings == 50
    with pytest.raises(ValueError, match="multiply to"):  # checked after the overrides
        VocoderConfig.from_preset("toy", upsample_rates=(5, 4))
    with pytest.raises(ValueError, match="unknown VocoderConfig field"):
        VocoderConfig.from_preset("toy", hop=320)


def test_upsample_rates_must_multiply_to_hop():
    with pytest.raises(ValueError, match="hop"):
        VocoderConfig(upsample_rates=(5, 4, 4, 2), upsample_kernel_sizes=(11, 8, 8, 4))


@pytest.mark.parametrize("config", [SMALL, SMALL_MEL], ids=["hifigan", "mel"])
@pytest.mark.parametrize("units, durations, error, match", [
    (torch.tensor([[3, 100]]), None, VocoderInputError, r"\[0, 100\)"),
    (torch.tensor([[-1, 4]]), None, VocoderInputError, r"\[0, 100\)"),
    (torch.zeros(1, 0, dtype=torch.long), None, VocoderInputError, "non-empty"),
    (torch.tensor([3, 4]), None, VocoderInputError, r"\(batch, units\)"),
    (torch.tensor([[3.0, 4.0]]), None, TypeError, "torch.long"),
    ([[3, 4]], None, TypeError, "torch.long"),
    (torch.tensor([[3, 4]]), torch.tensor([[2, 2, 2]]), VocoderInputError, r"one frame count per unit.*\(1, 2\).*\(1, 3\)"),
    (torch.tensor([[3, 4]]), torch.tensor([[2, 0]]), VocoderInputError, "at least 1 frame"),
    (torch.tensor([[3, 4]]), torch.tensor([[2, -1]]), VocoderInputError, "at least 1 frame"),
    (torch.tensor([[3, 4]]), torch.tensor([[2.0, 1.0]]), VocoderInputError, "integer tensor"),
])
def test_bad_input_gets_a_clear_error_from_either_kind(config, units, durations, error, match):
    vocoder = (UnitVocoder if isinstance(config, VocoderConfig) else MelVocoder)(config).eval()
    assert issubclass(VocoderInputError, ValueError)
    with pytest.raises(error, match=match):
        vocoder(units, durations)


def test_missing_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such vocoder checkpoint"):
        UnitVocoder.from_pretrained(tmp_path / "absent.pt")
    UnitVocoder(SMALL).save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        UnitVocoder.from_pretrained(tmp_path)


def test_batch_with_different_lengths_matches_single_items():
    torch.manual_seed(0)
    vocoder = UnitVocoder(SMALL).eval()
    units = torch.tensor([[1, 2, 3], [4, 5, 6]])
    durations = torch.tensor([[2, 1, 1], [1, 1, 1]])
    with torch.inference_mode():
        batch = vocoder(units, durations)
        first, second = vocoder(units[:1], durations[:1]), vocoder(units[1:], durations[1:])
    assert batch.shape == (2, 4 * 320)
    torch.testing.assert_close(batch[0], first[0])
    torch.testing.assert_close(batch[1, :3 * 320], second[0])
    assert (batch[1, 3 * 320:] == 0).all()


def test_bfloat16_inference_stays_close_to_float32(unit_hifigan_reference, expected, tmp_path):
    """bfloat16 weights and activations (the fast path on CPUs with bfloat16 units, see
    benchmarks/bench_vocoder.py): the released tiny generator's waveform stays within 30 dB SNR."""
    vocoder = UnitVocoder.from_pretrained(released_dir(unit_hifigan_reference, tmp_path, "g_tiny.pt"))
    vocoder = vocoder.remove_weight_norm().eval()
    codes = expected["codes"]
    durations = expected["durations"]
    with torch.inference_mode():
        reference_wav = vocoder(codes, durations)
        fast = vocoder.to(torch.bfloat16)(codes, durations)
    assert fast.dtype == torch.bfloat16 and fast.shape == reference_wav.shape
    snr = snr_db(reference_wav, fast.float())
    assert snr > 30, f"bfloat16 waveform SNR {snr:.1f} dB"


def snr_db(reference, other):
    """Signal-to-noise ratio of `other` against `reference`, in dB."""
    return (10 * torch.log10(reference.pow(2).sum() / (other - reference).pow(2).sum())).item()


def tone_dataset(num_items=4, num_units=8, seed=0):
    """Items (wav, units, durations) where unit u is a 20 ms-aligned tone at 200 * (u + 1) Hz."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(num_items):
        units = torch.randperm(num_units, generator=generator)[:6]
        durations = torch.randint(2, 6, (6,), generator=generator)
        freqs = torch.repeat_interleave(200.0 * (units + 1), durations * 320)  # (T,)
        t = torch.arange(len(freqs)) / 16000
        items.append((0.5 * torch.sin(2 * torch.pi * freqs * t), units, durations))
    return items


def test_short_training_lowers_mel_loss():
    from speechgpt_min.vocoder_training import evaluate_vocoder, train_vocoder
    torch.manual_seed(0)
    vocoder = UnitVocoder(SMALL)
    data = tone_dataset()
    before = evaluate_vocoder(vocoder, data)
    records = []
    history = train_vocoder(vocoder, data, steps=20, batch_size=2, segment_frames=8, lr=1e-2, seed=0,
                            warmup_steps=19, progress=False, log=records.append)
    assert records == history and len(history) == 20
    assert {"mel", "dur", "stft"} <= set(history[0]) and {"adv", "fm", "disc"} <= set(history[-1])
    assert not vocoder.training
    after = evaluate_vocoder(vocoder, data)
    assert after < before - 0.5, (before, after)
    assert history[-1]["dur"] < history[0]["dur"]


def test_learning_rate_decays_along_a_cosine_or_stays_constant():
    from speechgpt_min.vocoder_training import train_vocoder
    data = tone_dataset(num_items=2)
    decayed = train_vocoder(UnitVocoder(SMALL), data, steps=4, batch_size=1, segment_frames=4, lr=4e-3, min_lr=1e-4,
                            progress=False)
    assert [round(h["lr"], 6) for h in decayed] == [0.004, 0.003025, 0.001075, 0.0001]  # min_lr + (lr - min_lr) * (1 + cos(pi * step / 3)) / 2
    constant = train_vocoder(UnitVocoder(SMALL), data, steps=2, batch_size=1, segment_frames=4, lr=1e-3, min_lr=None,
                             progress=False)
    assert [h["lr"] for h in constant] == [1e-3, 1e-3]


# ----------------------------------------------------------------------------- the mel vocoder


def test_griffin_lim_recovers_a_waveform_from_its_magnitude():
    """Two tones gliding in pitch: Griffin-Lim, given only the STFT magnitude, finds a waveform whose
    magnitude is close to it (spectral convergence), and more iterations get closer."""
    config = MelVocoderConfig()
    t = torch.arange(8000) / 16000
    wav = 0.3 * torch.sin(2 * torch.pi * (300 + 400 * t) * t) + 0.2 * torch.sin(2 * torch.pi * 1700 * t)
    window = torch.hann_window(config.win_length)

    def magnitude(x):
        return torch.stft(x, config.n_fft, config.hop_length, config.win_length, window, return_complex=True).abs()

    target = magnitude(wav)[None]  # (1, 513, 51)

    def convergence(iters):
        rebuilt = griffin_lim(target, dataclasses.replace(config, griffin_lim_iters=iters), length=len(wav))
        assert rebuilt.shape == (1, len(wav))
        return (torch.linalg.norm(magnitude(rebuilt[0]) - target[0]) / torch.linalg.norm(target)).item()

    zero_phase, few, more = convergence(0), convergence(8), convergence(32)
    assert more < few < zero_phase, (zero_phase, few, more)
    assert more < 0.1, more


def test_mel_to_wave_keeps_the_spectrogram():
    """True log-mel -> waveform (pseudo-inverse + Griffin-Lim) -> log-mel again: close to the original,
    and much closer after 16 iterations than with the zero phase it starts from."""
    wav = tone_dataset(num_items=1)[0][0]

    def error(iters):
        vocoder = MelVocoder(MelVocoderConfig(griffin_lim_iters=iters))
        log_mel = vocoder.log_mel(wav)[:, :-1]  # (80, 2T): two 10 ms frames per 20 ms unit frame
        rebuilt = vocoder.mel_to_wave(log_mel)
        assert rebuilt.shape == wav.shape
        return (vocoder.log_mel(rebuilt)[:, :-1] - log_mel).abs().mean().item()

    zero_phase, iterated = error(0), error(16)
    assert iterated < 0.8 and iterated < zero_phase / 3, (zero_phase, iterated)  # nats; silence: 4.5, noise: 6.0


def test_mel_vocoder_shapes_and_batches():
    torch.manual_seed(0)
    vocoder = MelVocoder(SMALL_MEL).eval()
    units = torch.tensor([[1, 2, 3], [4, 5, 6]])
    durations = torch.tensor([[2, 1, 1], [1, 1, 1]])
    with torch.inference_mode():
        log_mel, same = vocoder.units_to_mel(units, durations)
        batch = vocoder(units, durations)
        first, second = vocoder(units[:1], durations[:1]), vocoder(units[1:], durations[1:])
        predicted = vocoder.predict_durations(units)
        spoken = vocoder(units)
    assert log_mel.shape == (2, 80, 8) and torch.equal(same, durations)
    assert batch.shape == (2, 4 * 320)
    # the same as one at a time, up to float rounding (which Griffin-Lim's iterations amplify a little)
    assert snr_db(first[0], batch[0]) > 40 and snr_db(second[0], batch[1, :3 * 320]) > 40
    assert (batch[1, 3 * 320:] == 0).all()
    assert predicted.dtype == torch.long and (predicted >= 1).all()
    assert spoken.shape == (2, int(predicted.sum(1).max()) * 320)


def test_predicted_durations_keep_the_running_total():
    """Every unit predicted at 1.4 frames: rounding each alone gives 1 (too fast); rounding the running
    total gives 1, 2, 1, 2, 1 = 7 frames for 7.0."""
    vocoder = MelVocoder(SMALL_MEL).eval()
    vocoder.log_durations = lambda encoded: torch.full(encoded.shape[::2], 1.4).log1p()  # (B, N)
    assert vocoder.predict_durations(torch.tensor([[1, 2, 3, 4, 5]])).tolist() == [[1, 2, 1, 2, 1]]


def test_mel_vocoder_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    vocoder = MelVocoder(SMALL_MEL).eval()
    vocoder.save_pretrained(tmp_path / "mel")
    config = json.loads((tmp_path / "mel" / "config.json").read_text())
    assert config["kind"] == "unit-mel-griffin-lim" and config["num_embeddings"] == 100
    loaded = load_vocoder(tmp_path / "mel")
    assert isinstance(loaded, MelVocoder) and not loaded.training and loaded.config == SMALL_MEL
    units = torch.tensor([[7, 8, 9, 10]])
    with torch.inference_mode():
        assert torch.equal(loaded(units), vocoder(units))
    assert isinstance(load_vocoder(tmp_path / "mel" / "model.safetensors"), MelVocoder)  # a file path works too
    UnitVocoder(SMALL).save_pretrained(tmp_path / "hifigan")  # no "kind": the released format
    assert isinstance(load_vocoder(tmp_path / "hifigan"), UnitVocoder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vocoder(tmp_path / "absent")


def test_mel_vocoder_config_presets_and_kind():
    config = MelVocoderConfig.from_preset("toy", num_embeddings=50)
    assert config.num_embeddings == 50 and config.mel_frames_per_unit == 2
    assert MelVocoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="valid presets: toy"):
        MelVocoderConfig.from_preset("tiny")
    with pytest.raises(ValueError, match="unknown MelVocoderConfig field"):
        MelVocoderConfig.from_preset("toy", kind="mel")
    with pytest.raises(ValueError, match="kind"):
        MelVocoderConfig.from_dict(VocoderConfig().to_dict())
    with pytest.raises(ValueError, match="whole number of mel frames"):
        MelVocoderConfig(hop_length=256)


def test_mel_vocoder_training_lowers_its_losses():
    from speechgpt_min.vocoder_training import train_mel_vocoder
    torch.manual_seed(0)
    vocoder = MelVocoder(SMALL_MEL)
    data = tone_dataset()
    records = []
    history = train_mel_vocoder(vocoder, data, steps=60, batch_size=2, lr=1e-2, progress=False, log=records.append)
    assert records == history and len(history) == 60 and not vocoder.training
    first, last = (sum(h[key] for h in part) / len(part) for part in (history[:5], history[-5:]) for key in ("mel",))
    assert last < 0.6 * first, (first, last)
    assert history[-1]["dur"] < history[0]["dur"]
    assert history[-1]["lr"] < history[len(history) // 2]["lr"] < 1e-2  # warm-up then cosine decay


def test_evaluate_vocoder_speech_scores_what_a_listener_hears(monkeypatch):
    """Mel L1, speed and re-encoding always; the three Whisper WERs where Whisper is installed, else None."""
    import speechgpt_min.evaluate as evaluate
    torch.manual_seed(0)
    vocoder = MelVocoder(SMALL_MEL).eval()
    items, texts = tone_dataset(num_items=2), ["one tone", "two tones"]
    units = items[0][1]
    monkeypatch.setattr(evaluate, "whisper_available", lambda: False)
    ears = iter([units.tolist(), []])  # re-encodes the first resynthesis perfectly, hears nothing in the second
    scores = evaluate.evaluate_vocoder_speech(vocoder, items, texts, speech_to_units=lambda wav: next(ears), progress=False)
    assert scores["mel_l1"] > 0 and scores["rtf"] > 0
    assert scores["resynthesis_unit_edit_distance"] == pytest.approx(6 / 12)  # 6 + 6 units, the second's 6 missed
    assert scores["whisper_wer"] is scores["whisper_wer_true_durations"] is scores["whisper_wer_original"] is None
    heard = []

    def whisper(wavs, progress=True):  # hears the originals right and everything else as "tones"
        heard.append(len(wavs))
        return list(texts) if len(heard) == 3 else ["tones"] * len(wavs)

    monkeypatch.setattr(evaluate, "whisper_available", lambda: True)
    monkeypatch.setattr(evaluate, "whisper_transcribe", whisper)
    scores = evaluate.evaluate_vocoder_speech(vocoder, items, texts, progress=False)
    assert heard == [2, 2, 2] and "resynthesis_unit_edit_distance" not in scores
    assert scores["whisper_wer"] == scores["whisper_wer_true_durations"] == pytest.approx(3 / 4)
    assert scores["whisper_wer_original"] == 0.0



def train_briefly(vocoder, **device):
    """Two steps of the vocoder's trainer (the HiFi-GAN's with its discriminator in the second); the history
    without its timings, which differ from run to run."""
    from speechgpt_min.vocoder_training import train_mel_vocoder, train_vocoder
    data = tone_dataset(num_items=2)
    if isinstance(vocoder, MelVocoder):
        history = train_mel_vocoder(vocoder, data, steps=2, batch_size=2, progress=False, **device)
    else:
        history = train_vocoder(vocoder, data, steps=2, batch_size=2, segment_frames=4, warmup_steps=1,
                                progress=False, **device)
    return [{key: value for key, value in record.items() if key != "seconds"} for record in history]


@pytest.mark.parametrize("make", [lambda: MelVocoder(SMALL_MEL), lambda: UnitVocoder(SMALL)], ids=["mel", "hifigan"])
def test_vocoder_training_follows_the_device(make, devices_seen, no_cuda):
    """device="cpu" trains exactly as the default; every forward (generator, discriminator) runs on the
    resolved device, where the vocoder stays; "cuda" without CUDA fails before any work."""
    torch.manual_seed(0)
    default = make()
    default_history = train_briefly(default)
    torch.manual_seed(0)
    on_cpu = make()
    assert train_briefly(on_cpu, device="cpu") == default_history
    assert all(torch.equal(a, b) for a, b in zip(on_cpu.state_dict().values(), default.state_dict().values()))
    assert {p.device for p in on_cpu.parameters()} == {torch.device("cpu")}
    assert devices_seen == {torch.device("cpu")}
    devices_seen.clear()
    with pytest.raises(ValueError, match="CUDA is not available"):
        train_briefly(make(), device="cuda")
    assert not devices_seen


def test_vocoder_evaluation_runs_where_the_vocoder_is(devices_seen, monkeypatch):
    """evaluate_vocoder_speech moves each utterance to the vocoder's device and hands the listener
    (here speech_to_units) CPU waveforms."""
    import speechgpt_min.evaluate as evaluate
    monkeypatch.setattr(evaluate, "whisper_available", lambda: False)
    torch.manual_seed(0)
    heard = []

    def ears(wav):  # hears nothing, notes where the waveform was
        heard.append(wav.device)
        return []

    evaluate.evaluate_vocoder_speech(MelVocoder(SMALL_MEL).eval(), tone_dataset(num_items=2), ["one", "two"],
                                     speech_to_units=ears, progress=False)
    assert heard == [torch.device("cpu")] * 2 and devices_seen == {torch.device("cpu")}
