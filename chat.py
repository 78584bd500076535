"""Talk to SpeechGPT: type a question or the path of an audio file; read and hear the answer.

    python chat.py                                       # interactive, with the run of `python train.py`
    python chat.py --text "what is two plus two"         # one typed question
    python chat.py --wav question.wav                    # one spoken question (any rate, any channels)
    python chat.py --task asr --wav speech.flac          # speech -> text
    python chat.py --task tts --text "the frog sings"    # text -> speech
    python chat.py --run runs/mine                       # another trained run

Released-format weights (converted to an HF HuBERT directory where needed):
    python chat.py --lm SpeechGPT-7B-cm --adapter SpeechGPT-7B-com --hubert mhubert-base-hf \\
        --kmeans mhubert_base_vp_en_es_fr_it3_L11_km1000.bin --vocoder vocoder/g_00500000

The answer streams as it is generated; then its parts are shown: the transcript of the question,
the text answer ([ta]) and the spoken answer ([ua]), written as OUT/answer_NNNN.wav. Every exchange
is appended to OUT/responses.jsonl. In the interactive loop, `quit` (or Ctrl-D) ends, and
`:dialogue`, `:asr`, `:tts` switch the task.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from speechgpt_min.audio import AudioError, load_audio, save_audio
from speechgpt_min.pipeline import PROMPT_FORMATS, TASKS, SpeechGPT

DEFAULT_RUN = Path("runs/toy")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")


class UserError(Exception):
    """A mistake in the command line or the input: shown as one line, without a traceback."""


def one_line(error):
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(message).split())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_argument_group("model (a trained run, or released-format parts)")
    model.add_argument("--run", type=Path, help=f"run directory made by train.py (default: {DEFAULT_RUN})")
    model.add_argument("--lm", type=Path, help="HF LLaMA directory with tokenizer files (e.g. SpeechGPT-7B-cm)")
    model.add_argument("--adapter", type=Path, help="PEFT LoRA adapter directory (e.g. SpeechGPT-7B-com)")
    model.add_argument("--hubert", type=Path, help="HuBERT directory (ours or transformers' HubertModel)")
    model.add_argument("--hubert-layer", type=int, help="HuBERT layer of the units (default: unit_layer.json "
                                                          "in the HuBERT directory, else 11 as released)")
    model.add_argument("--kmeans", type=Path, help="k-means: a directory, or a scikit-learn joblib .bin file")
    model.add_argument("--vocoder", type=Path, help="unit vocoder: directory or checkpoint with config.json beside it")
    model.add_argument("--prompts", choices=sorted(PROMPT_FORMATS),
                       help="prompt format (default: trained for --run, released for --lm)")
    model.add_argument("--device", default="auto",
                       help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps (default: auto)")

    io = p.add_argument_group("input and output")
    io.add_argument("--wav", type=Path, help="one spoken question (or speech for --task asr), then exit")
    io.add_argument("--text", help="one typed question (or text for --task tts), then exit")
    io.add_argument("--task", choices=TASKS, default="dialogue",
                    help="dialogue (answer a question), asr (transcribe), tts (speak) (default: dialogue)")
    io.add_argument("--out", type=Path, default=Path("output"), help="where answers go (default: output/)")

    gen = p.add_argument_group("sampling (defaults as released)")
    gen.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding (default: 0.7)")
    gen.add_argument("--top-p", type=float, default=0.8, help="nucleus sampling mass (default: 0.8)")
    gen.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (default: 50)")
    gen.add_argument("--max-new-tokens", type=int, default=2048, help="answer length limit (default: 2048)")
    gen.add_argument("--seed", type=int, help="random seed for sampling (default: none)")
    args = p.parse_args(argv)

    parts = [name for name in ("adapter", "hubert", "hubert_layer", "kmeans", "vocoder")
             if getattr(args, name) is not None]
    if args.run is not None and args.lm is not None:
        p.error("choose either --run or --lm, not both")
    if parts and args.lm is None:
        p.error(f"--{parts[0].replace('_', '-')} belongs to released-format parts: give --lm too")
    if args.temperature < 0 or args.max_new_tokens < 1 or args.top_k < 1 or not 0 < args.top_p <= 1:
        p.error("need --temperature >= 0, --max-new-tokens >= 1, --top-k >= 1 and 0 < --top-p <= 1")
    return args


def load(args):
    if args.lm is not None:
        print(f"loading {args.lm}" + (f" + {args.adapter}" if args.adapter else ""), file=sys.stderr)
        return SpeechGPT.from_parts(args.lm, args.adapter, args.hubert, args.hubert_layer, args.kmeans, args.vocoder,
                                    prompts=args.prompts or "released", device=args.device)
    run = args.run or DEFAULT_RUN
    if not run.is_dir():
        hint = "make it with `python train.py`" if args.run is None else "check the path, or make a run with `python train.py`"
        raise UserError(f"no trained run at {run}: {hint} (or use released-format weights with --lm ...)")
    print(f"loading {run}", file=sys.stderr)
    # ASR and TTS are stage 2's tasks; stage 3's adapter answers in the chain-of-modality form
    sgpt = SpeechGPT.from_run(run, device=args.device, adapter=args.task == "dialogue")
    if args.prompts is not None:
        sgpt.prompts = PROMPT_FORMATS[args.prompts]
    return sgpt


def exchange(sgpt, args, task, wav=None, text=None):
    """One question and answer: stream it, show its parts, save the speech, log it."""
    units = sgpt.speech_to_units(wav) if wav is not None else None  # audio errors before any output
    print("SpeechGPT: ", end="", flush=True)
    result = sgpt.chat(text=text, units=units, task=task, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                       on_text=lambda piece: print(piece, end="", flush=True))
    print()
    if result.transcript is not None:
        print(f"  transcript:    {result.transcript}")
    if result.text_answer is not None:
        print(f"  text answer:   {result.text_answer}")

    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "responses.jsonl"
    number = 1 + (sum(1 for _ in log.open()) if log.exists() else 0)
    wav_out = None
    if result.waveform is not None:
        wav_out = args.out / f"answer_{number:04d}.wav"
        save_audio(wav_out, result.waveform, result.sample_rate)
        print(f"  speech answer: {len(result.answer_units)} units, "
              f"{len(result.waveform) / result.sample_rate:.2f} s -> {wav_out}")
    elif result.answer_units:
        print(f"  speech answer: {len(result.answer_units)} units (no vocoder loaded: not spoken)")
    if result.response.problems:
        print(f"  note: {'; '.join(result.response.problems)}")
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "input_wav": str(wav) if wav else None,
              "input_text": text, **result.to_dict(), "answer_wav": str(wav_out) if wav_out else None}
    with log.open("a") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return result


def read_line(line):
    """A typed line -> (wav path, None) for an audio file, (None, text) otherwise."""
    line = line.strip().strip("'\"")
    path = Path(line).expanduser()
    if path.suffix.lower() in AUDIO_SUFFIXES or path.is_file():
        return path, None
    return None, line


def interactive(sgpt, args):
    task = args.task
    print(f"Talk to SpeechGPT ({task}): type a question or the path of an audio file; "
          f"`:dialogue`, `:asr`, `:tts` switch the task; `quit` ends.")
    while True:
        try:
            line = input(f"[{task}] you: ")
        except EOFError:
            print()
            return
        if line.strip().lower() in ("quit", "exit"):
            return
        if line.strip() in (f":{t}" for t in TASKS):
            task = line.strip()[1:]
            print(f"task: {task}")
            continue
        if not line.strip():
            print("type a question, the path of an audio file, or quit")
            continue
        wav, text = read_line(line)
        try:
            exchange(sgpt, args, task, wav, text)
        except (ValueError, OSError) as error:  # AudioError, PipelineError, ...: report and go on
            print(f"error: {one_line(error)}")


def main(argv=None):
    args = parse_args(argv)
    if args.text is not None and not args.text.strip():
        raise UserError("--text is empty: type a question")
    if args.wav is not None:
        try:
            load_audio(args.wav)  # a bad file fails now, not after loading the model
        except AudioError as error:
            raise UserError(one_line(error)) from None
    try:
        sgpt = load(args)
    except (ValueError, OSError, KeyError) as error:  # a part is missing, corrupt or does not fit
        raise UserError(one_line(error)) from None
    if args.wav is None and args.text is None:
        interactive(sgpt, args)
        return
    try:
        exchange(sgpt, args, args.task, args.wav, args.text)
    except (ValueError, OSError) as error:
        raise UserError(one_line(error)) from None


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("\ninterrupted")
