"""Discrete speech units: k-means over encoder frames, repeats merged, spelled as SpeechGPT spells them.

    features (T, D) ──KMeans.assign──> unit ids (T,) at 50 Hz ──dedup──> units, durations
    units ──speech_text──> "<sosp><12><7><305><eosp>"      (and parse_units back, strict or tolerant)

This module owns that spelling: `UNIT_RE` (one unit token), `unit_token`, `speech_text` and
`parse_units`; the tokenizer, the training data and the pipeline's response parser all use them.

How good are units? `unit_quality` scores them against phone alignments: PNMI = I(phone; unit) /
H(phone), the share of phone information the units keep (1 = units determine the phone).
"""
import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .audio import read_packed
from .hubert import extract_features

FORMAT = "speechgpt_min.kmeans"
SOSP, EOSP = "<sosp>", "<eosp>"


class UnitError(ValueError):
    """A malformed unit string: the message says what is wrong and where."""


# ----------------------------------------------------------------------------- k-means

class KMeans(torch.nn.Module):
    """A fitted k-means quantiser: centroids (K, D); `assign` maps frames to the nearest one."""

    def __init__(self, centroids):
        super().__init__()
        self.register_buffer("centroids", torch.as_tensor(centroids, dtype=torch.float32))

    @property
    def n_clusters(self):
        return self.centroids.shape[0]

    @torch.no_grad()
    def assign(self, features, batch_size=65536):
        """features (N, D) -> (N,) long ids of the nearest centroid (squared Euclidean distance,
        ||x||^2 - 2 x.c + ||c||^2 by matmul; ||x||^2 is the same for every centroid, so dropped)."""
        features = torch.as_tensor(features, dtype=torch.float32)
        if features.ndim != 2 or features.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"features of shape {tuple(features.shape)}; expected (N, {self.centroids.shape[1]})")
        c = self.centroids.to(features.device)
        c_sq = (c * c).sum(1)  # (K,)
        ids = [(c_sq - 2 * chunk @ c.T).argmin(1) for chunk in features.split(batch_size)]  # (n, K) -> (n,)
        return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long, device=features.device)

    def save_pretrained(self, directory):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(
            {"format": FORMAT, "n_clusters": self.n_clusters, "dim": self.centroids.shape[1]}, indent=2))
        save_file({"centroids": self.centroids.contiguous()}, str(directory / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory):
        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory}: no {name} (expected a k-means directory)")
        config = json.loads((directory / "config.json").read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"{directory}: config.json is not a {FORMAT} file")
        tensors = load_file(str(directory / "model.safetensors"))
        if set(tensors) != {"centroids"}:
            raise KeyError(f"{directory}: expected the single tensor 'centroids', found {sorted(tensors)}")
        centroids = tensors["centroids"]
        if tuple(centroids.shape) != (config["n_clusters"], config["dim"]):
            raise ValueError(f"{directory}: centroids {tuple(centroids.shape)}, config says "
                             f"({config['n_clusters']}, {config['dim']})")
        return cls(centroids)

    @classmethod
    def from_joblib(cls, path):
        """Read a scikit-learn k-means saved with joblib, e.g. SpeechGPT's
        `mhubert_base_vp_en_es_fr_it3_L11_km1000.bin`; only `cluster_centers_` is used.

        Warning: a joblib file is a pickle, and unpickling runs code the file chooses. Open only
        files from sources you trust; convert once with `save_pretrained` and share that instead.
        """
        import joblib  # installed with scikit-learn

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such k-means file")
        model = joblib.load(path)
        if not hasattr(model, "cluster_centers_"):
            raise ValueError(f"{path}: holds a {type(model).__name__}, not a fitted scikit-learn k-means")
        return cls(np.asarray(model.cluster_centers_, dtype=np.float32))


def fit_kmeans(features, n_clusters, seed=0, max_frames=50_000, batch_size=4096, max_iter=30, n_init=1):
    """Fit k-means with scikit-learn's MiniBatchKMeans (HuBERT's recipe), seeded, on at most
    `max_frames` frames drawn at random (HuBERT fits on a 10% subset too).
    features: (N, D) array or tensor, or a list of (T_i, D) -> KMeans."""
    from sklearn.cluster import MiniBatchKMeans

    if isinstance(features, (list, tuple)):
        features = torch.cat([torch.as_tensor(f) for f in features])
    features = np.asarray(features, dtype=np.float32)
    if max_frames is not None and len(features) > max_frames:
        features = features[np.random.default_rng(seed).choice(len(features), max_frames, replace=False)]
    if len(features) < n_clusters:
        raise ValueError(f"{len(features)} frames cannot make {n_clusters} clusters")
    km = MiniBatchKMeans(n_clusters=n_clusters, random_state=seed, batch_size=batch_size, max_iter=max_iter,
                         n_init=n_init, max_no_improvement=20, reassignment_ratio=0.0, init="k-means++")
    km.fit(features)
    return KMeans(km.cluster_centers_)


# ----------------------------------------------------------------------------- units and strings

def dedup(units):
    """Merge consecutive repeats: (T,) -> (units (T',), durations (T',) in frames)."""
    units = torch.as_tensor(units)
    return torch.unique_consecutive(units, return_counts=True)


UNIT_RE = re.compile(r"<(0|[1-9][0-9]*)>")  # one unit token, "<12>"; group 1 is its id (no leading zeros)


def unit_token(unit):
    """12 -> "<12>": how unit `unit` is spelled, in text and as a token of the tokenizer."""
    unit = int(unit)
    if unit < 0:
        raise UnitError(f"unit ids are non-negative integers, got {unit}")
    return f"<{unit}>"


def speech_text(units):
    """[12, 12, 7, 305] -> "<sosp><12><7><305><eosp>": SpeechGPT's spelling of speech in text,
    consecutive repeats merged, no spaces. units: a list or a (T,) tensor of ids."""
    units = [int(u) for u in units]
    merged = [u for i, u in enumerate(units) if i == 0 or u != units[i - 1]]
    return SOSP + "".join(unit_token(u) for u in merged) + EOSP


def parse_units(text, n_units=None, strict=True, problems=None):
    """"<sosp><12><7><305><eosp>" -> [12, 7, 305], the inverse of `speech_text`.

    strict (text we wrote): exactly that spelling, or a UnitError naming the first problem and
        where: a missing <sosp>/<eosp>, anything between them that is not a unit token, a unit
        >= n_units.
    strict=False (text a model generated, which may be anything): never raises; keeps every unit it
        can read and drops the rest (text around or among the units, ids >= n_units), tolerating a
        missing <sosp> or <eosp>; each departure is described in `problems` (a list), if given.
    """
    if strict:
        return _parse_strict(text, n_units)
    return _parse_tolerant(text, n_units, problems if problems is not None else [])


def _parse_strict(text, n_units):
    if not text.startswith(SOSP):
        raise UnitError(f"unit string must start with {SOSP}, got {text[:20]!r}")
    if not text.endswith(EOSP):
        raise UnitError(f"unit string must end with {EOSP}, got ...{text[-20:]!r}")
    body, units, pos = text[len(SOSP): len(text) - len(EOSP)], [], 0
    while pos < len(body):
        match = UNIT_RE.match(body, pos)
        if match is None:
            raise UnitError(f"expected a unit like <12> at character {pos + len(SOSP)}, "
                            f"found {body[pos: pos + 12]!r}")
        unit = int(match.group(1))
        if n_units is not None and unit >= n_units:
            raise UnitError(f"unit <{unit}> at character {pos + len(SOSP)} is out of range 0..{n_units - 1}")
        units.append(unit)
        pos = match.end()
    return units


def _parse_tolerant(text, n_units, problems):
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
    garbage = UNIT_RE.sub("", text).strip()
    if garbage:
        problems.append(f"non-unit text inside the speech: {garbage[:30]!r}")
    units = [int(u) for u in UNIT_RE.findall(text)]
    if n_units is not None:
        bad = [u for u in units if u >= n_units]
        if bad:
            problems.append(f"{len(bad)} unit id(s) out of range 0..{n_units - 1}, e.g. <{bad[0]}>: dropped")
            units = [u for u in units if u < n_units]
    if not units:
        problems.append("speech answer with no units")
    return units


# ----------------------------------------------------------------------------- speech -> units

def speech_to_units(wavs, encoder, layer, kmeans, batch_size=8, progress=False, device=None):
    """16 kHz waveforms -> 50 Hz unit ids. wavs: list of (T_i,) -> list of (T_i',) long, on the CPU.
    device: where the encoder runs (it is moved there; None: where it is); k-means assigns on the CPU."""
    features = extract_features(encoder, wavs, layer, batch_size=batch_size, progress=progress, device=device)
    return [kmeans.assign(f) for f in features]


def speech_to_deduped_units(wavs, encoder, layer, kmeans, batch_size=8, progress=False, device=None):
    """Like `speech_to_units`, repeats merged: list of (units (n_i,), durations (n_i,) in frames)."""
    return [dedup(u) for u in speech_to_units(wavs, encoder, layer, kmeans, batch_size, progress, device)]


# ----------------------------------------------------------------------------- phone alignments, PNMI

def read_run_units(run_dir):
    """What a train.py run's units step wrote: units.jsonl -> ({utterance id: deduplicated units},
    {utterance id: their durations in 50 Hz frames}, K). K is the phone recogniser's phone count
    (run/phones) or the k-means size (run/kmeans)."""
    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "units.jsonl").read_text().splitlines()]
    phones, kmeans = run_dir / "phones" / "config.json", run_dir / "kmeans" / "config.json"
    n_units = (len(json.loads(phones.read_text())["phones"]) if phones.is_file()
               else json.loads(kmeans.read_text())["n_clusters"])
    return {r["id"]: r["units"] for r in rows}, {r["id"]: r["durations"] for r in rows}, n_units


def read_segs(path):
    """Festival `.segs` alignment: a header ending with a line '#', then 'END_TIME 100 PHONE' lines,
    times in seconds; a file, or a member of a zip archive (see `audio.read_packed`).
    -> list of (start, end, phone)."""
    lines = read_packed(path).decode().splitlines()
    if "#" not in (line.strip() for line in lines):
        raise ValueError(f"{path}: no '#' line ending the header (not a festival .segs file)")
    body = lines[[line.strip() for line in lines].index("#") + 1:]
    segments, start = [], 0.0
    for number, line in enumerate(body, start=len(lines) - len(body) + 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            end, phone = float(parts[0]), parts[2]
        except (IndexError, ValueError):
            raise ValueError(f"{path}:{number}: expected 'END_TIME 100 PHONE', got {line!r}") from None
        segments.append((start, end, phone))
        start = end
    return segments


def frame_phones(segments, n_frames, frame_rate=50.0, window=0.025):
    """The phone of each frame. Frame i of a 50 Hz unit sequence covers [i/50, i/50 + 0.025) s
    (the conv extractor's 400-sample receptive field); it takes the phone at its centre,
    i/50 + 0.0125 s. Frames whose centre is past the last segment keep the last phone.
    -> list of n_frames phone strings."""
    ends = np.array([end for _, end, _ in segments])
    centres = np.arange(n_frames) / frame_rate + window / 2
    idx = np.minimum(np.searchsorted(ends, centres, side="right"), len(segments) - 1)
    return [segments[i][2] for i in idx]


def unit_quality(phones, units):
    """Phone-normalised mutual information and purities over frames (HuBERT paper, sec. IV-C).
    phones: (N,) labels; units: (N,) ids. Returns dict with
      pnmi: I(phone; unit) / H(phone);
      phone_purity: frames whose phone is their unit's most common phone (each unit guesses a phone);
      cluster_purity: frames whose unit is their phone's most common unit."""
    _, p_idx = np.unique(np.asarray(phones), return_inverse=True)
    _, u_idx = np.unique(np.asarray(units), return_inverse=True)
    if len(p_idx) == 0:
        raise ValueError("no frames to score")
    joint = np.zeros((p_idx.max() + 1, u_idx.max() + 1))
    np.add.at(joint, (p_idx, u_idx), 1.0)
    joint /= joint.sum()  # P(phone, unit)
    p_phone, p_unit = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mutual = (joint[nz] * np.log(joint[nz] / np.outer(p_phone, p_unit)[nz])).sum()
    h_phone = -(p_phone * np.log(p_phone)).sum()
    return {"pnmi": float(mutual / h_phone) if h_phone > 0 else 0.0,
            "phone_purity": float(joint.max(0).sum()),
            "cluster_purity": float(joint.max(1).sum())}


def score_units(unit_seqs, alignment_paths):
    """`unit_quality` over many utterances: unit sequences (each (T_i,)) and their .segs files."""
    phones, units = [], []
    for seq, path in zip(unit_seqs, alignment_paths):
        phones.extend(frame_phones(read_segs(path), len(seq)))
        units.append(np.asarray(seq))
    return unit_quality(phones, np.concatenate(units))
