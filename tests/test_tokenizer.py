"""Tokenizer: exact round trips over each backend, SpeechGPT's added-token layout, added_tokens.json,
and id agreement with transformers' tokenizers on the same files."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speechgpt_min.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError

K = 100  # toy number of units
CORPUS = [
    "what is four plus three?", "the alchemist rode in front, and the boy followed.",
    "hello world! how are you today?", "try to speak out this sentence, please.",
    "this is input: the quick brown fox jumps over the lazy dog.", "seven; eight - nine (ten)",
] * 20
SPEECHGPT_TOKENS = [f"<{u}>" for u in range(K)] + list(SPECIAL_TOKENS)
MIXED = [
    "[Human]: hello <sosp><12><7><99><eosp><eoh>",
    "[Human]: Try to speak out this sentence, please. This is input: The alchemist rode in front.<eoh> "
    "[SpeechGPT]: <sosp><1><2><3><eosp><eoa>",
    "[Human]: <sosp><5><eosp><eoh>. [SpeechGPT]: what is four plus three; [ta] seven; [ua] <sosp><8><eosp><eoa>.",
    "hello world", "<sosp><0><eosp>", "a<eoh>b", "  two  spaces <eos>", "<100> is not a unit here, <eos> is",
]


def hf_tokenizer_json(path):
    """A tiny byte-level BPE tokenizer.json (GPT-2 / SmolLM2 style) with <|endoftext|> as id 0."""
    tk = pytest.importorskip("tokenizers")
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.save(str(path))


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory, sentencepiece_model):
    """A tiny LLaMA-like SentencePiece model: BPE, byte fallback, no normalization, dummy prefix."""
    d = tmp_path_factory.mktemp("sp")
    (d / "tokenizer.model").write_bytes(sentencepiece_model(
        CORPUS, vocab_size=330, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True))
    return d


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf_tokenizer_json(d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    return d


@pytest.fixture(scope="module")
def tokenizers(sp_dir, hf_dir):
    return {
        "word": Tokenizer.train(CORPUS, n_units=K),
        "sentencepiece": Tokenizer.from_pretrained(sp_dir, n_units=K),
        "hf": Tokenizer.from_pretrained(hf_dir, n_units=K),
    }


# ----------------------------------------------------------------------------- round trips

def mixed_text(alphabet):
    """Strings of text pieces interleaved with units and SpeechGPT's special tokens."""
    text = st.text(alphabet=alphabet, max_size=12)
    token = st.sampled_from(SPEECHGPT_TOKENS)
    return st.lists(st.one_of(text, token), max_size=10).map("".join)


SIMPLE = "abcdefghijklmnopqrstuvwxyz .,!?;:'-<>[]0123456789"
ANY = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\u2581") | st.sampled_from("\n\t")


@pytest.mark.parametrize("text", MIXED)
@pytest.mark.parametrize("backend", ["word", "sentencepiece", "hf"])
def test_round_trip_examples(tokenizers, backend, text):
    tok = tokenizers[backend]
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text


@pytest.mark.parametrize("backend", ["word", "sentencepiece", "hf"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=mixed_text(SIMPLE))
def test_round_trip_simple_text(tokenizers, backend, text):
    tok = tokenizers[backend]
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("backend", ["sentencepiece", "hf"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=mixed_text(ANY))
def test_round_trip_any_unicode(tokenizers, backend, text):
    """Byte fallback (SentencePiece) and byte-level BPE (HF) spell any character exactly."""
    tok = tokenizers[backend]
    assert tok.decode(tok.encode(text)) == text


def test_added_tokens_are_atomic(tokenizers):
    for tok in tokenizers.values():
        ids = tok.encode("<sosp><12><7><305><eosp><eoh><eos>")
        base = tok.backend.vocab_size
        assert ids[:3] == [base + K, base + 12, base + 7]  # <sosp>, <12>, <7>
        assert ids[-3:] == [base + K + 1, base + K + 4, base + K + 5]  # <eosp>, <eoh>, <eos> (longest match)
        assert all(i < base for i in ids[3:-3])  # "<305>" is text when K = 100
        assert tok.decode(ids[3:-3]) == "<305>"
        for plain in ("<eoa>", "[ta]", "[ua]"):  # ordinary text, as in the released model
            assert all(i < base for i in tok.encode(plain))


def test_word_tokenizer_words_and_unknowns():
    tok = Tokenizer.train(CORPUS, n_units=K)
    assert len(tok.encode("the boy followed")) == 3  # "the", " boy", " followed" are words
    assert tok.encode("é") == [tok.backend.unk_id]
    assert tok.decode(tok.encode("zebra")) == "zebra"  # unseen word: spelled by characters


def test_word_tokenizer_keeps_words_and_markers_whole():
    """A word is one token wherever it starts, the first of a text included, and the chain-of-modality
    markers are one token each: what a small model must learn is words, not spellings."""
    tok = Tokenizer.train(["the cow says moo", "what does the cow say"] * 2, n_units=K)
    response = "what does the cow say; [ta] the cow says moo; [ua] <sosp><1><2><eosp><eoa>."
    pieces = [tok.decode([i]) for i in tok.encode(response)]
    assert pieces == ["what", " does", " the", " cow", " say", ";", " [ta]", " the", " cow", " says", " moo", ";",
                      " [ua]", " ", "<sosp>", "<1>", "<2>", "<eosp>", "<eoa>", "."]
    assert [tok.decode([i]) for i in tok.encode("moo cow")] == ["moo", " cow"]  # first words: whole too
    assert all(i < tok.backend.vocab_size for i in tok.encode("[ta][ua]<eoa>"))  # text tokens, not added ones


# ----------------------------------------------------------------------------- layout

class FakeLlamaBackend:
    """Stands in for LLaMA's 32000-piece SentencePiece model (only sizes and ids matter here)."""
    vocab_size, bos_id, eos_id, pad_id = 32000, 1, 2, 0

    def piece(self, i):
        return f"piece{i}"

    def added_tokens(self):
        return {}


def test_speechgpt_layout_on_llama_base():
    tok = Tokenizer(FakeLlamaBackend(), n_units=1000)
    assert tok.vocab_size == 33006
    assert [tok.unit_id(u) for u in (0, 1, 999)] == [32000, 32001, 32999]
    assert tok.unit_offset == 32000 and tok.n_units == 1000
    assert [tok.special_id(t) for t in SPECIAL_TOKENS] == list(range(33000, 33006))
    assert tok.is_unit(32000) and tok.is_unit(32999) and not tok.is_unit(33000) and not tok.is_unit(31999)


@pytest.mark.parametrize("backend", ["word", "sentencepiece", "hf"])
def test_layout_follows_base(tokenizers, backend):
    tok = tokenizers[backend]
    base = tok.backend.vocab_size
    assert [tok.added[t] for t in SPEECHGPT_TOKENS] == list(range(base, base + K + 6))
    assert tok.vocab_size == len(tok) == base + K + 6


def test_errors_name_the_problem(tokenizers, tmp_path):
    tok = tokenizers["word"]
    with pytest.raises(KeyError, match="<eoa>"):
        tok.special_id("<eoa>")
    with pytest.raises(ValueError, match="unit 100"):
        tok.unit_id(100)
    with pytest.raises(ValueError, match="token id 999999"):
        tok.decode([999999])
    with pytest.raises(TokenizerError, match="no tokenizer file"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(TokenizerError, match="no such tokenizer directory"):
        Tokenizer.from_pretrained(tmp_path / "missing")


# ----------------------------------------------------------------------------- files

@pytest.mark.parametrize("backend", ["word", "sentencepiece", "hf"])
def test_save_and_load(tokenizers, backend, tmp_path):
    tok = tokenizers[backend]
    tok.save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path)  # n_units comes from added_tokens.json
    assert type(loaded.backend) is type(tok.backend)
    assert (loaded.n_units, loaded.vocab_size, loaded.bos_id, loaded.eos_id) == (K, tok.vocab_size, tok.bos_id, tok.eos_id)
    for text in MIXED:
        assert loaded.encode(text, bos=True) == tok.encode(text, bos=True)


def test_added_tokens_json_is_the_truth(sp_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    # A non-standard table: a pad token first, the specials before the units, and only 50 units.
    table = {"<pad>": 330, "<pad>_long": 337}
    table.update({t: 331 + i for i, t in enumerate(SPECIAL_TOKENS)})
    table.update({f"<{u}>": 400 + u for u in range(50)})
    (tmp_path / "added_tokens.json").write_text(json.dumps(table))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.n_units == 50 and tok.unit_offset == 400 and tok.vocab_size == 450
    assert tok.encode("<pad><sosp><49><eosp><eos>") == [330, 331, 449, 332, 336]
    assert tok.decode([330, 331, 449]) == "<pad><sosp><49>"
    assert tok.encode("<pad>_long<pad>_lon") == [337, 330] + tok.backend.encode("_lon")  # longest match
    with pytest.raises(ValueError, match="not assigned"):
        tok.decode([380])


def test_added_tokens_json_missing_specials_are_appended(sp_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    (tmp_path / "added_tokens.json").write_text(json.dumps({f"<{u}>": 330 + u for u in range(10)}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert [tok.special_id(t) for t in SPECIAL_TOKENS] == list(range(340, 346))


@pytest.mark.parametrize("table, n_units, message", [
    ({"<0>": 330, "<1>": 330}, None, "both have id 330"),
    ({"<0>": 5}, None, "has id 5, which is"),
    ({"<0>": 330, "<2>": 332}, None, "must be <0>..<K-1>"),
    ({"<0>": 330, "<1>": 335}, None, "must be consecutive"),
    ({"<0>": 330, "<1>": 331}, 100, "has 2 unit tokens but n_units=100"),
    ({"<0>": -1}, None, "non-negative integer"),
])
def test_conflicting_added_tokens_json(sp_dir, tmp_path, table, n_units, message):
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    (tmp_path / "added_tokens.json").write_text(json.dumps(table))
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_pretrained(tmp_path, n_units=n_units)


# ----------------------------------------------------------------------------- agreement with transformers

def hf_slow_llama_tokenizer(sp_dir):
    """transformers' slow, legacy SentencePiece LLaMA tokenizer (the one SpeechGPT was built with)."""
    try:  # transformers 5.x
        from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
        return SentencePieceBackend(vocab_file=str(sp_dir / "tokenizer.model"), legacy=True,
                                    unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    except ImportError:  # transformers 4.x
        from transformers import LlamaTokenizer
        return LlamaTokenizer(vocab_file=str(sp_dir / "tokenizer.model"), legacy=True)


def test_matches_transformers_slow_llama_tokenizer(tokenizers, sp_dir, transformers):
    ref = hf_slow_llama_tokenizer(sp_dir)
    ref.add_tokens(SPEECHGPT_TOKENS)
    tok = tokenizers["sentencepiece"]
    for t in SPEECHGPT_TOKENS:
        assert ref.convert_tokens_to_ids(t) == tok.added[t]
    for text in MIXED:  # every text piece gets the dummy-prefix space, whitespace kept
        assert ref(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_matches_transformers_fast_llama_tokenizer(tokenizers, sp_dir, transformers):
    """The fast LlamaTokenizer converted from tokenizer.model: no dummy prefix after an added token,
    so compare texts whose text pieces all start the string or follow nothing special."""
    pytest.importorskip("google.protobuf")  # needed to convert tokenizer.model
    ref = transformers.LlamaTokenizer.from_pretrained(sp_dir)
    ref.add_tokens(SPEECHGPT_TOKENS)
    tok = tokenizers["sentencepiece"]
    for text in ["hello world", "<sosp><12><7><99><eosp>", "what is four plus three<eoh>",
                 "the boy<sosp><1><eosp><eoh>[SpeechGPT]<eos>", "[Human]<sosp><3><eosp>"]:
        assert [ref.bos_token_id] + ref(text, add_special_tokens=False)["input_ids"] == tok.encode(text, bos=True)


def test_matches_transformers_fast_tokenizer(tokenizers, hf_dir, tmp_path, transformers):
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    ref.add_tokens(SPEECHGPT_TOKENS)
    tok = tokenizers["hf"]
    for text in MIXED:
        assert ref(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    # A tokenizer.json saved by transformers with the added tokens in it opens with the same ids.
    ref.save_pretrained(tmp_path)
    (tmp_path / "added_tokens.json").unlink(missing_ok=True)
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.added == tok.added
    for text in MIXED:
        assert loaded.encode(text) == tok.encode(text)
