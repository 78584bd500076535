"""The audio front end: load speech as 16 kHz mono float32, and compute log-mel and MFCC features.

Everything downstream (the HuBERT encoder, k-means units, the vocoder's mel loss) starts here.
SpeechGPT hears 16 kHz mono audio at 50 frames per second: one frame every 320 samples (20 ms).

    wav = load_audio("question.flac")          # (T,) float32 in [-1, 1], 16 kHz
    wav = load_audio("tiny_data/audio/fest_slt.zip/sent_00000_fest_slt.ogg")  # a member of a zip archive
    mel = log_mel_spectrogram(wav)             # (n_mels, frames)
    cep = mfcc(wav, hop_length=320)            # (n_mfcc, frames), 50 Hz like HuBERT's frames
"""
import functools
import io
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly

SAMPLE_RATE = 16000
FRAME_SECONDS = 0.020  # one 50 Hz frame: the shortest input that yields a single unit
DEFAULT_MAX_SECONDS = 600.0


class AudioError(ValueError):
    """Bad audio input: the message names the file (or array) and the problem."""


# ----------------------------------------------------------------------------- loading

def load_audio(path_or_array, sr=None, target_sr=SAMPLE_RATE, max_seconds=DEFAULT_MAX_SECONDS):
    """Load speech as a mono float32 tensor at `target_sr`.

    path_or_array: a path to a WAV, FLAC or OGG file (anything soundfile reads), or an array /
        tensor of samples shaped (T,) or (T, channels); for an array, `sr` is its sample rate.
    max_seconds: refuse longer audio (None for no limit) rather than run out of memory later.
    Returns: (T',) float32 torch tensor, T' = T * target_sr / sr.
    Raises AudioError with the file name and the problem for every kind of bad input.
    """
    if isinstance(path_or_array, (str, Path)):
        name = str(path_or_array)
        samples, sr = _read_file(Path(path_or_array))
    else:
        name = "audio array"
        if sr is None:
            raise AudioError(f"{name}: pass its sample rate, e.g. load_audio(samples, sr=16000)")
        samples = path_or_array.detach().cpu().numpy() if torch.is_tensor(path_or_array) else np.asarray(path_or_array)
        if not np.issubdtype(samples.dtype, np.number):
            raise AudioError(f"{name}: samples must be numbers, got dtype {samples.dtype}")
        if samples.ndim not in (1, 2):
            raise AudioError(f"{name}: expected shape (samples,) or (samples, channels), got {samples.shape}")
    samples = _to_float(samples)
    if samples.ndim == 2:  # (T, channels) -> (T,): average the channels
        samples = samples.mean(axis=1)

    if samples.size == 0:
        raise AudioError(f"{name}: the audio is empty (0 samples)")
    if not np.isfinite(samples).all():
        raise AudioError(f"{name}: the audio contains NaN or infinite samples")
    seconds = samples.shape[0] / sr
    if seconds < FRAME_SECONDS:
        raise AudioError(f"{name}: {seconds * 1000:.1f} ms is shorter than one {FRAME_SECONDS * 1000:.0f} ms frame")
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(f"{name}: {seconds:.1f} s is longer than the maximum of {max_seconds:.1f} s "
                         f"(raise max_seconds to accept it)")

    if sr != target_sr:
        samples = resample(samples, sr, target_sr)
    return torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))


def _read_file(path):
    """-> (samples (T,) or (T, C), sample rate). soundfile reads WAV, FLAC and OGG among others."""
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    try:
        data = read_packed(path)
    except FileNotFoundError as error:
        raise AudioError(str(error)) from None
    try:
        samples, sr = sf.read(io.BytesIO(data), always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioError(f"{path}: not readable as audio (WAV, FLAC or OGG expected): {error}") from None
    return samples, sr


def read_packed(path):
    """The bytes of a file, or of one member of a zip archive addressed as if the archive were a
    folder: `tiny_data/audio/fest_slt.zip/sent_00000_fest_slt.ogg`. tiny_data keeps each voice's
    thousands of short recordings in one archive, so that a clone stays small on disk
    (`unzip` one to listen). Raises FileNotFoundError naming the path."""
    path = Path(path)
    if path.is_file():
        return path.read_bytes()
    archive = next((parent for parent in path.parents if parent.suffix == ".zip" and parent.is_file()), None)
    if archive is None:
        raise FileNotFoundError(f"{path}: no such file")
    member = path.relative_to(archive).as_posix()
    try:
        return _open_archive(archive, archive.stat().st_mtime_ns, os.getpid()).read(member)
    except KeyError:
        raise FileNotFoundError(f"{path}: no such file ({archive.name} has no member {member!r})") from None


@functools.lru_cache(maxsize=None)
def _open_archive(archive, modified, process):
    """An archive opened once (reading its index of members takes longer than reading one member);
    opened again if the file changes, and in every process: forked workers must not share one file
    position."""
    return zipfile.ZipFile(archive)


def _to_float(samples):
    """Integer PCM -> float in [-1, 1]; float stays float (as float64 for exact resampling)."""
    if np.issubdtype(samples.dtype, np.integer):
        return samples.astype(np.float64) / float(-np.iinfo(samples.dtype).min)
    return samples.astype(np.float64)


def resample(samples, orig_sr, target_sr):
    """Polyphase resampling (scipy), e.g. 22050 -> 16000 Hz as up 320 / down 441. (T,) -> (T',)."""
    gcd = math.gcd(int(orig_sr), int(target_sr))
    return resample_poly(samples, int(target_sr) // gcd, int(orig_sr) // gcd)


def save_audio(path, wav, sr=SAMPLE_RATE):
    """Write (T,) float audio to WAV/FLAC/OGG, chosen by the file extension."""
    wav = wav.detach().cpu().float().numpy() if torch.is_tensor(wav) else np.asarray(wav, dtype=np.float32)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(wav, -1.0, 1.0), sr)


# ----------------------------------------------------------------------------- features

def hz_to_mel(hz):
    """Slaney's mel scale (librosa's default): linear below 1 kHz, logarithmic above."""
    hz = torch.as_tensor(hz, dtype=torch.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    linear = hz / f_sp
    log = min_log_hz / f_sp + torch.log(torch.clamp(hz, min=min_log_hz) / min_log_hz) / logstep
    return torch.where(hz >= min_log_hz, log, linear)


def mel_to_hz(mel):
    """Inverse of `hz_to_mel`."""
    mel = torch.as_tensor(mel, dtype=torch.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return torch.where(mel >= min_log_mel, min_log_hz * torch.exp(logstep * (mel - min_log_mel)), f_sp * mel)


def vtlp_warped(hz, warp, nyquist, cutoff=4800.0):
    """Vocal tract length perturbation's frequency warp (Jaitly & Hinton, 2013): hz * warp up to a
    breakpoint (cutoff * min(warp, 1) / warp), then a straight line to the Nyquist frequency, which stays
    (cutoff below the Nyquist frequency: 4800 Hz suits 16 kHz audio).
    A filterbank read at warped frequencies sees a voice as another vocal tract would make it: with
    warp 0.8 the filter at 1000 Hz takes the energy at 1250 Hz, every formant reads 20% lower."""
    hz = torch.as_tensor(hz, dtype=torch.float64)
    breakpoint = cutoff * min(warp, 1.0) / warp
    above = nyquist - (nyquist - cutoff * min(warp, 1.0)) / (nyquist - breakpoint) * (nyquist - hz)
    return torch.where(hz <= breakpoint, hz * warp, above)


def mel_filterbank(sr, n_fft, n_mels, f_min=0.0, f_max=None, warp=1.0):
    """Triangular filters on the Slaney mel scale, area-normalised. -> (n_mels, n_fft // 2 + 1).
    warp != 1: the FFT bins are placed at `vtlp_warped` frequencies (a new voice's formants)."""
    f_max = sr / 2 if f_max is None else f_max
    fft_hz = torch.linspace(0, sr / 2, n_fft // 2 + 1, dtype=torch.float64)
    if warp != 1.0:
        fft_hz = vtlp_warped(fft_hz, warp, sr / 2)
    edges_hz = mel_to_hz(torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2, dtype=torch.float64))
    lower, center, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (fft_hz - lower) / (center - lower)
    falling = (upper - fft_hz) / (upper - center)
    filters = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return (filters * (2.0 / (upper - lower))).float()  # Slaney norm: each filter has unit area


def mel_spectrogram(wav, sr=SAMPLE_RATE, n_fft=400, hop_length=160, win_length=None, n_mels=80,
                    f_min=0.0, f_max=None, power=2.0, center=True, warp=1.0):
    """Mel spectrogram with a Hann window. wav (..., T) -> (..., n_mels, frames).

    center=True pads n_fft // 2 on each side (reflect), like librosa; center=False gives
    floor((T - n_fft) / hop) + 1 frames, aligned with a conv front end of the same window and stride.
    Differentiable, so the vocoder uses it as a loss. warp: the filterbank's (`mel_filterbank`).
    """
    win_length = n_fft if win_length is None else win_length
    window = torch.hann_window(win_length, periodic=True, dtype=wav.dtype, device=wav.device)
    batch_shape = wav.shape[:-1]
    spec = torch.stft(wav.reshape(-1, wav.shape[-1]), n_fft, hop_length, win_length, window,
                      center=center, pad_mode="reflect", return_complex=True)  # (B, n_fft//2+1, frames)
    spec = spec.abs().pow(power)
    filters = mel_filterbank(sr, n_fft, n_mels, f_min, f_max, warp).to(spec.device, spec.dtype)
    mel = filters @ spec  # (B, n_mels, frames)
    return mel.reshape(*batch_shape, n_mels, mel.shape[-1])


def log_mel_spectrogram(wav, sr=SAMPLE_RATE, n_fft=400, hop_length=160, win_length=None, n_mels=80,
                        f_min=0.0, f_max=None, power=2.0, center=True, eps=1e-10):
    """Natural log of `mel_spectrogram`, floored at eps. wav (..., T) -> (..., n_mels, frames)."""
    mel = mel_spectrogram(wav, sr, n_fft, hop_length, win_length, n_mels, f_min, f_max, power, center)
    return torch.log(torch.clamp(mel, min=eps))


def dct_matrix(n_mfcc, n_mels):
    """Orthonormal DCT-II as a matrix (scipy's `dct(norm="ortho")`). -> (n_mfcc, n_mels)."""
    n = torch.arange(n_mels, dtype=torch.float64)
    k = torch.arange(n_mfcc, dtype=torch.float64)[:, None]
    basis = torch.cos(math.pi / n_mels * (n + 0.5) * k) * math.sqrt(2.0 / n_mels)
    basis[0] /= math.sqrt(2.0)
    return basis.float()


def mfcc(wav, sr=SAMPLE_RATE, n_mfcc=13, n_fft=400, hop_length=160, win_length=None, n_mels=40,
         f_min=0.0, f_max=None, center=True, warp=1.0):
    """Mel-frequency cepstral coefficients: DCT of the power mel spectrogram in decibels.

    The classic speech feature that HuBERT's first iteration clusters into targets.
    wav (..., T) -> (..., n_mfcc, frames). Same conventions as librosa.feature.mfcc
    (with power_to_db(top_db=None)). warp: the filterbank's (`mel_filterbank`).
    """
    mel = mel_spectrogram(wav, sr, n_fft, hop_length, win_length, n_mels, f_min, f_max, 2.0, center, warp)
    mel_db = 10.0 * torch.log10(torch.clamp(mel, min=1e-10))
    return torch.matmul(dct_matrix(n_mfcc, n_mels).to(mel_db), mel_db)  # (..., n_mfcc, frames)


def deltas(features, width=9):
    """Time derivative: the least-squares slope over `width` frames, edges padded by repetition
    (librosa.feature.delta with mode="nearest"). (..., D, frames) -> (..., D, frames)."""
    half = width // 2
    padded = torch.nn.functional.pad(features.reshape(-1, 1, features.shape[-1]), (half, half), mode="replicate")
    taps = torch.arange(-half, half + 1, dtype=features.dtype, device=features.device)
    kernel = (taps / (taps * taps).sum()).reshape(1, 1, -1)  # conv1d correlates: slope = sum k x[t+k] / sum k^2
    return torch.nn.functional.conv1d(padded, kernel).reshape(features.shape)
