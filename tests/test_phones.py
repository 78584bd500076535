"""Phone units: forced alignment (against a brute force), batching, training on a synthetic corpus
that a recognizer can learn, and save/load."""
import itertools

import pytest
import torch

from speechgpt_min.phones import (
    PhoneRecognizer, PhoneRecognizerConfig, forced_align, forced_align_batch, normalised_mfcc, speed_perturbed,
    stretched, switch_viterbi, train_phone_recognizer,
)


def brute_force_align(log_probs, ids):
    """Every way to give each phone of ids at least one frame, in order: the best total score."""
    T, N = len(log_probs), len(ids)
    best, best_path = -float("inf"), None
    for cuts in itertools.combinations(range(1, T), N - 1):  # where phone n + 1 starts
        bounds = (0,) + cuts + (T,)
        path = [ids[n] for n in range(N) for _ in range(bounds[n + 1] - bounds[n])]
        score = sum(float(log_probs[t, p]) for t, p in enumerate(path))
        if score > best:
            best, best_path = score, path
    return best_path


def test_speed_perturbation_shortens_and_raises_every_frequency():
    t = torch.arange(16000) / 16000
    tone = torch.sin(2 * torch.pi * 200 * t)  # one second at 200 Hz
    for factor in (0.9, 1.1):
        faster = speed_perturbed(tone, factor)
        assert abs(len(faster) - 16000 / factor) <= 1
        spectrum = torch.fft.rfft(faster * torch.hann_window(len(faster))).abs()
        peak_hz = int(spectrum.argmax()) * 16000 / len(faster)
        assert abs(peak_hz - 200 * factor) < 3, (factor, peak_hz)
    with pytest.raises(ValueError, match="must be positive"):
        speed_perturbed(tone, 0)


def test_forced_align_is_the_best_monotonic_path():
    torch.manual_seed(0)
    for T, ids in [(7, [2, 0, 3]), (6, [1, 1, 4, 2]), (5, [3]), (4, [0, 1, 2, 3])]:
        log_probs = torch.randn(T, 5).log_softmax(-1)
        assert forced_align(log_probs, ids).tolist() == brute_force_align(log_probs, ids)


def test_batched_alignment_equals_one_at_a_time():
    torch.manual_seed(1)
    lps = [torch.randn(T, 6).log_softmax(-1) for T in (9, 4, 12)]
    ids = [[0, 5, 2], [1, 3], [4, 4, 0, 2, 1]]
    assert [p.tolist() for p in forced_align_batch(lps, ids)] == [forced_align(lp, i).tolist() for lp, i in zip(lps, ids)]
    with pytest.raises(ValueError, match="cannot fit"):
        forced_align(torch.zeros(2, 3), [0, 1, 2])


def brute_force_switch_path(log_probs, penalty):
    """Every phone path through log_probs (T, P): the best total score, `penalty` off per change of phone."""
    T, P = log_probs.shape
    def score(path):
        changes = sum(a != b for a, b in zip(path, path[1:]))
        return sum(float(log_probs[t, p]) for t, p in enumerate(path)) - penalty * changes
    return list(max(itertools.product(range(P), repeat=T), key=score))


def test_switch_viterbi_is_the_best_path_with_a_cost_per_change():
    torch.manual_seed(2)
    log_probs = torch.randn(3, 6, 3).log_softmax(-1)  # (B, T, P): three utterances, the last two padded
    lengths = torch.tensor([6, 4, 1])
    for penalty in (0.0, 0.7, 2.0, 50.0):
        paths = switch_viterbi(log_probs, lengths, penalty)
        for b, n in enumerate(lengths.tolist()):
            assert paths[b, :n].tolist() == brute_force_switch_path(log_probs[b, :n], penalty), (penalty, b)
    assert torch.equal(switch_viterbi(log_probs, lengths, 0.0), log_probs.argmax(-1))  # no cost: each frame's own best
    one_phone = switch_viterbi(log_probs, lengths, 50.0)  # a change costs more than any frame can pay back
    assert all(len(set(one_phone[b, :n].tolist())) == 1 for b, n in enumerate(lengths.tolist()))


def tone_utterance(phones, rng):
    """A waveform whose every 'phone' is a tone of its own pitch, 3-6 frames long; its frame labels."""
    pitch = {"a": 300.0, "b": 700.0, "c": 1500.0}
    wav, labels = [], []
    for p in phones:
        frames = int(rng.integers(3, 7))
        t = torch.arange(frames * 320) / 16000
        wav.append(torch.sin(2 * torch.pi * pitch[p] * t) * (0.3 + 0.2 * rng.random()))
        labels += [p] * frames
    wav = torch.cat(wav + [torch.zeros(80)])  # (T,) long enough for every labelled frame
    return wav, labels


def test_stretched_keeps_the_ends_and_interpolates_between():
    frames = torch.tensor([[0.0, 10.0], [2.0, 20.0], [4.0, 30.0]])  # (T=3, D=2)
    assert torch.equal(stretched(frames, 3), frames)
    assert torch.allclose(stretched(frames, 5), torch.tensor([[0.0, 10.0], [1.0, 15.0], [2.0, 20.0], [3.0, 25.0],
                                                              [4.0, 30.0]]))
    assert torch.allclose(stretched(frames, 2), frames[[0, 2]])


def test_config_rejects_a_speed_that_is_not_positive():
    with pytest.raises(ValueError, match="listen_speeds must be positive"):
        PhoneRecognizerConfig(listen_speeds=[1.1, 0])


def test_training_learns_a_phone_inventory_and_round_trips(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    texts = [[str(p) for p in rng.choice(list("abc"), size=6)] for _ in range(40)]
    utterances = [tone_utterance(text, rng) for text in texts]
    features = [normalised_mfcc(wav) for wav, _ in utterances]
    labels = [lab if i % 2 == 0 else None for i, (_, lab) in enumerate(utterances)]  # half aligned
    recognizer = train_phone_recognizer(features, labels, texts, PhoneRecognizerConfig(channels=32, dilations=(1, 2),
                                        switch_penalty=1.0), epochs=(8, 4), lr=5e-3, batch_size=8, progress=False)
    assert recognizer.config.phones == ["a", "b", "c"]
    predicted = recognizer.recognize(features)
    truth = [torch.tensor([recognizer.config.phones.index(p) for p in lab[:len(f)]]) for (_, lab), f in
             zip(utterances, features)]
    accuracy = sum(int((p[:len(t)] == t).sum()) for p, t in zip(predicted, truth)) / sum(len(t) for t in truth)
    assert accuracy > 0.8  # three tones are easy; a recognizer that learnt nothing scores about 1/3
    assert torch.equal(recognizer.units(utterances[1][0]), predicted[1])  # one waveform = the batched path

    # Heard three ways: hearing it twice more as it is changes nothing; at other speeds, every
    # waveform keeps its own frames and the tones are still told apart.
    wavs = [wav for wav, _ in utterances]
    recognizer.config.listen_speeds = (1.0, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(recognizer.hear(wavs), predicted))
    recognizer.config.listen_speeds = (0.9, 1.1)
    heard = recognizer.hear(wavs)
    assert [len(h) for h in heard] == [len(p) for p in predicted]
    assert sum(int((h[:len(t)] == t).sum()) for h, t in zip(heard, truth)) / sum(len(t) for t in truth) > 0.8
    assert torch.equal(recognizer.units(wavs[1]), heard[1])

    recognizer.save_pretrained(tmp_path / "phones")
    loaded = PhoneRecognizer.from_pretrained(tmp_path / "phones")
    assert loaded.config.phones == recognizer.config.phones
    assert loaded.config.switch_penalty == 1.0  # it decodes as it was trained to
    assert loaded.config.listen_speeds == (0.9, 1.1)
    assert all(torch.equal(a, b) for a, b in zip(loaded.recognize(features), predicted))
    (tmp_path / "phones" / "config.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a phone recognizer"):
        PhoneRecognizer.from_pretrained(tmp_path / "phones")


def test_each_round_after_the_first_aligns_the_unaligned_utterances_again(monkeypatch):
    import numpy as np

    import speechgpt_min.phones as phones

    rng = np.random.default_rng(3)
    texts = [[str(p) for p in rng.choice(list("abc"), size=4)] for _ in range(6)]
    utterances = [tone_utterance(text, rng) for text in texts]
    features = [normalised_mfcc(wav) for wav, _ in utterances]
    labels = [lab if i % 2 == 0 else None for i, (_, lab) in enumerate(utterances)]
    aligned = []  # the utterances each forced alignment was asked for
    real_align = phones.forced_align_batch
    monkeypatch.setattr(phones, "forced_align_batch",
                        lambda log_probs, ids: aligned.append(len(ids)) or real_align(log_probs, ids))
    config = PhoneRecognizerConfig(channels=8, dilations=(1,))
    for epochs, alignments in (((1,), []), ((1, 1), [3]), ((1, 1, 1), [3, 3])):
        aligned.clear()
        train_phone_recognizer(features, labels, texts, config, epochs=epochs, batch_size=4, progress=False)
        assert aligned == alignments, epochs


def test_config_rejects_duplicate_phones():
    with pytest.raises(ValueError, match="duplicates"):
        PhoneRecognizerConfig(phones=["a", "b", "a"])


def test_config_presets():
    assert PhoneRecognizerConfig.from_preset("toy") == PhoneRecognizerConfig()
    assert PhoneRecognizerConfig.from_preset("toy", channels=32).channels == 32
    with pytest.raises(ValueError, match="duplicates"):  # checked after the overrides
        PhoneRecognizerConfig.from_preset("toy", phones=["a", "a"])
    with pytest.raises(ValueError, match="valid presets: toy"):
        PhoneRecognizerConfig.from_preset("big")
    with pytest.raises(ValueError, match="unknown PhoneRecognizerConfig field"):
        PhoneRecognizerConfig.from_preset("toy", width=8)


def test_training_follows_the_device(devices_seen, no_cuda):
    """device="cpu" trains exactly as the default; training and recognition run on the resolved device,
    where the recognizer stays; "cuda" without CUDA fails before any work."""
    import numpy as np

    rng = np.random.default_rng(0)
    texts = [[str(p) for p in rng.choice(list("abc"), size=4)] for _ in range(6)]
    utterances = [tone_utterance(text, rng) for text in texts]
    features = [normalised_mfcc(wav) for wav, _ in utterances]
    labels = [lab if i % 2 == 0 else None for i, (_, lab) in enumerate(utterances)]
    config = PhoneRecognizerConfig(channels=8, dilations=(1,))
    default, on_cpu = (train_phone_recognizer(features, labels, texts, config, epochs=(1, 1), batch_size=4,
                                              progress=False, **device) for device in ({}, {"device": "cpu"}))
    assert all(torch.equal(a, b) for a, b in zip(on_cpu.state_dict().values(), default.state_dict().values()))
    assert {p.device for p in on_cpu.parameters()} == {torch.device("cpu")}
    assert devices_seen == {torch.device("cpu")}
    devices_seen.clear()
    with pytest.raises(ValueError, match="CUDA is not available"):
        train_phone_recognizer(features, labels, texts, config, progress=False, device="cuda")
    assert not devices_seen
