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
    sgpt.chat_batch([dict(units=[5, 9]), dict(units=[7])], task="asr")  # greedy, many at once (evaluation)

A model trained here is prompted with exactly its training prefix (prompts="trained"); the released
weights with the released inference template (prompts="released", the default of `from_parts`).
Sampling defaults are the released ones (temperature 0.7, top_p 0.8, top_k 50); temperature=0 is
greedy decoding, which the evaluation (evaluate.py) uses.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .audio import SAMPLE_RATE, load_audio
from .data import (ASR_INSTRUCTIONS, CHAIN_TEMPLATE, END_OF_ANSWER, INFERENCE_TEMPLATE, INSTRUCTION_TEMPLATE,
                   SYSTEM_PROMPT, TTS_INSTRUCTIONS, encode_prompt)
from .device import resolve_device
from .hubert import HuBERT
from .lora import load_adapter, merge_and_unload
from .phones import PhoneRecognizer
from .tokenizer import HF_FILE, SENTENCEPIECE_FILE, WORD_FILE, Tokenizer
from .units import EOSP, SOSP, UNIT_RE, KMeans, dedup, parse_units, speech_text, speech_to_deduped_units
from .mel_vocoder import load_vocoder
from .model import left_pad
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


def _clean(text):
    """Strip a field of its separators: "seven; " -> "seven"; empty -> None."""
    text = text.strip().removesuffix(";").strip()
    return text or None


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
        units = parse_units(speech, n_units, strict=False, problems=problems)
    elif SOSP in body:
        at = body.index(SOSP)
        body, speech = body[:at], body[at:]
        units = parse_units(speech, n_units, strict=False, problems=problems)
        if "[ta]" in body:
            problems.append("speech answer without [ua]")
    elif EOSP in body or UNIT_RE.search(body):
        problems.append("unit ids outside <sosp>...<eosp>: ignored")

    transcript, answer = None, None
    if "[ta]" in body:
        before, _, after = body.partition("[ta]")
        transcript, answer = _clean(before), _clean(after)
    else:
        answer = _clean(body)
    return Response(text, transcript, answer, units, problems)


class _ResponseSoFar:
    """A response as it is generated, token by token: its tokens, its text, and whether it has ended."""

    def __init__(self, tokenizer, stop_ids, stop_at=None):
        self.tokenizer, self.stop_ids, self.stop_at = tokenizer, stop_ids, stop_at
        self.tokens, self.text, self.done = [], "", False

    def add(self, token):
        """Take the next token, or end before it (returning False) at a stop id or an id the
        tokenizer does not assign. At "<eoa>" or stop_at the response ends, its text cut just after."""
        if token in self.stop_ids:
            self.done = True
            return False
        try:  # the whole text again: pieces join with the right spaces
            text = self.tokenizer.decode(self.tokens + [token])
        except ValueError:  # an id the tokenizer does not assign (a padded embedding row): end here
            self.done = True
            return False
        self.tokens.append(token)
        for end in (END_OF_ANSWER, self.stop_at):
            if end is not None and end in text:  # cut there: a token may run past it
                text, self.done = text[:text.index(end) + len(end)], True
                break
        self.text = text
        return True


# ----------------------------------------------------------------------------- prompts

@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes the human turn. chain: "{question}"; instruction: "{instruction}", "{input}"."""
    chain: str
    instruction: str


PROMPT_FORMATS = {
    # exactly the training prefixes of data.py: what a model trained here has seen
    "trained": PromptFormat(CHAIN_TEMPLATE, INSTRUCTION_TEMPLATE),
    # the released inference script: one template, the instruction typed into the question
    "released": PromptFormat(INFERENCE_TEMPLATE,
                             INFERENCE_TEMPLATE.format(question="{instruction} This is input: {input}")),
}


def prompt_format(name):
    if name not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {name!r}; valid: {', '.join(PROMPT_FORMATS)}")
    return PROMPT_FORMATS[name]


@dataclass
class ChatResult:
    """One exchange. transcript: of spoken input (dialogue) or the recognised text (ASR)."""
    task: str
    prompt: str
    response: Response                  # the generated text and everything parsed from it
    question_units: list[int] | None    # the input speech as units, if speech came in
    transcript: str | None
    text_answer: str | None
    answer_units: list[int]
    waveform: torch.Tensor | None       # (T,) float32 at sample_rate, None without vocoder or units
    sample_rate: int = SAMPLE_RATE

    def to_dict(self):
        """JSON-ready (no waveform)."""
        return {"task": self.task, "prompt": self.prompt, "response": self.response.text,
                "question_units": self.question_units, "transcript": self.transcript,
                "text_answer": self.text_answer, "answer_units": self.answer_units,
                "complete": self.response.complete, "problems": self.response.problems}


# ----------------------------------------------------------------------------- the pipeline

class SpeechGPT:
    """LM + tokenizer, with the optional ears (HuBERT + k-means, or the toy's phone recogniser) and
    voice (a unit vocoder of either kind: UnitVocoder or MelVocoder, both `vocoder(units (B, N)) -> (B, samples)`
    at 16 kHz)."""

    def __init__(self, lm, tokenizer, encoder=None, layer=None, kmeans=None, vocoder=None, prompts="trained",
                 system_prompt=SYSTEM_PROMPT, phones=None):
        if lm.config.vocab_size < tokenizer.vocab_size:
            raise PipelineError(f"the LM has {lm.config.vocab_size} token embeddings but the tokenizer "
                                f"{tokenizer.vocab_size} tokens")
        if (encoder is None) != (kmeans is None):
            raise PipelineError("speech input needs both the HuBERT encoder and its k-means")
        if phones is not None and (encoder is not None or phones.n_units != tokenizer.n_units):
            raise PipelineError(f"a phone recogniser hears alone, with as many phones ({phones.n_units}) as the "
                                f"tokenizer has units ({tokenizer.n_units})")
        if kmeans is not None:
            if kmeans.n_clusters != tokenizer.n_units:
                raise PipelineError(f"the k-means has {kmeans.n_clusters} clusters but the tokenizer "
                                    f"{tokenizer.n_units} unit tokens")
            if kmeans.centroids.shape[1] != encoder.config.hidden_size:
                raise PipelineError(f"the k-means centroids have {kmeans.centroids.shape[1]} dimensions, the "
                                    f"HuBERT features {encoder.config.hidden_size}")
        if vocoder is not None and vocoder.config.num_embeddings != tokenizer.n_units:
            raise PipelineError(f"the vocoder speaks {vocoder.config.num_embeddings} units but the tokenizer "
                                f"has {tokenizer.n_units}")
        self.lm, self.tokenizer = lm.eval(), tokenizer
        self.encoder, self.layer, self.kmeans, self.vocoder, self.phones = encoder, layer, kmeans, vocoder, phones
        self.prompts = prompt_format(prompts) if isinstance(prompts, str) else prompts
        self.system_prompt = system_prompt
        self.device = lm.embed_tokens.weight.device
        # generation ends at the tokenizer's EOS (</s>) or SpeechGPT's <eos> token (or text "<eoa>")
        self.stop_ids = {i for i in (tokenizer.eos_id, tokenizer.added.get("<eos>")) if i is not None}

    # ------------------------------------------------------------------------- loading

    @classmethod
    def from_parts(cls, lm_dir, adapter_dir=None, hubert_dir=None, hubert_layer=None, kmeans_path=None,
                   vocoder_path=None, tokenizer_dir=None, prompts="released", dtype=torch.float32, device="auto",
                   phones_dir=None):
        """Assemble from separate checkpoints (the released artifacts, or a run's parts).

        lm_dir: HF LLaMA directory (config.json, safetensors or pytorch_model.bin; tokenizer files
            with added_tokens.json unless tokenizer_dir is given).
        adapter_dir: PEFT LoRA adapter, merged into the LM. hubert_dir: our or an HF HuBERT directory;
        hubert_layer: its unit layer (None: unit_layer.json in hubert_dir, else 11 as released).
        kmeans_path: a k-means directory (KMeans.save_pretrained) or a scikit-learn joblib file.
        vocoder_path: a vocoder directory or checkpoint file with config.json beside it, of either kind
            (the released unit HiFi-GAN, or the toy's mel vocoder; mel_vocoder.load_vocoder).
        phones_dir: a PhoneRecognizer directory (the toy's ears; instead of hubert_dir and kmeans_path).
        """
        device = resolve_device(device)
        try:
            lm = load_pretrained(lm_dir, dtype=dtype, device=device)
        except KeyError as error:  # a config.json without LLaMA's fields
            raise PipelineError(f"{lm_dir}: config.json has no {error.args[0]!r}: not a LLaMA checkpoint") from None
        if adapter_dir is not None:
            load_adapter(lm, adapter_dir)
            merge_and_unload(lm)  # inference: fold the update into the weights
        tokenizer = Tokenizer.from_pretrained(tokenizer_dir or lm_dir)
        encoder = kmeans = None
        if hubert_dir is not None:
            encoder = HuBERT.from_pretrained(hubert_dir).to(device)
            if hubert_layer is None:
                layer_file = Path(hubert_dir) / "unit_layer.json"
                hubert_layer = json.loads(layer_file.read_text())["layer"] if layer_file.exists() else RELEASED_UNIT_LAYER
            if not 0 <= hubert_layer <= encoder.config.num_hidden_layers:
                raise PipelineError(f"HuBERT layer {hubert_layer} does not exist: {hubert_dir} has layers "
                                    f"0..{encoder.config.num_hidden_layers}")
        if kmeans_path is not None:
            kmeans_path = Path(kmeans_path)
            kmeans = (KMeans.from_pretrained(kmeans_path) if kmeans_path.is_dir() else KMeans.from_joblib(kmeans_path))
        vocoder = None
        if vocoder_path is not None:
            vocoder = load_vocoder(vocoder_path).to(device)
        phones = PhoneRecognizer.from_pretrained(phones_dir).to(device) if phones_dir is not None else None
        return cls(lm, tokenizer, encoder, hubert_layer, kmeans, vocoder, prompts, phones=phones)

    @classmethod
    def from_run(cls, run_dir, device="auto", adapter=True):
        """Assemble a run made by train.py: stage2/model (+ stage3/adapter), phones/ or hubert/ + kmeans/, vocoder/.

        adapter=False leaves stage 3's LoRA out: the stage-2 model, the one trained for ASR and TTS
        (stage 3 trains the chain of modality only, and its adapter answers every prompt in that form)."""
        run = Path(run_dir)
        if not run.is_dir():
            raise PipelineError(f"{run}: no such run directory (make one with `python train.py`)")
        lm_dir = run / "stage2" / "model"
        if not (lm_dir / "config.json").is_file():
            raise PipelineError(f"{run}: no trained language model in stage2/model (run `python train.py` "
                                f"to the end of stage 2)")
        has_tokenizer = any((lm_dir / name).exists() for name in (SENTENCEPIECE_FILE, HF_FILE, WORD_FILE))
        adapter = run / "stage3" / "adapter" if adapter else None
        hubert, kmeans, vocoder, phones = run / "hubert", run / "kmeans", run / "vocoder", run / "phones"
        hears_phones = phones.is_dir()  # the units step made a phone recogniser, or a HuBERT and its k-means
        return cls.from_parts(lm_dir, adapter if adapter is not None and adapter.is_dir() else None,
                              hubert if hubert.is_dir() and not hears_phones else None, None,
                              kmeans if kmeans.is_dir() and not hears_phones else None,
                              vocoder if (vocoder / "config.json").is_file() else None,
                              tokenizer_dir=None if has_tokenizer else run / "tokenizer", prompts="trained",
                              device=device, phones_dir=phones if hears_phones else None)

    # ------------------------------------------------------------------------- the parts

    def speech_to_units(self, wav, sr=SAMPLE_RATE):
        """Speech -> deduplicated unit ids. wav: a file path, or samples (T,) / (T, channels) at `sr`."""
        if self.encoder is None and self.phones is None:
            raise PipelineError("this SpeechGPT has no ears: load a HuBERT encoder and its k-means (or a phone "
                                "recogniser) to hear speech")
        wav = load_audio(wav) if isinstance(wav, (str, Path)) else load_audio(wav, sr=sr)
        if self.phones is not None:
            units, _ = dedup(self.phones.units(wav))
        else:
            units, _ = speech_to_deduped_units([wav], self.encoder, self.layer, self.kmeans)[0]
        if len(units) == 0:
            raise PipelineError("the audio is too short to give a single speech unit (25 ms at least)")
        return units.tolist()

    @torch.inference_mode()
    def units_to_speech(self, units):
        """Unit ids (N,) -> waveform (T,) float32 at 16 kHz, or None without vocoder or units."""
        if self.vocoder is None or len(units) == 0:
            return None
        units = torch.tensor([units], dtype=torch.long, device=self.device)  # (1, N)
        return self.vocoder(units)[0].float().cpu()  # (N * durations * 320,)

    def prompt(self, task, question_units=None, text=None):
        """The full prompt text (system prompt + human turn) for a task and its input."""
        if task not in TASKS:
            raise PipelineError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
        speech = speech_text(question_units) if question_units is not None else None
        if task == "dialogue":
            if (speech is None) == (text is None):
                raise PipelineError("a dialogue turn is either speech or text, give exactly one")
            turn = self.prompts.chain.format(question=speech or text)
        elif task == "asr":
            if speech is None or text is not None:
                raise PipelineError("ASR takes speech input only")
            turn = self.prompts.instruction.format(instruction=ASR_INSTRUCTIONS[0], input=speech)
        else:
            if text is None or speech is not None:
                raise PipelineError("TTS takes text input only")
            turn = self.prompts.instruction.format(instruction=TTS_INSTRUCTIONS[0], input=text)
        return self.system_prompt + turn

    @torch.inference_mode()
    def generate(self, prompt_text, max_new_tokens=2048, temperature=0.7, top_p=0.8, top_k=50, seed=None,
                 on_text=None, stop_at=None):
        """Continue prompt_text; returns the new text, ending with "<eoa>" when the model finished.

        Stops at "<eoa>" in the text (it is ordinary text, not a token), at EOS or <eos>, at
        max_new_tokens, at the end of the model's context, or, if given, once the text `stop_at`
        appears (e.g. "[ua]": the text answer is all an evaluation needs). on_text(str) receives each
        new piece of text as it is generated (for streaming). temperature 0: greedy.
        """
        ids = encode_prompt(self.tokenizer, prompt_text)
        room = self.lm.config.max_seq_len - len(ids)
        if room < 1:
            raise PipelineError(f"the prompt has {len(ids)} tokens, the model's context only "
                                f"{self.lm.config.max_seq_len}: use a shorter input")
        x = torch.tensor([ids], device=self.device)  # (1, T)
        response, shown = _ResponseSoFar(self.tokenizer, self.stop_ids, stop_at), 0
        for token in self.lm.stream(x, min(max_new_tokens, room), temperature, top_k, top_p,
                                    stop_ids=self.stop_ids, generator=seed if temperature > 0 else None):
            if not response.add(int(token[0])):
                break
            if on_text is not None:
                text = response.text
                ready = text if response.done else text.rstrip("\ufffd")  # hold back a half-decoded character
                if len(ready) > shown:
                    on_text(ready[shown:])
                    shown = len(ready)
            if response.done:
                break
        return response.text

    @torch.inference_mode()
    def generate_batch(self, prompt_texts, max_new_tokens=2048, stop_at=None):
        """Greedy `generate` of many prompts together: the texts of
        [generate(p, max_new_tokens, temperature=0, stop_at=stop_at) for p in prompt_texts], from one
        model call per token for the whole batch instead of one per prompt. (Up to float rounding:
        batched, a near tie between two tokens could break the other way.)

        The prompts are left-padded to the longest (model.left_pad), each response ends as in
        `generate`, and the batch when they all have. The batch's cache holds the longest prompt plus
        max_new_tokens positions, so a prompt without that much room in the model's context goes
        alone, where the context cuts its response as `generate` does.
        """
        prompts = [encode_prompt(self.tokenizer, text) for text in prompt_texts]
        fits = [len(ids) + max_new_tokens <= self.lm.config.max_seq_len for ids in prompts]
        batch = [ids for ids, fit in zip(prompts, fits) if fit]
        responses = [_ResponseSoFar(self.tokenizer, self.stop_ids, stop_at) for _ in batch]
        if batch:
            x, pad_mask = left_pad(batch, device=self.device)  # each (B, T)
            for tokens in self.lm.stream(x, max_new_tokens, temperature=0, stop_ids=self.stop_ids,
                                         pad_mask=pad_mask):  # tokens: (B,)
                for response, token in zip(responses, tokens.tolist()):
                    if not response.done:
                        response.add(token)
                if all(response.done for response in responses):
                    break
        batched = iter(responses)  # in the order of the prompts that fit; the others generate alone
        return [next(batched).text if fit else self.generate(text, max_new_tokens, temperature=0, stop_at=stop_at)
                for text, fit in zip(prompt_texts, fits)]

    def chat(self, wav=None, text=None, units=None, task="dialogue", max_new_tokens=2048, temperature=0.7, top_p=0.8,
             top_k=50, seed=None, on_text=None, speak=True, stop_at=None):
        """One exchange. Speech comes in as `wav` (path or 16 kHz samples) or as `units`; text as `text`.

        task: "dialogue" (speech or text question -> chain of modality answer), "asr" (speech ->
        text), "tts" (text -> speech). speak=False skips the vocoder (waveform None); stop_at ends
        the response early where that text appears (see `generate`).
        """
        question_units = self._question_units(wav, text, units)
        prompt = self.prompt(task, question_units, text)
        generated = self.generate(prompt, max_new_tokens, temperature, top_p, top_k, seed, on_text, stop_at)
        return self._chat_result(task, prompt, question_units, generated, speak)

    def chat_batch(self, inputs, task="dialogue", max_new_tokens=2048, stop_at=None):
        """Greedy `chat` of many inputs at once, for evaluation: the ChatResults of
        [chat(**given, task=task, max_new_tokens=max_new_tokens, temperature=0, speak=False, stop_at=stop_at)
         for given in inputs], generated together (generate_batch). inputs: dicts of chat's input
        arguments, e.g. dict(units=[5, 9]) or dict(text="what is two plus two")."""
        inputs = list(inputs)
        questions = [self._question_units(**given) for given in inputs]
        prompts = [self.prompt(task, units, given.get("text")) for units, given in zip(questions, inputs)]
        generated = self.generate_batch(prompts, max_new_tokens, stop_at)
        return [self._chat_result(task, prompt, units, text, speak=False)
                for prompt, units, text in zip(prompts, questions, generated)]

    def _question_units(self, wav=None, text=None, units=None):
        """chat's inputs checked; the speech (wav or units) as a list of unit ids, None without speech."""
        if wav is not None and units is not None:
            raise PipelineError("give the speech either as wav or as units, not both")
        if text is not None and not text.strip():
            raise PipelineError("the text input is empty")
        question_units = self.speech_to_units(wav) if wav is not None else units
        if question_units is not None:
            question_units = [int(u) for u in question_units]
            if not question_units or not all(0 <= u < self.tokenizer.n_units for u in question_units):
                raise PipelineError(f"speech units must be a non-empty list of ids in 0..{self.tokenizer.n_units - 1}")
        return question_units

    def _chat_result(self, task, prompt, question_units, generated, speak):
        """The ChatResult of a generated response: parsed, and spoken if asked."""
        response = parse_response(generated, self.tokenizer.n_units)
        transcript = response.text_answer if task == "asr" else response.transcript
        text_answer = response.text_answer if task == "dialogue" else None
        units_out = response.answer_units if task != "asr" else []
        waveform = self.units_to_speech(units_out) if speak else None
        return ChatResult(task, prompt, response, question_units, transcript, text_answer, units_out, waveform)
