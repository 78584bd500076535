"""Pipeline: tolerant response parsing (property tests), metrics on hand-computed cases, and the
whole SpeechGPT assembled from a tiny random run directory and from released-format parts."""
import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import speechgpt_min.evaluate as evaluate
from speechgpt_min.audio import SAMPLE_RATE
from speechgpt_min.data import (ASR_INSTRUCTIONS, CHAIN_TEMPLATE, SYSTEM_PROMPT, asr_dialogue, chain_dialogue,
                                encode_dialogue, encode_prompt, speech_text, tts_dialogue)
from speechgpt_min.evaluate import evaluate_asr, evaluate_chain, evaluate_tts, speech_whisper_wer, text_answers
from speechgpt_min.lora import LoRAConfig, inject, lora_layers, save_adapter
from speechgpt_min.model import LMConfig, Transformer
from speechgpt_min.pipeline import TASKS, ChatResult, PipelineError, Response, SpeechGPT, parse_response
from speechgpt_min.vocoder import UnitVocoder, VocoderConfig

K = 20  # units of the parsing tests

# ----------------------------------------------------------------------------- parse_response

WORDS = st.text(alphabet="abcdefghij ,.?!'", min_size=1, max_size=30).map(str.strip).filter(
    lambda s: s and not s.endswith(";"))
UNITS = st.lists(st.integers(0, K - 1), min_size=1, max_size=20).map(
    lambda us: [u for i, u in enumerate(us) if i == 0 or u != us[i - 1]])  # repeats merged, as the model writes


def test_parse_chain_of_modality():
    r = parse_response("what is two plus two; [ta] four; [ua] <sosp><3><17><5><eosp><eoa>.")
    assert (r.transcript, r.text_answer, r.answer_units, r.problems) == ("what is two plus two", "four", [3, 17, 5], [])
    assert r.complete


def test_parse_asr_and_tts_answers():
    assert parse_response("the frog sings<eoa>") == Response("the frog sings<eoa>", None, "the frog sings", [], [])
    r = parse_response("<sosp><1><2><eosp><eoa>")
    assert (r.text_answer, r.answer_units, r.complete) == (None, [1, 2], True)


@pytest.mark.parametrize("text, expected, problem", [
    ("q; [ta] a; [ua] <sosp><1><2>", dict(transcript="q", text_answer="a", answer_units=[1, 2]), "unterminated"),
    ("q; [ta] a; [ua] <1><2><eosp><eoa>", dict(answer_units=[1, 2]), "without <sosp>"),
    ("[ta] a; [ua] <sosp><1><999><2><eosp><eoa>", dict(transcript=None, answer_units=[1, 2]), "out of range"),
    ("[ta] a; [ua] <sosp><1>zz<2><eosp><eoa>", dict(answer_units=[1, 2]), "non-unit text"),
    ("seven<eoa", dict(text_answer="seven<eoa"), "cut off"),
    ("q; [ta] a<eos> more", dict(transcript="q", text_answer="a"), "<eos> before <eoa>"),
    ("[ta] four<eoh>. [Human]: and", dict(text_answer="four<eoh>."), "[Human] before <eoa>"),
    ("q; [ta] a; <sosp><4><eosp><eoa>", dict(text_answer="a", answer_units=[4]), "without [ua]"),
    ("", dict(transcript=None, text_answer=None, answer_units=[]), "cut off"),
])
def test_parse_recovers_what_it_can(text, expected, problem):
    r = parse_response(text, n_units=K)
    for name, value in expected.items():
        assert getattr(r, name) == value, name
    assert not r.complete and any(problem in p for p in r.problems), r.problems


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_parse_never_raises_on_any_text(text):
    r = parse_response(text, n_units=K)
    assert all(0 <= u < K for u in r.answer_units)
    assert not r.complete or "<eoa>" in text  # a whole response has ended, with <eoa>


PIECES = ["[ta]", "[ua]", "<sosp>", "<eosp>", "<eoa>", "<eos>", "[Human]", "<eoh>", ";", " ", "<", ">", "<7>",
          "<12345678901234567890>", "<-1>", "word", "\n", "\x00", "é"]


@given(st.sampled_from(["s2s", "t2t", "s2t", "t2s", "asr", "tts"]), WORDS, WORDS, UNITS, UNITS,
       st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 3), st.sampled_from(PIECES)), max_size=4))
@settings(max_examples=200, deadline=None)
def test_corrupted_valid_responses_never_raise(variant, question, answer, q_units, a_units, edits):
    text = _response(variant, question, answer, q_units, a_units)
    for position, kind, piece in edits:  # delete / insert / replace / truncate at a random place
        p = position % (len(text) + 1)
        text = [text[:p] + text[p + 1:], text[:p] + piece + text[p:], text[:p] + piece + text[p + len(piece):],
                text[:p]][kind]
    r = parse_response(text, n_units=K)
    assert isinstance(r.answer_units, list) and all(0 <= u < K for u in r.answer_units)


def _response(variant, question, answer, q_units, a_units):
    if variant == "asr":
        return asr_dialogue(q_units, answer).response
    if variant == "tts":
        return tts_dialogue(answer, a_units).response
    return chain_dialogue(variant, question, answer, q_units, a_units).response


@given(st.sampled_from(["s2s", "t2t", "s2t", "t2s", "asr", "tts"]), WORDS, WORDS, UNITS, UNITS)
@settings(max_examples=200, deadline=None)
def test_valid_responses_round_trip(variant, question, answer, q_units, a_units):
    r = parse_response(_response(variant, question, answer, q_units, a_units), n_units=K)
    assert r.complete, r.problems
    assert r.transcript == (question if variant in ("s2s", "s2t") else None)
    assert r.text_answer == (None if variant == "tts" else answer)
    assert r.answer_units == (a_units if variant in ("s2s", "t2s", "tts") else [])


# ----------------------------------------------------------------------------- a tiny run directory (conftest.py)

@pytest.fixture(scope="module")
def sgpt(tiny_run):
    return SpeechGPT.from_run(tiny_run.directory, device="cpu")


def noise(seconds=1.0, sr=SAMPLE_RATE, channels=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (int(seconds * sr),) if channels is None else (int(seconds * sr), channels)
    return 0.1 * torch.randn(shape, generator=g)


def test_from_run_assembles_every_part_and_merges_the_adapter(tiny_run, sgpt):
    directory, trained = tiny_run.directory, tiny_run.lm
    assert sgpt.encoder is not None and sgpt.layer == 2 and sgpt.kmeans.n_clusters == tiny_run.n_units
    assert sgpt.vocoder is not None and sgpt.tokenizer.n_units == tiny_run.n_units
    assert sgpt.prompts.chain == CHAIN_TEMPLATE
    layer = lora_layers(trained)["layers.0.self_attn.q_proj"]
    merged = layer.weight + layer.delta_weight()  # stage 2 weight + the stage 3 update
    torch.testing.assert_close(sgpt.lm.layers[0].self_attn.q_proj.weight, merged)
    assert not lora_layers(sgpt.lm)  # folded into plain linear layers
    stage2 = SpeechGPT.from_run(directory, device="cpu", adapter=False)  # the ASR/TTS model, without stage 3
    torch.testing.assert_close(stage2.lm.layers[0].self_attn.q_proj.weight, layer.weight)


def test_prompts_are_the_training_prefixes(sgpt):
    tok, units = sgpt.tokenizer, [3, 1, 4]
    assert sgpt.prompt("dialogue", text="hi") == SYSTEM_PROMPT + "[Human]: hi<eoh>. [SpeechGPT]: "
    for dialogue, task, kwargs in [(asr_dialogue(units, "two plus two"), "asr", dict(question_units=units)),
                                   (tts_dialogue("two plus two", units), "tts", dict(text="two plus two")),
                                   (chain_dialogue("s2s", "q", "a", units, units), "dialogue",
                                    dict(question_units=units))]:
        prompt_ids = encode_prompt(tok, sgpt.prompt(task, **kwargs))
        assert encode_dialogue(tok, dialogue).tokens[:len(prompt_ids)] == prompt_ids, task


@pytest.mark.parametrize("task, inputs", [("dialogue", "wav"), ("dialogue", "text"), ("asr", "wav"),
                                          ("tts", "text"), ("asr", "units")])
def test_chat_runs_every_task(sgpt, task, inputs):
    kwargs = {"wav": dict(wav=noise()), "text": dict(text="what is two plus two"), "units": dict(units=[1, 2, 3])}
    out = sgpt.chat(task=task, max_new_tokens=24, seed=0, **kwargs[inputs])
    assert isinstance(out, ChatResult) and out.task == task
    assert isinstance(out.response.text, str) and isinstance(out.answer_units, list)
    n_units = sgpt.tokenizer.n_units
    assert all(isinstance(u, int) and 0 <= u < n_units for u in out.answer_units)
    if inputs != "text":
        assert out.question_units and all(0 <= u < n_units for u in out.question_units)
        assert speech_text(out.question_units) in out.prompt
    if out.answer_units:
        assert out.waveform.dim() == 1 and out.waveform.dtype == torch.float32 and out.sample_rate == SAMPLE_RATE
    else:
        assert out.waveform is None
    json.dumps(out.to_dict())


def test_speech_in_at_any_rate_and_channels(sgpt, tmp_path):
    import soundfile as sf
    path = tmp_path / "stereo.wav"
    sf.write(str(path), noise(1.0, sr=22050, channels=2).numpy(), 22050)
    units = sgpt.speech_to_units(path)
    assert units and all(0 <= u < sgpt.tokenizer.n_units for u in units)
    assert all(a != b for a, b in zip(units, units[1:]))  # repeats merged
    assert sgpt.speech_to_units(noise(1.0, sr=8000), sr=8000)  # samples at another rate


def test_every_part_runs_on_the_pipeline_device(tiny_run, tmp_path, devices_seen):
    """The ears (HuBERT, or a phone recogniser) and the voice follow `device` like the LM; units come back
    as a list either way."""
    from speechgpt_min.phones import PhoneRecognizer, PhoneRecognizerConfig
    PhoneRecognizer(PhoneRecognizerConfig(phones=[f"p{i}" for i in range(tiny_run.n_units)], channels=8,
                                          dilations=(1,))).save_pretrained(tmp_path / "phones")
    hubert = SpeechGPT.from_run(tiny_run.directory, device="cpu")
    phones = SpeechGPT.from_parts(tiny_run.directory / "stage2" / "model", phones_dir=tmp_path / "phones",
                                  vocoder_path=tiny_run.directory / "vocoder", device="cpu")
    for sgpt in (hubert, phones):
        ears = sgpt.encoder if sgpt.phones is None else sgpt.phones
        assert {p.device for part in (sgpt.lm, ears, sgpt.vocoder) for p in part.parameters()} == {torch.device("cpu")}
        assert isinstance(sgpt.speech_to_units(noise(0.5)), list) and sgpt.units_to_speech([1, 2]).device.type == "cpu"
    assert devices_seen == {torch.device("cpu")}

def test_speech_out_from_a_well_formed_response(sgpt, monkeypatch):
    monkeypatch.setattr(sgpt, "generate", lambda *args, **kwargs: "what is two plus two; [ta] four; "
                        "[ua] <sosp><3><7><3><eosp><eoa>")
    out = sgpt.chat(wav=noise())
    assert (out.transcript, out.text_answer, out.answer_units) == ("what is two plus two", "four", [3, 7, 3])
    assert out.response.complete
    assert out.waveform.dim() == 1 and out.waveform.dtype == torch.float32
    assert len(out.waveform) % 320 == 0 and len(out.waveform) >= 3 * 320  # >= 1 frame of 320 samples per unit
    assert sgpt.chat(wav=noise(), speak=False).waveform is None


def _fake_stream(tokens):
    def stream(ids, max_new_tokens, *args, **kwargs):
        for t in tokens[:max_new_tokens]:
            yield torch.tensor([t])
    return stream


def test_generate_stops_at_eoa_text_or_eos(sgpt, monkeypatch):
    tok = sgpt.tokenizer
    monkeypatch.setattr(sgpt.lm, "stream", _fake_stream(tok.encode("[ta] four<eoa>. [Human]: more")))
    pieces = []
    assert sgpt.generate("x", on_text=pieces.append) == "[ta] four<eoa>"
    assert "".join(pieces) == "[ta] four<eoa>" and len(pieces) > 1  # streamed piece by piece
    for stop in (tok.eos_id, tok.special_id("<eos>")):
        monkeypatch.setattr(sgpt.lm, "stream", _fake_stream(tok.encode("[ta] four") + [stop] + tok.encode("x")))
        assert sgpt.generate("x") == "[ta] four"
    monkeypatch.setattr(sgpt.lm, "stream", _fake_stream(tok.encode("four four four four")))
    assert sgpt.generate("x", max_new_tokens=2) == tok.decode(tok.encode("four four four four")[:2])
    monkeypatch.setattr(sgpt.lm, "stream", _fake_stream(tok.encode("hi; [ta] four; [ua] <sosp><1><eosp><eoa>")))
    assert sgpt.generate("x", stop_at="[ua]") == "hi; [ta] four; [ua]"  # an evaluation that needs only the text
    assert sgpt.generate("x", stop_at="[xx]") == "hi; [ta] four; [ua] <sosp><1><eosp><eoa>"


def test_greedy_is_deterministic_and_streaming_matches(sgpt):
    prompt = sgpt.prompt("dialogue", text="what is two plus two")
    pieces = []
    first = sgpt.generate(prompt, max_new_tokens=30, temperature=0, on_text=pieces.append)
    assert first == sgpt.generate(prompt, max_new_tokens=30, temperature=0) == "".join(pieces)
    assert sgpt.generate(prompt, 30, seed=1) == sgpt.generate(prompt, 30, seed=1)  # seeded sampling


def test_evaluation_scores_a_perfect_and_a_random_model(sgpt, monkeypatch):
    asr = [([1, 2], "two plus two"), ([4, 5, 6], "what is two plus two")]
    tts = [("two plus two", [1, 2, 3]), ("four", [9])]
    chain = [([1, 2], "what is two plus two", "four", [7, 8]), ([3], "two plus two", "four", [5])]
    for scores in (evaluate_asr(sgpt, asr, 16, False), evaluate_tts(sgpt, tts, 16, False),
                   evaluate_chain(sgpt, chain, 16, False)):  # random weights: any scores, well formed
        assert scores["n"] == 2 and all(v >= 0 for k, v in scores.items() if not isinstance(v, list))  # lists: outputs

    answers = {}  # prompt -> the right response, as a perfectly trained model would write it
    for units, text in asr:
        answers[sgpt.prompt("asr", units)] = asr_dialogue(units, text).response
    for text, units in tts:
        answers[sgpt.prompt("tts", text=text)] = tts_dialogue(text, units).response
    for q_units, q, a, a_units in chain:
        answers[sgpt.prompt("dialogue", q_units)] = chain_dialogue("s2s", q, a, q_units, a_units).response
    monkeypatch.setattr(sgpt, "generate_batch", lambda prompts, *args: [answers[p] for p in prompts])
    assert evaluate_asr(sgpt, asr, progress=False) == {"wer": 0.0, "cer": 0.0, "n": 2}
    assert evaluate_tts(sgpt, tts, progress=False) == {"unit_edit_distance": 0.0, "n": 2, "answer_units": [[1, 2, 3], [9]]}
    assert evaluate_chain(sgpt, chain, progress=False) == {
        "transcript_wer": 0.0, "answer_accuracy": 1.0, "speech_answer_unit_edit_distance": 0.0,
        "well_formed": 1.0, "n": 2, "answer_units": [[7, 8], [5]], "transcripts": [q for _, q, _, _ in chain],
        "text_answers": [a for _, _, a, _ in chain]}
    answers[sgpt.prompt("dialogue", chain[1][0])] = chain_dialogue("s2s", chain[1][1], "wrong", chain[1][0], [5]).response
    assert evaluate_chain(sgpt, chain, progress=False, speech_answer=False)["text_answers"] == [chain[0][2], "wrong"]
    typed = [("what is two plus two", "four"), ("what is two", "two")]
    for q, a in typed:
        answers[sgpt.prompt("dialogue", text=q)] = chain_dialogue("t2t", q, a).response
    assert text_answers(sgpt, typed, progress=False) == ["four", "two"]  # in the items' order


@pytest.fixture
def varied(sgpt):
    """sgpt's tokenizer with a random LM of large weights: unlike small ones, its greedy text depends
    on the input, so rows that a batch mixed up would show."""
    torch.manual_seed(0)
    lm = Transformer(LMConfig(vocab_size=len(sgpt.tokenizer), dim=32, n_layers=2, n_heads=2, max_seq_len=1024))
    for name, parameter in lm.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(parameter, std=0.3)
    return SpeechGPT(lm, sgpt.tokenizer)


BATCH_INPUTS = {"asr": [dict(units=[1, 2, 3]), dict(units=[4]), dict(units=list(range(12)))],
                "tts": [dict(text="two plus two"), dict(text="four"), dict(text="what is two plus two")],
                "dialogue": [dict(units=[1, 2]), dict(text="what is two plus two"), dict(units=[5, 9, 3, 3, 7, 1])]}


def _one_by_one(sgpt, inputs, task, max_new_tokens, stop_at=None):
    return [sgpt.chat(**given, task=task, max_new_tokens=max_new_tokens, temperature=0, speak=False, stop_at=stop_at)
            for given in inputs]


def _texts(results):
    return [r.response.text for r in results]


@pytest.mark.parametrize("task", TASKS)
def test_chat_batch_equals_chat_one_by_one(varied, task):
    inputs = BATCH_INPUTS[task]
    alone = _one_by_one(varied, inputs, task, 16)
    assert len({r.response.text for r in alone}) == 3  # three different answers: a mix-up would show
    assert varied.chat_batch(inputs, task, 16) == alone
    # a row ends at its stop_at while the others, which never write it, go on
    text, others = alone[1].response.text, _texts(alone[::2])
    stop_at = next(text[i:i + 3] for i in range(3, len(text)) if not any(text[i:i + 3] in o for o in others))
    stopped = _one_by_one(varied, inputs, task, 16, stop_at)
    assert _texts(stopped) == [others[0], text[:text.index(stop_at) + 3], others[1]]
    assert varied.chat_batch(inputs, task, 16, stop_at) == stopped


def test_generate_batch_ends_each_row_as_generate_ends_it(sgpt, monkeypatch):
    tok = sgpt.tokenizer
    rows = [tok.encode("[ta] four<eoa>. [Human]: more"), tok.encode("[ta] two") + [tok.eos_id] + tok.encode("x"),
            tok.encode("[ta] six") + [tok.vocab_size + 3] + tok.encode("seven"), tok.encode("one two three four")]
    n = max(map(len, rows))
    rows = [row + row[-1:] * (n - len(row)) for row in rows]  # (B, n) as the model streams them

    def stream(ids, max_new_tokens, *args, **kwargs):
        assert ids.shape[0] == len(rows) and kwargs["temperature"] == 0 and kwargs["pad_mask"].shape == ids.shape
        for column in torch.tensor(rows).T[:max_new_tokens]:
            yield column

    monkeypatch.setattr(sgpt.lm, "stream", stream)
    assert sgpt.generate_batch(["a", "b b b", "c", "d"], 16) == [
        "[ta] four<eoa>", "[ta] two", "[ta] six", tok.decode(rows[3])]
    assert sgpt.generate_batch(["a", "b b b", "c", "d"], 16, stop_at="two") == [
        "[ta] four<eoa>", "[ta] two", "[ta] six", "one two"]


def test_chat_batch_rows_end_at_stop_ids_and_at_the_context(varied, monkeypatch):
    inputs = BATCH_INPUTS["dialogue"]
    full = _texts(_one_by_one(varied, inputs, "dialogue", 16))
    eoh = varied.tokenizer.encode("<eoh>")
    assert len(eoh) == 1
    monkeypatch.setattr(varied, "stop_ids", {*varied.stop_ids, *eoh})  # a token some rows give early, some never
    alone = _one_by_one(varied, inputs, "dialogue", 16)
    assert {a == f for a, f in zip(_texts(alone), full)} == {True, False}
    assert varied.chat_batch(inputs, "dialogue", 16) == alone
    # the longest prompt has no room for 16 new tokens: it goes alone, cut short by the context
    longest = max(len(encode_prompt(varied.tokenizer, r.prompt)) for r in alone)
    monkeypatch.setattr(varied.lm.config, "max_seq_len", longest + 10)
    cut = _one_by_one(varied, inputs, "dialogue", 16)
    assert {c == a for c, a in zip(_texts(cut), _texts(alone))} == {True, False}
    assert varied.chat_batch(inputs, "dialogue", 16) == cut


def test_batched_evaluation_equals_one_at_a_time(varied, monkeypatch):
    asr = [(units, "two plus two") for units in ([4, 5, 6, 7, 8], [1], [9, 3, 3], [2, 8, 1, 1, 4, 5, 6], [7, 7], [3])]
    tts = [(text, [1, 2]) for text in ("two plus two is four", "four", "what is two", "two", "plus two", "what")]
    chain = [(units, "what is two plus two", "four", [7, 8]) for units, _ in asr]
    typed = [(text, "four") for text, _ in tts]
    monkeypatch.setattr(evaluate, "word_error_rate", lambda refs, hyps: list(hyps))  # the hypotheses themselves
    monkeypatch.setattr(evaluate, "exact_match_accuracy", lambda refs, hyps: list(hyps))

    def scores(batch_size):
        return (evaluate_asr(varied, asr, 12, False, batch_size), evaluate_tts(varied, tts, 12, False, batch_size),
                evaluate_chain(varied, chain, 12, False, batch_size=batch_size),
                evaluate.evaluate_text_questions(varied, typed, 12, False, batch_size))

    one_at_a_time = scores(1)
    assert scores(4) == one_at_a_time  # a batch of 4 and one of 2, inputs of many lengths
    alone = _one_by_one(varied, [dict(units=units) for units, _ in asr], "asr", 12)
    assert one_at_a_time[0]["wer"] == [r.transcript for r in alone]  # in the items' order
    assert len(set(one_at_a_time[0]["wer"])) == len(asr) and len(set(one_at_a_time[3])) > 1  # answers differ
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_asr(varied, asr, 12, False, batch_size=0)


def test_speaking_chain_is_heard_by_whisper_where_installed(sgpt, monkeypatch):
    """speech_whisper_wer speaks each unit list with the run's vocoder and scores what Whisper hears;
    an empty answer is silence (every word missed); without Whisper the score is None."""
    monkeypatch.setattr(evaluate, "whisper_available", lambda: False)
    assert speech_whisper_wer(sgpt, [[1, 2]], ["two"]) is None
    heard = []

    def whisper(wavs, progress=True):
        heard.extend(wavs)
        return ["two plus two"] * len(wavs)

    monkeypatch.setattr(evaluate, "whisper_available", lambda: True)
    monkeypatch.setattr(evaluate, "whisper_transcribe", whisper)
    assert speech_whisper_wer(sgpt, [[1, 2, 3], []], ["two plus two", "is four"]) == pytest.approx(2 / 5)
    assert len(heard) == 1 and heard[0].dim() == 1 and len(heard[0]) >= 3 * 320  # one waveform, 3 units long


def test_user_errors_name_the_problem(sgpt, tiny_run, tmp_path):
    with pytest.raises(PipelineError, match="python train.py"):
        SpeechGPT.from_run(tmp_path / "nope")
    with pytest.raises(PipelineError, match="stage2/model"):
        SpeechGPT.from_run(tmp_path)
    with pytest.raises(PipelineError, match="empty"):
        sgpt.chat(text="  ")
    with pytest.raises(PipelineError, match="exactly one"):
        sgpt.chat(units=[1], text="hi")
    with pytest.raises(PipelineError, match="unknown task"):
        sgpt.chat(text="hi", task="translate")
    with pytest.raises(PipelineError, match=f"0..{tiny_run.n_units - 1}"):
        sgpt.chat(units=[tiny_run.n_units], task="asr")
    with pytest.raises(PipelineError, match="context"):
        sgpt.generate("word " * 2000)
    wrong = tmp_path / "wrong_vocoder"
    UnitVocoder(VocoderConfig(num_embeddings=tiny_run.n_units + 1, embedding_dim=8, upsample_initial_channel=32,
                              dur_hidden_dim=8)).save_pretrained(wrong)
    with pytest.raises(PipelineError, match=f"vocoder speaks {tiny_run.n_units + 1} units"):
        SpeechGPT.from_parts(tiny_run.directory / "stage2" / "model", vocoder_path=wrong, device="cpu")


# ----------------------------------------------------------------------------- released-format parts

RELEASED_K = 50  # the reference vocoder's num_embeddings


@pytest.fixture(scope="module")
def released(tmp_path_factory, tiny_run, unit_hifigan_reference, transformers, sentencepiece_model):
    """A miniature of the released artifacts, each in its own file format: an HF LLaMA directory
    (pytorch_model.bin, SentencePiece tokenizer.model, added_tokens.json), a PEFT adapter
    (adapter_model.bin), an HF HubertModel directory, a joblib scikit-learn k-means, and a
    {"generator": state_dict} vocoder checkpoint with its config.json."""
    import joblib
    import numpy as np
    from sklearn.cluster import KMeans as SKLearnKMeans

    from speechgpt_min.tokenizer import SPECIAL_TOKENS, SentencePieceBackend
    from speechgpt_min.weights import load_pretrained

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("released")
    lm_dir, adapter_dir, hubert_dir, vocoder_dir = (root / n for n in ("cm", "com", "mhubert", "vocoder"))
    lm_dir.mkdir()
    model = sentencepiece_model(tiny_run.texts * 5, vocab_size=400)
    (lm_dir / "tokenizer.model").write_bytes(model)
    base = SentencePieceBackend(model).vocab_size  # LLaMA: 32000
    added = [f"<{u}>" for u in range(RELEASED_K)] + list(SPECIAL_TOKENS)
    (lm_dir / "added_tokens.json").write_text(json.dumps({t: base + i for i, t in enumerate(added)}))
    config = transformers.LlamaConfig(vocab_size=base + len(added), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=1024, rms_norm_eps=1e-6, bos_token_id=1,
                                      eos_token_id=2, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(config).eval()
    config.to_json_file(str(lm_dir / "config.json"))
    torch.save(hf.state_dict(), lm_dir / "pytorch_model.bin")

    ours = load_pretrained(lm_dir)
    lora = LoRAConfig.from_preset("speechgpt")
    inject(ours, lora)
    for layer in lora_layers(ours).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    save_adapter(ours, adapter_dir, lora, safetensors=False)
    with torch.no_grad():  # the reference: the update merged into transformers' own model
        for name, layer in lora_layers(ours).items():
            hf.get_submodule("model." + name).weight += layer.delta_weight()

    transformers.HubertModel(transformers.HubertConfig(
        conv_dim=(16, 16, 24, 24, 24, 32, 32), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)).save_pretrained(hubert_dir)
    km = SKLearnKMeans(n_clusters=RELEASED_K, n_init=1, random_state=0).fit(np.random.default_rng(0).normal(size=(400, 32)))
    joblib.dump(km, root / "km50.bin")
    vocoder_dir.mkdir()
    shutil.copy(unit_hifigan_reference / "tiny_config.json", vocoder_dir / "config.json")
    shutil.copy(unit_hifigan_reference / "g_tiny.pt", vocoder_dir / "g_tiny.pt")
    sgpt = SpeechGPT.from_parts(lm_dir, adapter_dir, hubert_dir, 2, root / "km50.bin", vocoder_dir / "g_tiny.pt",
                                device="cpu")
    return sgpt, hf


def test_released_format_parts_load(released):
    sgpt, hf = released
    tok = sgpt.tokenizer
    base = tok.backend.vocab_size  # ids as in SpeechGPT-7B-cm: units from the base size, <sosp> after them
    assert (tok.n_units, tok.unit_id(0), tok.special_id("<sosp>"), tok.special_id("<eos>")) == (
        50, base, base + 50, base + 55)
    assert sgpt.kmeans.n_clusters == 50 and sgpt.vocoder.config.num_embeddings == 50 and sgpt.layer == 2
    ids = torch.tensor([encode_prompt(tok, sgpt.prompt("dialogue", [1, 2, 3]))])
    with torch.no_grad():  # our LM with the adapter merged == transformers' LLaMA with the same update
        torch.testing.assert_close(sgpt.lm(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    assert sgpt.prompt("asr", [1]) == SYSTEM_PROMPT + ("[Human]: " + ASR_INSTRUCTIONS[0] +
                                                      " This is input: <sosp><1><eosp> <eoh>. [SpeechGPT]: ")


def test_released_format_speech_in_speech_out(released, monkeypatch):
    sgpt, _ = released
    out = sgpt.chat(wav=noise(1.5), max_new_tokens=24, seed=0)  # the real model: random, but it runs
    assert out.question_units and all(0 <= u < RELEASED_K for u in out.question_units)
    assert out.prompt.endswith("<eosp> <eoh>. [SpeechGPT]: ")
    monkeypatch.setattr(sgpt, "generate", lambda *args, **kwargs: "hm; [ta] yes; [ua] <sosp><49><0><7><eosp><eoa>")
    out = sgpt.chat(wav=noise(1.5))
    assert out.answer_units == [49, 0, 7] and out.response.complete
    assert out.waveform.dim() == 1 and out.waveform.dtype == torch.float32 and len(out.waveform) >= 3 * 320


def test_generate_ends_at_an_unassigned_token(sgpt, monkeypatch):
    tok = sgpt.tokenizer
    monkeypatch.setattr(sgpt.lm, "stream", _fake_stream(tok.encode("[ta] four") + [tok.vocab_size + 3] + [5]))
    assert sgpt.generate("x") == "[ta] four"
