"""Units: k-means fit/assign/save/load (and joblib), dedup and unit strings, alignments and PNMI."""
import math

import joblib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.cluster import KMeans as SkKMeans

from speechgpt_min.hubert import HuBERT, HubertConfig
from speechgpt_min.units import (KMeans, UnitError, dedup, fit_kmeans, frame_phones, parse_units, read_segs,
                                 score_units, speech_text, speech_to_deduped_units, speech_to_units, unit_quality,
                                 unit_token)


def blobs(n_per=200, centres=((0, 0), (10, 0), (0, 10)), seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(c, 0.5, size=(n_per, 2)) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(len(centres)), n_per)


def test_fit_and_assign_recover_clusters():
    x, labels = blobs()
    km = fit_kmeans(x, 3, seed=0)
    ids = km.assign(x).numpy()
    assert len(np.unique(ids)) == 3
    for c in range(3):  # each true cluster maps to one unit
        assert len(np.unique(ids[labels == c])) == 1
    assert unit_quality(labels, ids)["pnmi"] == pytest.approx(1.0)


def test_assign_matches_brute_force_and_batches():
    torch.manual_seed(0)
    km = KMeans(torch.randn(17, 5))
    x = torch.randn(1000, 5)
    expected = torch.cdist(x, km.centroids).argmin(1)
    assert torch.equal(km.assign(x), expected)
    assert torch.equal(km.assign(x, batch_size=7), expected)
    with pytest.raises(ValueError, match=r"expected \(N, 5\)"):
        km.assign(torch.randn(3, 4))


def test_save_load_round_trip(tmp_path):
    km = KMeans(torch.randn(10, 4))
    km.save_pretrained(tmp_path / "km")
    loaded = KMeans.from_pretrained(tmp_path / "km")
    assert torch.equal(loaded.centroids, km.centroids)
    with pytest.raises(FileNotFoundError, match="config.json"):
        KMeans.from_pretrained(tmp_path / "missing")


def test_joblib_scikit_learn_kmeans(tmp_path):
    x, _ = blobs()
    sk = SkKMeans(n_clusters=3, n_init=1, random_state=0).fit(x)
    path = tmp_path / "km3.bin"
    joblib.dump(sk, path)
    km = KMeans.from_joblib(path)
    np.testing.assert_allclose(km.centroids.numpy(), sk.cluster_centers_, rtol=1e-6)
    assert np.array_equal(km.assign(x).numpy(), sk.predict(x))
    joblib.dump({"not": "kmeans"}, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match="not a fitted scikit-learn k-means"):
        KMeans.from_joblib(tmp_path / "bad.bin")


def test_dedup_durations():
    units, durations = dedup(torch.tensor([5, 5, 5, 2, 2, 5, 9]))
    assert units.tolist() == [5, 2, 5, 9] and durations.tolist() == [3, 2, 1, 1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 999), max_size=60))
def test_dedup_and_string_round_trip(seq):
    units, durations = dedup(torch.tensor(seq, dtype=torch.long))
    assert torch.repeat_interleave(units, durations).tolist() == seq  # durations restore the frames
    assert all(a != b for a, b in zip(units.tolist(), units.tolist()[1:]))
    text = speech_text(seq)
    assert text == "<sosp>" + "".join(f"<{u}>" for u in units.tolist()) + "<eosp>"
    assert " " not in text
    assert parse_units(text) == units.tolist()
    assert speech_text(parse_units(text)) == text


def test_exact_speechgpt_spelling():
    assert speech_text([12, 12, 7, 305, 305]) == "<sosp><12><7><305><eosp>"
    assert speech_text([]) == "<sosp><eosp>"
    assert parse_units("<sosp><12><7><305><eosp>") == [12, 7, 305]


@pytest.mark.parametrize("text, message", [
    ("<12><7><eosp>", "must start with <sosp>"),
    ("<sosp><12><7>", "must end with <eosp>"),
    ("<sosp><12> <7><eosp>", "at character 10"),
    ("<sosp><12><x><eosp>", r"found '<x><eosp>'|found '<x>'"),
    ("<sosp><12><-3><eosp>", "expected a unit like <12>"),
    ("<sosp><12><7<eosp>", "at character 10"),
])
def test_malformed_unit_strings(text, message):
    with pytest.raises(UnitError, match=message):
        parse_units(text)


def test_unit_out_of_range():
    with pytest.raises(UnitError, match="<100> at character 6 is out of range 0..99"):
        parse_units("<sosp><100><eosp>", n_units=100)


def test_unit_tokens_are_canonical_and_non_negative():
    assert unit_token(0) == "<0>" and unit_token(torch.tensor(305)) == "<305>"
    with pytest.raises(UnitError, match="non-negative"):
        speech_text([3, -1])
    with pytest.raises(UnitError, match="at character 6"):  # "<012>" is no unit token: the tokenizer has "<12>"
        parse_units("<sosp><012><eosp>")


def test_tolerant_parsing_keeps_what_it_can_and_says_what_was_wrong():
    problems = []
    assert parse_units(" <sosp><1>zz<2><7><eosp>", n_units=5, strict=False, problems=problems) == [1, 2]
    assert len(problems) == 2 and "non-unit text" in problems[0] and "out of range" in problems[1]
    problems = []
    assert parse_units("<3><4>", strict=False, problems=problems) == [3, 4]
    assert any("without <sosp>" in p for p in problems) and any("unterminated" in p for p in problems)
    assert parse_units("<sosp><eosp>", strict=False) == []  # problems not asked for: none raised either


def test_pnmi_known_answers():
    phones = ["a", "b", "c", "a", "b", "c"] * 5
    # perfect one-to-one correspondence (unit ids need not match phone order)
    perfect = unit_quality(phones, [7, 3, 9, 7, 3, 9] * 5)
    assert perfect == pytest.approx({"pnmi": 1.0, "phone_purity": 1.0, "cluster_purity": 1.0})
    # two units per phone still determine the phone: PNMI 1, but each phone spreads over two units
    split = unit_quality(["a"] * 4 + ["b"] * 4, [0, 0, 1, 1, 2, 2, 3, 3])
    assert split == pytest.approx({"pnmi": 1.0, "phone_purity": 1.0, "cluster_purity": 0.5})
    # independent: every unit sees each phone equally often
    indep = unit_quality(["a", "a", "b", "b"] * 3, [0, 1, 0, 1] * 3)
    assert indep["pnmi"] == pytest.approx(0.0, abs=1e-12) and indep["phone_purity"] == pytest.approx(0.5)


def test_pnmi_by_hand():
    # frames: (a,0) (a,0) (a,1) (b,1); P(a)=3/4, P(b)=1/4, P(u0)=P(u1)=1/2
    # I = 1/2 log(1/2 / (3/4*1/2)) + 1/4 log(1/4 / (3/4*1/2)) + 1/4 log(1/4 / (1/4*1/2))
    mutual = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    h_phone = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    q = unit_quality(["a", "a", "a", "b"], [0, 0, 1, 1])
    assert q["pnmi"] == pytest.approx(mutual / h_phone)
    assert q["phone_purity"] == pytest.approx(3 / 4)  # unit 0 -> a (2), unit 1 -> a or b (1)
    assert q["cluster_purity"] == pytest.approx(3 / 4)  # a -> unit 0 (2), b -> unit 1 (1)


SEGS = "EST_File Segment\nDataType ascii\n#\n0.2200 100 pau\n0.3110 100 t\n0.4102 100 eh\n"


def test_read_segs_and_frame_phones(tmp_path):
    path = tmp_path / "x.segs"
    path.write_text(SEGS)
    segments = read_segs(path)
    assert segments == [(0.0, 0.22, "pau"), (0.22, 0.311, "t"), (0.311, 0.4102, "eh")]
    # frame i centre: 0.02 i + 0.0125 -> frame 10 at 0.2125 is pau, frame 11 at 0.2325 is t
    phones = frame_phones(segments, 25)
    assert phones[10] == "pau" and phones[11] == "t" and phones[14] == "t" and phones[15] == "eh"  # 0.3125 > 0.311
    assert phones[24] == "eh"  # past the end: the last phone
    assert score_units([np.arange(25)], [path])["pnmi"] == pytest.approx(1.0)
    (tmp_path / "bad.segs").write_text("0.1 100 a\n")
    with pytest.raises(ValueError, match="no '#' line"):
        read_segs(tmp_path / "bad.segs")
    (tmp_path / "bad2.segs").write_text("#\n0.1 100\n")
    with pytest.raises(ValueError, match="bad2.segs:2: expected"):
        read_segs(tmp_path / "bad2.segs")


def test_speech_to_units_batched_equals_one_by_one():
    torch.manual_seed(0)
    config = HubertConfig.from_preset("toy", conv_dim=(16,) * 7, hidden_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=32, num_conv_pos_embeddings=8,
                                      num_conv_pos_embedding_groups=2, num_clusters=0)
    encoder = HuBERT(config).eval()
    km = KMeans(torch.randn(8, 16))
    wavs = [torch.randn(n) for n in (4000, 7000, 2500)]
    batched = speech_to_units(wavs, encoder, 1, km, batch_size=3)
    for wav, units in zip(wavs, batched):
        assert units.shape == ((len(wav) - 400) // 320 + 1,)
        assert torch.equal(units, speech_to_units([wav], encoder, 1, km)[0])
    for (units, durations), full in zip(speech_to_deduped_units(wavs, encoder, 1, km, batch_size=2), batched):
        assert torch.equal(torch.repeat_interleave(units, durations), full)


def test_speech_to_units_follows_the_device(devices_seen, no_cuda):
    """The encoder runs on the device asked for ("cpu": exactly as the default, where the encoder is);
    units come back on the CPU; "cuda" without CUDA fails before the encoder runs."""
    torch.manual_seed(0)
    config = HubertConfig.from_preset("toy", conv_dim=(16,) * 7, hidden_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=32, num_conv_pos_embeddings=8,
                                      num_conv_pos_embedding_groups=2, num_clusters=0)
    encoder, km = HuBERT(config).eval(), KMeans(torch.randn(8, 16))
    wavs = [torch.randn(n) for n in (4000, 7000)]
    default = speech_to_units(wavs, encoder, 1, km)
    on_cpu = speech_to_units(wavs, encoder, 1, km, device="cpu")
    assert all(torch.equal(a, b) and b.device == torch.device("cpu") for a, b in zip(default, on_cpu))
    assert devices_seen == {torch.device("cpu")}
    devices_seen.clear()
    with pytest.raises(ValueError, match="CUDA is not available"):
        speech_to_units(wavs, encoder, 1, km, device="cuda")
    assert not devices_seen
