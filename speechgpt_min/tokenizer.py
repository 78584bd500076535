"""Token ids for text mixed with speech units: one interface over three text backends.

SpeechGPT reads and writes one stream of tokens: ordinary text tokens from a base vocabulary,
plus added tokens appended after it, in exactly this order:

    <0> <1> ... <K-1>                       K speech units (K = 1000 in the released model)
    <sosp> <eosp>                           start / end of speech
    [Human] [SpeechGPT] <eoh> <eos>         dialogue markers

For LLaMA's 32000 text tokens that is <0>..<999> = 32000..32999, <sosp> 33000, <eosp> 33001,
[Human] 33002, [SpeechGPT] 33003, <eoh> 33004, <eos> 33005, vocabulary 33006. `<eoa>`, `[ta]`
and `[ua]` are *not* added tokens: they are ordinary text. Where a checkpoint directory has an
`added_tokens.json` ({token: id}), its ids are the truth.

Base text backends (chosen by `Tokenizer.from_pretrained` from the files present):
    tokenizer.model       SentencePiece (LLaMA, SpeechGPT)       needs `sentencepiece`
    tokenizer.json        Hugging Face `tokenizers` (SmolLM2)     needs `tokenizers`
    word_tokenizer.json   built-in word vocabulary for toy models trained from scratch

Encoding splits the text on added tokens first (longest match: of two added tokens starting at
the same character the longer wins; "<305>" is one token), then encodes each text piece on its own with the backend. For SentencePiece
this is what Hugging Face's slow `LlamaTokenizer` does with `legacy=True` (the behaviour SpeechGPT
was built with): every text piece gets SentencePiece's dummy-prefix space, so the ":" after
"[Human]" is encoded as "▁:". Whitespace next to an added token is kept as text (transformers
before 4.34 stripped it, which loses spaces); that makes decoding the exact inverse:
decode(encode(s)) == s.

    tok = Tokenizer.train(["what is four plus three", "seven"], n_units=100)
    ids = tok.encode("[Human]: hello <sosp><12><7><eosp><eoh>", bos=True)
    tok.decode(ids)                          # "[Human]: hello <sosp><12><7><eosp><eoh>"
    tok.unit_id(12), tok.special_id("<sosp>"), tok.vocab_size
"""
import json
import re
import string
from collections import Counter
from pathlib import Path

from .units import EOSP, SOSP, UNIT_RE, unit_token

SPECIAL_TOKENS = (SOSP, EOSP, "[Human]", "[SpeechGPT]", "<eoh>", "<eos>")
DEFAULT_UNITS = 1000  # the released SpeechGPT's k-means size

SENTENCEPIECE_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
WORD_FILE = "word_tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
ADDED_TOKENS_FILE = "added_tokens.json"


class TokenizerError(ValueError):
    """A tokenizer directory or id table that cannot be used: the message names the problem."""


# ----------------------------------------------------------------------------- text backends
# Each backend encodes plain text (no added tokens in it) to ids below its `vocab_size` and back.

class WordBackend:
    """Built-in word vocabulary with a character fallback, for toy models trained from scratch.

    Text is cut into pieces: a chain-of-modality marker (`[ta]`, `[ua]`, `<eoa>`) or a word, each
    with its leading space if it has one (" hello", "hello"), a punctuation mark with its leading
    space (" ,"), or a single whitespace character. A piece in the vocabulary is one token; any
    other piece is spelled character by character, and a character never seen is <unk>. Every
    word enters the vocabulary in both forms, so a word is whole wherever it starts (the first word
    of a text has no space before it), and the markers are always whole: a small model then learns
    words and markers, not spellings. The pieces concatenate back to the text, so decoding is exact
    whenever no <unk> occurs.
    """

    CONTROL = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0, 1, 2, 3 as in LLaMA (plus a pad)
    MARKERS = ("[ta]", "[ua]", "<eoa>")  # text in the released model; whole tokens in a toy vocabulary
    PIECE_RE = re.compile(r" ?(?:\[ta\]|\[ua\]|<eoa>)| ?\w+| ?[^\w\s]|\s")
    # Always in the vocabulary, so any lowercase/uppercase ASCII text round trips.
    BASE_CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"

    def __init__(self, pieces):
        if list(pieces[:4]) != list(self.CONTROL):
            raise TokenizerError(f"a word vocabulary must start with {self.CONTROL}, got {pieces[:4]}")
        self.pieces = list(pieces)
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        if len(self.ids) != len(self.pieces):
            raise TokenizerError("the word vocabulary has duplicate entries")
        self.vocab_size = len(self.pieces)
        self.unk_id, self.bos_id, self.eos_id, self.pad_id = 0, 1, 2, 3

    @classmethod
    def train(cls, texts, max_words, min_count):
        """Characters of `texts`, the markers, and their `max_words` most frequent words and
        punctuation marks (seen >= min_count times, with or without a space before them), each with
        and without that space (a single character is already in the vocabulary without it)."""
        chars = set(cls.BASE_CHARS)
        counts = Counter()
        for text in texts:
            chars.update(text)
            counts.update(m.group().lstrip(" ") for m in cls.PIECE_RE.finditer(text))
        words = [w for w, c in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))
                 if c >= min_count and w.strip() and w not in cls.MARKERS][:max_words]
        pieces = [p for w in (*cls.MARKERS, *words) for p in (w, " " + w) if p not in chars]
        return cls(list(cls.CONTROL) + sorted(chars) + pieces)

    def encode(self, text):
        ids = []
        for piece in (m.group() for m in self.PIECE_RE.finditer(text)):
            if piece in self.ids:
                ids.append(self.ids[piece])
            else:
                ids.extend(self.ids.get(ch, self.unk_id) for ch in piece)
        return ids

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)

    def piece(self, i):
        return self.pieces[i]

    def added_tokens(self):
        return {}

    def save(self, directory):
        with open(directory / WORD_FILE, "w") as f:
            json.dump({"type": "word", "pieces": self.pieces}, f, ensure_ascii=False, indent=0)

    @classmethod
    def load(cls, path):
        data = json.loads(Path(path).read_text())
        if data.get("type") != "word" or "pieces" not in data:
            raise TokenizerError(f"{path}: not a word tokenizer file (expected type 'word' and 'pieces')")
        return cls(data["pieces"])


class SentencePieceBackend:
    """A SentencePiece `tokenizer.model` (LLaMA, SpeechGPT)."""

    def __init__(self, model_proto):
        import sentencepiece as spm
        self.model_proto = model_proto  # the file's bytes, kept to save it unchanged
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        # LLaMA has no pad piece; SpeechGPT's training code pads with id 0 (<unk>), as Alpaca's does.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()

    def encode(self, text):
        return self.sp.encode(text)  # adds the dummy-prefix "▁" to this piece, like legacy HF

    def decode(self, ids):
        return self.sp.decode(ids)  # drops that dummy-prefix space again

    def piece(self, i):
        return self.sp.id_to_piece(i)

    def added_tokens(self):
        return {}

    def save(self, directory):
        (directory / SENTENCEPIECE_FILE).write_bytes(self.model_proto)

    @classmethod
    def load(cls, path):
        return cls(Path(path).read_bytes())


class HFBackend:
    """A Hugging Face `tokenizers` `tokenizer.json` (SmolLM2), with BOS/EOS/pad names from
    `tokenizer_config.json` when present (tokenizer.json alone does not say which is which)."""

    def __init__(self, tokenizer, bos_token=None, eos_token=None, pad_token=None):
        self.tk = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=False)
        self.names = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        self.bos_id, self.eos_id, pad_id = (self._id_of(t) for t in (bos_token, eos_token, pad_token))
        self.pad_id = pad_id if pad_id is not None else self.eos_id

    def _id_of(self, token):
        if token is None:
            return None
        i = self.tk.token_to_id(token)
        if i is None:
            raise TokenizerError(f"tokenizer.json has no token {token!r} (named in {HF_CONFIG_FILE})")
        return i

    def encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tk.decode(ids, skip_special_tokens=False)

    def piece(self, i):
        return self.tk.id_to_token(i)

    def added_tokens(self):
        """Tokens that tokenizer.json itself appends after the base vocabulary (a saved SpeechGPT tokenizer)."""
        return {t.content: i for i, t in self.tk.get_added_tokens_decoder().items() if i >= self.vocab_size}

    def save(self, directory):
        self.tk.save(str(directory / HF_FILE))
        names = {k: v for k, v in self.names.items() if v is not None}
        (directory / HF_CONFIG_FILE).write_text(json.dumps(names, indent=2) + "\n")

    @classmethod
    def load(cls, path):
        from tokenizers import Tokenizer as HFTokenizer
        path = Path(path)
        config_path = path.parent / HF_CONFIG_FILE
        config = json.loads(config_path.read_text()) if config_path.exists() else {}

        def name(key):  # "<s>" or {"content": "<s>", ...}
            value = config.get(key)
            return value["content"] if isinstance(value, dict) else value

        return cls(HFTokenizer.from_file(str(path)), name("bos_token"), name("eos_token"), name("pad_token"))


# ----------------------------------------------------------------------------- the tokenizer

class Tokenizer:
    """Text backend + SpeechGPT's unit and special tokens.

    backend: a WordBackend, SentencePieceBackend or HFBackend.
    n_units: K, the number of unit tokens <0>..<K-1>. None: as many as `added` has, else 1000.
    added: {token: id} from an added_tokens.json; these ids are kept, and SpeechGPT tokens it
        lacks are appended after the largest id in the standard order.
    """

    def __init__(self, backend, n_units=None, added=None):
        self.backend = backend
        self.added = self._check_added(dict(added or {}), source=ADDED_TOKENS_FILE)
        for token, i in backend.added_tokens().items():
            if self.added.get(token, i) != i:
                raise TokenizerError(f"{token!r} has id {self.added[token]} in {ADDED_TOKENS_FILE} "
                                     f"but id {i} in the tokenizer file")
            self.added[token] = i
        self.added = self._check_added(self.added, source="the added tokens")

        units = sorted(int(UNIT_RE.fullmatch(t).group(1)) for t in self.added if UNIT_RE.fullmatch(t))
        if units:
            if units != list(range(len(units))):
                raise TokenizerError(f"{ADDED_TOKENS_FILE}: unit tokens must be <0>..<K-1>, got {len(units)} "
                                     f"units from <{units[0]}> to <{units[-1]}>")
            if n_units is not None and n_units != len(units):
                raise TokenizerError(f"{ADDED_TOKENS_FILE} has {len(units)} unit tokens but n_units={n_units}")
            n_units = len(units)
        if n_units is None:
            n_units = DEFAULT_UNITS
        if n_units < 1:
            raise TokenizerError(f"n_units must be a positive number of speech units, got {n_units}")

        next_id = max([backend.vocab_size] + [i + 1 for i in self.added.values()])
        for token in [unit_token(u) for u in range(n_units)] + list(SPECIAL_TOKENS):
            if token not in self.added:
                self.added[token] = next_id
                next_id += 1

        self.n_units = n_units
        self.unit_offset = self.added[unit_token(0)]
        for u in range(n_units):
            if self.added[unit_token(u)] != self.unit_offset + u:
                raise TokenizerError(f"{ADDED_TOKENS_FILE}: unit ids must be consecutive, but <{u}> has id "
                                     f"{self.added[unit_token(u)]} and <0> has id {self.unit_offset}")
        self.vocab_size = next_id
        self.id_to_added = {i: t for t, i in self.added.items()}
        # Longest first: at any position the longest added token matches (re tries alternatives in order).
        self.added_re = re.compile("|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)))
        self.bos_id, self.eos_id, self.pad_id = backend.bos_id, backend.eos_id, backend.pad_id

    def _check_added(self, added, source):
        by_id = {}
        for token, i in added.items():
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise TokenizerError(f"{source}: id of {token!r} must be a non-negative integer, got {i!r}")
            if i in by_id:
                raise TokenizerError(f"{source}: {by_id[i]!r} and {token!r} both have id {i}")
            by_id[i] = token
            if i < self.backend.vocab_size and self.backend.piece(i) != token:
                raise TokenizerError(f"{source}: {token!r} has id {i}, which is {self.backend.piece(i)!r} in the "
                                     f"base vocabulary of {self.backend.vocab_size} tokens")
        return added

    # ------------------------------------------------------------------ constructors

    @classmethod
    def train(cls, texts, n_units, max_words=1000, min_count=2):
        """A toy tokenizer: a word vocabulary (WordBackend) from `texts` plus K = n_units units.

        Added tokens in the texts (units, <sosp>, [Human], ...) are not counted as words.
        """
        pattern = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS) + "|" + UNIT_RE.pattern)
        # split() returns the text between matches and, after each, UNIT_RE's group: [::2] keeps the text
        plain = [piece for text in texts for piece in pattern.split(text)[::2] if piece]
        return cls(WordBackend.train(plain, max_words, min_count), n_units=n_units)

    @classmethod
    def from_pretrained(cls, directory, n_units=None):
        """Open a tokenizer directory: tokenizer.model, tokenizer.json or word_tokenizer.json, with
        added_tokens.json when present. n_units: K when the directory has no unit tokens yet
        (default 1000, as released); when it has them, it must match or be None."""
        directory = Path(directory)
        if not directory.is_dir():
            raise TokenizerError(f"{directory}: no such tokenizer directory")
        for name, backend_cls in ((SENTENCEPIECE_FILE, SentencePieceBackend), (HF_FILE, HFBackend),
                                  (WORD_FILE, WordBackend)):
            if (directory / name).exists():
                backend = backend_cls.load(directory / name)
                break
        else:
            raise TokenizerError(f"{directory}: no tokenizer file; expected one of {SENTENCEPIECE_FILE}, "
                                 f"{HF_FILE} or {WORD_FILE}")
        added = {}
        if (directory / ADDED_TOKENS_FILE).exists():
            added = json.loads((directory / ADDED_TOKENS_FILE).read_text())
            if not isinstance(added, dict):
                raise TokenizerError(f"{directory / ADDED_TOKENS_FILE}: expected a {{token: id}} object")
        return cls(backend, n_units=n_units, added=added)

    def save_pretrained(self, directory):
        """Write the backend's file and added_tokens.json (every added token with its id)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(directory)
        table = dict(sorted(self.added.items(), key=lambda kv: kv[1]))
        (directory / ADDED_TOKENS_FILE).write_text(json.dumps(table, ensure_ascii=False) + "\n")

    # ------------------------------------------------------------------ ids

    def unit_id(self, unit):
        """Token id of speech unit `unit` (0 <= unit < n_units)."""
        if not 0 <= unit < self.n_units:
            raise ValueError(f"unit {unit} is out of range: this tokenizer has units 0..{self.n_units - 1}")
        return self.unit_offset + unit

    def is_unit(self, token_id):
        return self.unit_offset <= token_id < self.unit_offset + self.n_units

    def special_id(self, name):
        """Id of an added token by its spelling, e.g. special_id("<sosp>")."""
        if name not in self.added or UNIT_RE.fullmatch(name):
            specials = [t for t in self.added if not UNIT_RE.fullmatch(t)]
            raise KeyError(f"no special token {name!r}; this tokenizer has {specials} (units: use unit_id)")
        return self.added[name]

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text, bos=False, eos=False):
        """Text with units and special tokens -> list of ids (BOS / EOS of the backend if asked)."""
        ids = [self._control("BOS", self.bos_id)] if bos else []
        start = 0
        for match in self.added_re.finditer(text):
            if match.start() > start:
                ids += self.backend.encode(text[start:match.start()])
            ids.append(self.added[match.group()])
            start = match.end()
        if start < len(text):
            ids += self.backend.encode(text[start:])
        if eos:
            ids.append(self._control("EOS", self.eos_id))
        return ids

    def decode(self, ids):
        """Ids -> text. Added tokens are written as spelled; BOS and EOS are dropped (as
        SentencePiece does); each run of text ids between added tokens is decoded by the backend."""
        parts, run = [], []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is out of range for a vocabulary of {self.vocab_size}")
            if i in self.id_to_added:
                if run:
                    parts.append(self.backend.decode(run))
                    run = []
                parts.append(self.id_to_added[i])
            elif i >= self.backend.vocab_size:
                raise ValueError(f"token id {i} is not assigned: it is above the base vocabulary "
                                 f"({self.backend.vocab_size}) and not an added token")
            elif i not in (self.bos_id, self.eos_id):
                run.append(i)
        if run:
            parts.append(self.backend.decode(run))
        return "".join(parts)

    def _control(self, name, token_id):
        if token_id is None:
            raise ValueError(f"this tokenizer has no {name} token (for tokenizer.json, name it in {HF_CONFIG_FILE})")
        return token_id

    def __len__(self):
        return self.vocab_size

    def __repr__(self):
        return (f"Tokenizer({type(self.backend).__name__}, base vocab {self.backend.vocab_size}, "
                f"{self.n_units} units from id {self.unit_offset}, vocab {self.vocab_size})")
