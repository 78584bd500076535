"""What several test files share: the files the tests read, the optional libraries, a tiny run, and
the devices a step computed on.

Files of the repository (tiny_data/, tests/reference/): a missing one fails the tests that read it,
with a message naming it; it is never a reason to skip. Optional libraries (the dev extra's
references: transformers, librosa, peft, sentencepiece): a test that needs one asks for it by name,
`def test_x(transformers): ...`, and is skipped, alone, where it is not installed.
"""
import io
import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN_UNITS = 20  # K of the tiny run


# ----------------------------------------------------------------------------- files of the repository

@pytest.fixture(scope="session")
def tiny_data():
    """The committed corpus directory, tiny_data/."""
    path = ROOT / "tiny_data"
    for name in ("manifest.jsonl", "qa.jsonl", "text_corpus.txt"):
        assert (path / name).is_file(), f"{path / name} is missing: the corpus is part of the repository"
    return path


@pytest.fixture(scope="session")
def unit_hifigan_reference():
    """tests/reference/unit_hifigan: a tiny vocoder in the released format and its golden outputs
    (the README there says how they were made)."""
    path = ROOT / "tests" / "reference" / "unit_hifigan"
    for name in ("g_tiny.pt", "tiny_generator.safetensors", "tiny_config.json", "tiny_expected.safetensors",
                 "km1000_layout.json"):
        assert (path / name).is_file(), f"{path / name} is missing: the reference files are part of the repository"
    return path


# ----------------------------------------------------------------------------- optional libraries

@pytest.fixture(scope="session")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def librosa():
    return pytest.importorskip("librosa")


@pytest.fixture(scope="session")
def peft():
    return pytest.importorskip("peft")


@pytest.fixture(scope="session")
def sentencepiece_model():
    """train(texts, vocab_size, **options) -> the bytes of a tiny SentencePiece tokenizer.model:
    BPE with byte fallback and full character coverage, as LLaMA's; options are the trainer's."""
    spm = pytest.importorskip("sentencepiece")

    def train(texts, vocab_size, **options):
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
                                       model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2,
                                       **options)
        return model.getvalue()
    return train


# ----------------------------------------------------------------------------- a tiny run

class TinyRun(NamedTuple):
    directory: Path  # as train.py writes a run
    lm: torch.nn.Module  # its stage-2 LM with the stage-3 LoRA layers (not merged)
    texts: list  # what its word tokenizer was trained on
    n_units: int


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run directory as train.py writes it, every part tiny and randomly initialised: HuBERT
    (unit layer 2) + k-means, tokenizer, stage-2 LM, stage-3 adapter, mel vocoder, report.json."""
    from speechgpt_min.data import ASR_INSTRUCTIONS, SYSTEM_PROMPT, TTS_INSTRUCTIONS
    from speechgpt_min.hubert import HuBERT, HubertConfig
    from speechgpt_min.lora import LoRAConfig, inject, lora_layers, save_adapter
    from speechgpt_min.mel_vocoder import MelVocoder, MelVocoderConfig
    from speechgpt_min.model import LMConfig, Transformer
    from speechgpt_min.tokenizer import Tokenizer
    from speechgpt_min.units import KMeans
    from speechgpt_min.weights import save_pretrained

    k, texts = TINY_RUN_UNITS, [SYSTEM_PROMPT, *ASR_INSTRUCTIONS, *TTS_INSTRUCTIONS, "what is two plus two",
                                "two plus two is four", "[Human]: [SpeechGPT]: [ta] [ua] <eoa>. This is input:"]
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    HuBERT(HubertConfig(conv_dim=(16,) * 7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                        num_clusters=0)).save_pretrained(run / "hubert")
    (run / "hubert" / "unit_layer.json").write_text(json.dumps({"layer": 2}))
    KMeans(torch.randn(k, 32)).save_pretrained(run / "kmeans")
    tokenizer = Tokenizer.train(texts, n_units=k, min_count=1)
    tokenizer.save_pretrained(run / "tokenizer")
    lm = Transformer(LMConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2, max_seq_len=1024))
    save_pretrained(lm, run / "stage2" / "model", bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    tokenizer.save_pretrained(run / "stage2" / "model")
    lora = LoRAConfig(r=2, alpha=4, dropout=0.0)
    inject(lm, lora)
    for layer in lora_layers(lm).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)  # a non-zero update, so loading it shows
    save_adapter(lm, run / "stage3" / "adapter", lora)
    MelVocoder(MelVocoderConfig(num_embeddings=k, channels=8, encoder_layers=1, decoder_dilations=(1,),
                                dur_hidden_dim=8)).save_pretrained(run / "vocoder")  # the kind train.py trains
    (run / "report.json").write_text("{}\n")
    return TinyRun(run, lm, texts, k)


# ----------------------------------------------------------------------------- devices

@pytest.fixture
def devices_seen():
    """The devices of every module's parameters and tensor inputs at each forward call during the test
    (a set): where a step really computed. On this CPU-only machine {cpu}; empty if nothing ran."""
    seen = set()

    def record(module, args):
        seen.update(t.device for t in (*args, *module.parameters(recurse=False)) if isinstance(t, torch.Tensor))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    yield seen
    handle.remove()


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine without CUDA, even where it has one: asking for "cuda" must fail in one clear line."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
