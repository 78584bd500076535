"""Training data of SpeechGPT's three stages, as SpeechInstruct writes it: strings, then token ids.

Speech enters the text as its deduplicated units, `<sosp><12><7><305><eosp>`. Each stage turns a
manifest (utterances: id, text, split) and spoken question/answer pairs into training strings:

Stage 0, text pretraining (the toy's stand-in for what LLaMA learnt before SpeechGPT): each line of
a text corpus is an example of its own, BOS first and EOS last (as every later example starts at
BOS, alone), the loss on every token.

    <s>the owl says hoot</s>      <s>four plus three is seven</s>      <s>anna sees the little gray box</s>

Stage 1, modality adaptation: every training utterance's units, alone, BOS-prefixed, all
concatenated and cut into fixed blocks; the loss is on every token (next-unit prediction).

    <s><sosp><12><7><305><eosp><s><sosp><44>...

Stage 2, cross-modal instruction: speech <-> text, with the instruction phrased many ways.

    TTS  [Human]: Try to speak out this sentence, please. This is input: the frog sings<eoh> [SpeechGPT]: <sosp><1><2><eosp><eoa>
    ASR  [Human]: Transcribe this speech, please. This is input: <sosp><1><2><eosp><eoh> [SpeechGPT]: the frog sings<eoa>

ASR learns from every voice; TTS from one voice, the one the model answers in: the same text in
nine voices is nine different unit sequences, which no model could choose between (SpeechGPT's
vocoder, too, speaks one voice).

Stage 3, chain of modality: a spoken question is answered by thinking in text first (the
transcript, then the text answer `[ta]`, then the spoken answer `[ua]`). Four variants by the
modality of question and answer (s = speech, t = text); text questions need no transcript:

    s2s  [Human]: <sosp>Q<eosp><eoh>. [SpeechGPT]: {question}; [ta] {answer}; [ua] <sosp>A<eosp><eoa>.
    s2t  [Human]: <sosp>Q<eosp><eoh>. [SpeechGPT]: {question}; [ta] {answer}<eoa>.
    t2s  [Human]: {question}<eoh>. [SpeechGPT]: [ta] {answer}; [ua] <sosp>A<eosp><eoa>.
    t2t  [Human]: {question}<eoh>. [SpeechGPT]: [ta] {answer}<eoa>.

The default is s2s and t2t: s2t shares its whole prompt with s2s (and t2s with t2t), so trained
together the model could only guess which modality to answer in. Ask for them by name if wanted.

Every stage 2 and 3 string starts with SYSTEM_PROMPT (as the released training and inference did)
and is encoded as BOS + tokens + EOS. The loss covers only the response by default (labels -100
on BOS, system prompt and human turn); `train_on_inputs=True` masks only the system prompt, as the
released recipe did. Examples longer than the model's context are dropped with a warning that
counts them (truncating would cut off the answer's end and its <eoa>).

The templates live here, once: training strings and the inference prompt are built by the same
functions. Note the released quirk kept by INFERENCE_TEMPLATE: a space before <eoh> that the
SpeechInstruct training strings do not have (CHAIN_TEMPLATE); a model trained here sees exactly
its training prefix when prompted with template=CHAIN_TEMPLATE.
"""
import io
import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
import torch

from .audio import read_packed
from .model import IGNORE_INDEX
from .units import speech_text

SYSTEM_PROMPT = (
    "You are an AI assistant whose name is SpeechGPT.\n"
    "- SpeechGPT is a intrinsic cross-modal conversational language model that is developed by Fudan "
    "University.  SpeechGPT can understand and communicate fluently with human through speech or text "
    "chosen by the user.\n"
    "- It can perceive cross-modal inputs and generate cross-modal outputs.\n"
)
INSTRUCTION_TEMPLATE = "[Human]: {instruction} This is input: {input}<eoh> [SpeechGPT]: "  # stage 2
CHAIN_TEMPLATE = "[Human]: {question}<eoh>. [SpeechGPT]: "       # stage 3 (SpeechInstruct)
INFERENCE_TEMPLATE = "[Human]: {question} <eoh>. [SpeechGPT]: "  # the released inference script
END_OF_ANSWER = "<eoa>"

TTS_INSTRUCTIONS = (
    "Try to speak out this sentence, please.",
    "Please read this sentence aloud.",
    "Say this sentence out loud.",
    "Can you speak this text for me?",
    "Turn this text into speech.",
    "Read the following words aloud, please.",
    "Speak the sentence below.",
    "I would like to hear this sentence spoken.",
    "Convert this written sentence into spoken words.",
    "Please voice the following text.",
    "Pronounce this sentence for me.",
    "Give me a spoken version of this sentence.",
)
ASR_INSTRUCTIONS = (
    "Can you transcribe the speech into a written format?",
    "Please write down what is said in this recording.",
    "Transcribe this speech, please.",
    "What is being said here? Write it as text.",
    "Convert this speech into text.",
    "Listen to this and write out the words.",
    "Turn the spoken words into written text.",
    "Please give me a transcript of this audio.",
    "Write down the sentence you hear.",
    "Recognize the speech and output the text.",
    "What does the speaker say?",
    "Put this spoken sentence into writing.",
)
CHAIN_VARIANTS = ("s2s", "s2t", "t2s", "t2t")
DEFAULT_CHAIN_VARIANTS = ("s2s", "t2t")


SPLITS = ("train", "valid", "test", "test_unseen_voice", "test_knowledge")


class DataError(ValueError):
    """A manifest, pair file or unit table that cannot be used: the message names the row."""


# ----------------------------------------------------------------------------- corpus files

def read_jsonl(path, required):
    """Rows of a JSON-lines file, each checked to have the `required` keys."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{path}:{n}: missing {missing}; every row needs {list(required)}")
        rows.append(row)
    return rows


def load_manifest(path):
    """Utterances: [{"id", "audio", "text", "voice", "split", ...}] with unique ids and known splits."""
    rows = read_jsonl(path, ("id", "audio", "text", "voice", "split"))
    seen = set()
    for row in rows:
        if row["id"] in seen:
            raise DataError(f"{path}: utterance id {row['id']!r} appears twice")
        if row["split"] not in SPLITS:
            raise DataError(f"{path}: utterance {row['id']!r} has unknown split {row['split']!r}; "
                            f"valid: {', '.join(SPLITS)}")
        seen.add(row["id"])
    return rows


def load_pairs(path):
    """Question/answer pairs: [{"id", "split", "question": {"text", "audio": [ids]}, "answer": ...}].
    A question with no audio is typed only (it trains the text-to-text variant)."""
    pairs = read_jsonl(path, ("id", "split", "question", "answer"))
    for pair in pairs:
        if pair["split"] not in SPLITS:
            raise DataError(f"{path}: pair {pair['id']!r} has unknown split {pair['split']!r}; valid: {', '.join(SPLITS)}")
        for side in ("question", "answer"):
            if not isinstance(pair[side], dict) or "text" not in pair[side] or "audio" not in pair[side]:
                raise DataError(f"{path}: pair {pair['id']!r}: {side} must be {{'text': ..., 'audio': [ids]}}")
    return pairs


def load_text_corpus(path):
    """Stage 0's text corpus: one text per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (the text corpus of stage 0; tiny_data/make_tiny_data.py writes one)")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path}: the text corpus is empty")
    return lines


def load_fact_statements(path):
    """The text corpus's lines that state the world's facts: every fact's "statements" in facts.jsonl."""
    return [line for fact in read_jsonl(path, ("fact", "statements")) for line in fact["statements"]]


def check_corpus(data_dir, splits=("train", "valid", "test")):
    """Everything about a corpus directory that would stop a run later, found before any training.

    The manifest's rows (fields, unique ids, known splits), an utterance in each of `splits`, every
    audio file present and readable as audio (its header), and the pairs' utterance ids. Raises
    DataError naming the file and the problem. Returns (manifest rows, pairs).
    """

    data_dir = Path(data_dir)
    rows = load_manifest(data_dir / "manifest.jsonl")
    for split in splits:
        if not any(r["split"] == split for r in rows):
            raise DataError(f"{data_dir / 'manifest.jsonl'}: no utterances in split {split!r}")
    for row in rows:
        audio = data_dir / row["audio"]
        try:
            frames = sf.info(io.BytesIO(read_packed(audio))).frames
        except FileNotFoundError:
            raise DataError(f"{audio}: missing (utterance {row['id']!r} of {data_dir / 'manifest.jsonl'})") from None
        except (sf.LibsndfileError, RuntimeError) as error:
            raise DataError(f"{audio}: not readable as audio ({error})") from None
        if frames == 0:
            raise DataError(f"{audio}: no samples")
    pairs = load_pairs(data_dir / "qa.jsonl")
    ids = {r["id"] for r in rows}
    for pair in pairs:
        for side in ("question", "answer"):
            unknown = [i for i in pair[side]["audio"] if i not in ids]
            if unknown:
                raise DataError(f"{data_dir / 'qa.jsonl'}: pair {pair['id']!r}: {side} audio {unknown[0]!r} "
                                f"is not in the manifest")
    return rows, pairs


def in_split(rows, split):
    """The rows of one split; an error listing the splits present when there are none."""
    chosen = [r for r in rows if r["split"] == split]
    if not chosen:
        raise DataError(f"no rows in split {split!r}; splits present: {sorted({r['split'] for r in rows})}")
    return chosen


def units_of(units, utterance_id):
    """units[utterance_id], with a clear error when the unit table lacks it."""
    if utterance_id not in units:
        raise DataError(f"no units for utterance {utterance_id!r}: encode every utterance of the split first "
                        f"({len(units)} utterances have units)")
    return units[utterance_id]


# ----------------------------------------------------------------------------- strings

@dataclass(frozen=True)
class Dialogue:
    """One training example as text: the model is given `prompt` and must produce `response`."""
    task: str      # "tts", "asr", "s2s", "s2t", "t2s" or "t2t"
    prompt: str    # "[Human]: ... [SpeechGPT]: "
    response: str  # "...<eoa>" (stage 3: "...<eoa>.")

    def text(self, system_prompt=SYSTEM_PROMPT):
        return system_prompt + self.prompt + self.response


def instruction_prompt(instruction, input_text):
    """Stage 2's human turn: an instruction applied to an input (text, or speech in text)."""
    return INSTRUCTION_TEMPLATE.format(instruction=instruction, input=input_text)


def inference_prompt(question, system_prompt=SYSTEM_PROMPT, template=INFERENCE_TEMPLATE):
    """What the model is given at inference: system prompt + human turn, up to "[SpeechGPT]: "."""
    return system_prompt + template.format(question=question)


def tts_dialogue(text, units, instruction=TTS_INSTRUCTIONS[0]):
    return Dialogue("tts", instruction_prompt(instruction, text), speech_text(units) + END_OF_ANSWER)


def asr_dialogue(units, text, instruction=ASR_INSTRUCTIONS[0]):
    return Dialogue("asr", instruction_prompt(instruction, speech_text(units)), text + END_OF_ANSWER)


def chain_dialogue(variant, question, answer, question_units=None, answer_units=None):
    """Stage 3 in one of CHAIN_VARIANTS; speech sides need their units."""
    if variant not in CHAIN_VARIANTS:
        raise DataError(f"unknown chain-of-modality variant {variant!r}; valid: {', '.join(CHAIN_VARIANTS)}")
    speech_in, speech_out = variant[0] == "s", variant[2] == "s"
    response = f"{question}; " if speech_in else ""  # the transcript: speech is understood through text
    response += f"[ta] {answer}"
    if speech_out:
        response += f"; [ua] {speech_text(answer_units)}"
    human = speech_text(question_units) if speech_in else question
    return Dialogue(variant, CHAIN_TEMPLATE.format(question=human), response + END_OF_ANSWER + ".")


# ----------------------------------------------------------------------------- the stages

def stage0_texts(lines, seed=0):
    """Stage 0: the text corpus's lines in a seeded order."""
    texts = list(lines)
    random.Random(seed).shuffle(texts)
    return texts


def stage1_texts(rows, units, seed=0):
    """Stage 1: each utterance's units alone, "<sosp>...<eosp>", in a seeded order."""
    texts = [speech_text(units_of(units, row["id"])) for row in rows]
    random.Random(seed).shuffle(texts)
    return texts


def stage2_dialogues(rows, units, seed=0, tts_voice=None):
    """Stage 2: an ASR dialogue per utterance, and a TTS dialogue per utterance of `tts_voice` (the
    voice the model answers in; None: every utterance), each with a seeded choice of instruction."""
    rng = random.Random(seed)
    dialogues = []
    for row in rows:
        u = units_of(units, row["id"])
        if tts_voice is None or row.get("voice") == tts_voice:
            dialogues.append(tts_dialogue(row["text"], u, rng.choice(TTS_INSTRUCTIONS)))
        dialogues.append(asr_dialogue(u, row["text"], rng.choice(ASR_INSTRUCTIONS)))
    return dialogues


def stage3_dialogues(pairs, units, seed=0, variants=DEFAULT_CHAIN_VARIANTS):
    """Stage 3: per pair, each variant; speech questions once per recording (none for a typed-only
    question), the spoken answer a seeded choice among its recordings."""
    rng = random.Random(seed)
    dialogues = []
    for pair in pairs:
        q, a = pair["question"], pair["answer"]
        for variant in variants:
            question_ids = q["audio"] if variant[0] == "s" else [None]
            for qid in question_ids:
                q_units = units_of(units, qid) if qid is not None else None
                a_units = units_of(units, rng.choice(a["audio"])) if variant[2] == "s" else None
                dialogues.append(chain_dialogue(variant, q["text"], a["text"], q_units, a_units))
    return dialogues


# ----------------------------------------------------------------------------- token ids

@dataclass
class Example:
    """Token ids of one training sequence; labels[i] = tokens[i] where token i carries loss, else -100.

    (Labels are aligned with tokens, as in Hugging Face; `collate` shifts them into targets.)
    """
    tokens: list[int]
    labels: list[int]


def _bos(tokenizer):
    return [tokenizer.bos_id] if tokenizer.bos_id is not None else []


def encode_prompt(tokenizer, text):
    """Prompt text -> ids, BOS first. Trailing spaces are left out: in the training strings they
    belong to the response's first token (" three"), so this is the prefix the model was trained on."""
    return _bos(tokenizer) + tokenizer.encode(text.rstrip(" "))


def encode_dialogue(tokenizer, dialogue, system_prompt=SYSTEM_PROMPT, train_on_inputs=False):
    """Dialogue -> Example: BOS + system prompt + prompt + response + EOS, the loss masked on the
    prompt (or, with train_on_inputs, only on the system prompt)."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    tokens = _bos(tokenizer) + tokenizer.encode(dialogue.text(system_prompt)) + eos
    masked_text = system_prompt if train_on_inputs else system_prompt + dialogue.prompt
    masked = encode_prompt(tokenizer, masked_text)
    if tokens[:len(masked)] != masked:
        raise DataError(f"the tokens of {masked_text[-40:]!r} are not a prefix of the whole example's tokens; "
                        f"the tokenizer merges across the prompt/response boundary")
    return Example(tokens, [IGNORE_INDEX] * len(masked) + tokens[len(masked):])


def encode_dialogues(tokenizer, dialogues, max_len, system_prompt=SYSTEM_PROMPT, train_on_inputs=False):
    """Encode all; drop (with one warning counting them) those whose input exceeds max_len tokens.

    max_len: the model's context (max_seq_len). The input is every token but the last.
    """
    examples = [encode_dialogue(tokenizer, d, system_prompt, train_on_inputs) for d in dialogues]
    kept = [e for e in examples if len(e.tokens) - 1 <= max_len]
    if len(kept) < len(examples):
        longest = max(len(e.tokens) - 1 for e in examples)
        warnings.warn(f"dropped {len(examples) - len(kept)} of {len(examples)} examples longer than the "
                      f"context of {max_len} tokens (longest: {longest}); raise max_seq_len to keep them")
    if not kept:
        raise DataError(f"every example is longer than the context of {max_len} tokens")
    return kept


def text_examples(tokenizer, texts):
    """Stage 0: each text an example of its own, BOS + text + EOS, the loss on every token."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return [Example(ids, list(ids)) for ids in (_bos(tokenizer) + tokenizer.encode(text) + eos for text in texts)]


def pack_blocks(tokenizer, texts, block_size):
    """Stage 1 blocks: BOS + each text, concatenated, cut into blocks of block_size + 1 tokens that
    overlap by one, so every token after the first is a target exactly once. The tail is dropped."""
    stream = []
    for text in texts:
        stream += _bos(tokenizer) + tokenizer.encode(text)
    n_blocks = (len(stream) - 1) // block_size
    if n_blocks < 1:
        raise DataError(f"the texts have {len(stream)} tokens, fewer than one block of {block_size} + 1")
    blocks = [stream[i * block_size:(i + 1) * block_size + 1] for i in range(n_blocks)]
    return [Example(b, list(b)) for b in blocks]


# ----------------------------------------------------------------------------- batches

def collate(examples, pad_id=0):
    """Examples -> a right-padded batch of next-token targets.

    input_ids (B, T): tokens[:-1], padded with pad_id (its value never matters: padding comes after
        the real tokens of a causal model, and carries no loss)
    labels (B, T):    labels[1:], the target of each input position, -100 on padding
    lengths (B,):     real (unpadded) input length of each row
    T is the longest input of the batch.
    """
    lengths = [len(e.tokens) - 1 for e in examples]
    T = max(lengths)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, (e, n) in enumerate(zip(examples, lengths)):
        input_ids[i, :n] = torch.tensor(e.tokens[:-1])
        labels[i, :n] = torch.tensor(e.labels[1:])
    return {"input_ids": input_ids, "labels": labels, "lengths": torch.tensor(lengths)}


def n_targets(example):
    """How many tokens of an example carry loss (its first token never does)."""
    return sum(label != IGNORE_INDEX for label in example.labels[1:])
