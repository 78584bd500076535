"""SpeechGPT assembled: speech or text in -> transcript, text answer, spoken answer.

    speech ──HuBERT + k-means──> <sosp><12><7>...<eosp> ──prompt──> LM ──> response text
    response text ──parse_response──> transcript, [ta] text answer, [ua] units ──vocoder──> 16 kHz wav

The response of the chain of modality reads (stage 3's training strings, data.py):

    {transcript of the question}; [ta] {text answer}; [ua] <sosp><5><9>...<eosp><eoa>

and stage 2's ASR / TTS answers are text or speech followed by <eoa>. A model is never forced to
follow this format, so `parse_response` keeps whatever it can and lists what was wrong.

    sgpt = SpeechGPT.from_run("runs/toy")                 # a run made by train.py
    out = sgpt.chat(wav="question.wav")                   # spoken dialogue
    out.transcript, out.text_answer, out.answer_units, out.waveform
    sgpt.chat(text="what is two plus two")                # text dialogue
    sgpt.chat(wav="speech.wav", task="asr"); sgpt.chat(text="hello", task="tts")

A model trained here is prompted with exactly its training prefix (prompts="trained"); the released
weights with the released inference template (prompts="released", the default of `from_parts`).
Sampling defaults are the released ones (temperature 0.7, top_p 0.8, top_k 50); temperature=0 is
greedy decoding, which the evaluation functions at the end of this file use.
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .audio import SAMPLE_RATE, load_audio
from .data import (ASR_INSTRUCTIONS, CHAIN_TEMPLATE, END_OF_ANSWER, INFERENCE_TEMPLATE, INSTRUCTION_TEMPLATE,
                   SYSTEM_PROMPT, TTS_INSTRUCTIONS, encode_prompt, speech_text)
from .hubert import HuBERT
from .lora import load_adapter, merge_and_unload
from .tokenizer import HF_FILE, SENTENCEPIECE_FILE, WORD_FILE, Tokenizer
from .units import EOSP, SOSP, KMeans, speech_to_deduped_units
from .vocoder import UnitVocoder
from .weights import load_pretrained

TASKS = ("dialogue", "asr", "tts")
RELEASED_UNIT_LAYER = 11  # mHuBERT layer of the released k-means
# Where a response ends: the answer's end, the end-of-sequence token, or a new turn the model invents.
STOPS = (END_OF_ANSWER, "<eos>", "[Human]")


class PipelineError(ValueError):
    """Parts that do not fit together, or an input the pipeline cannot use: the message says which."""


# ----------------------------------------------------------------------------- response parsing

@dataclass
class Response:
    """What a generated text says. Fields the text lacks are None (or [] for units)."""
    text: str                          # the generated text itself
    transcript: str | None = None      # before "[ta]": the model's transcript of a spoken question
    text_answer: str | None = None     # after "[ta]", or the whole text of an answer without tags (ASR)
    answer_units: list[int] = field(default_factory=list)  # the speech answer, <sosp>...<eosp>
    problems: list[str] = field(default_factory=list)      # how the text departs from the format

    @property
    def complete(self):
        return not self.problems


_UNIT = re.compile(r"<(\d+)>")


def _clean(text):
    """Strip a field of its separators: "seven; " -> "seven"; empty -> None."""
    text = text.strip().removesuffix(";").strip()
    return text or None


def _parse_speech(text, n_units, problems):
    """" <sosp><5><9><eosp>" -> [5, 9], tolerating a missing <sosp> or <eosp>, text among the
    units and out-of-range ids (all dropped and listed in `problems`)."""
    start = text.find(SOSP)
    if start < 0:
        problems.append("speech answer without <sosp>")
    else:
        if text[:start].strip():
            problems.append(f"unexpected text before <sosp>: {text[:start].strip()[:30]!r}")
        text = text[start + len(SOSP):]
    end = text.find(EOSP)
    if end < 0:
        problems.append("speech answer without <eosp> (unterminated)")
    else:
        if text[end + len(EOSP):].strip():
            problems.append(f"unexpected text after <eosp>: {text[end + len(EOSP):].strip()[:30]!r}")
        text = text[:end]
    garbage = _UNIT.sub("", text).strip()
    if garbage:
        problems.append(f"non-unit text inside the speech: {garbage[:30]!r}")
    units = [int(u) for u in _UNIT.findall(text)]
    if n_units is not None:
        bad = [u for u in units if u >= n_units]
        if bad:
            problems.append(f"{len(bad)} unit id(s) out of range 0..{n_units - 1}, e.g. <{bad[0]}>: dropped")
            units = [u for u in units if u < n_units]
    if not units:
        problems.append("speech answer with no units")
    return units


def parse_response(text, n_units=None):
    """Parse a generated text into a Response; never raises on malformed text.

    Accepts the chain of modality `{transcript}; [ta] {answer}; [ua] <sosp>...<eosp><eoa>` and its
    variants without transcript or speech, and the ASR/TTS answers `text<eoa>` / `<sosp>...<eosp><eoa>`.
    n_units: K; unit ids >= K are dropped (and reported) so the vocoder can always speak the rest.
    """
    problems = []
    cuts = {stop: text.find(stop) for stop in STOPS if stop in text}
    first = min(cuts, key=cuts.get) if cuts else None
    body = text[:cuts[first]] if first else text
    if first is None:
        problems.append("no <eoa>: the answer was cut off")
    elif first != END_OF_ANSWER:
        problems.append(f"{first} before <eoa>: the answer was cut short")

    units = []
    if "[ua]" in body:
        body, _, speech = body.partition("[ua]")
        units = _parse_speech(speech, n_units, problems)
    elif SOSP in body:
        at = body.index(SOSP)
        body, speech = body[:at], body[at:]
        units = _parse_speech(speech, n_units, problems)
        if "[ta]" in body:
            problems.append("speech answer without [ua]")
    elif EOSP in body or _UNIT.search(body):
        problems.append("unit ids outside <sosp>...<eosp>: ignored")

    transcript, answer = None, None
    if "[ta]" in body:
        before, _, after = body.partition("[ta]")
        transcript, answer = _clean(before), _clean(after)
    else:
        answer = _clean(body)
    return Response(text, transcript, answer, units, problems)


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
