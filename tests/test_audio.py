"""The audio front end: loading (every bad-input case), resampling, and features against librosa."""
import io
import zipfile

import numpy as np
import pytest
import soundfile as sf
import torch

from speechgpt_min.audio import (AudioError, deltas, load_audio, log_mel_spectrogram, mel_filterbank,
                                 mel_spectrogram, mfcc, read_packed, save_audio, vtlp_warped)


def tone(seconds=0.5, sr=16000, hz=440.0, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.5 * np.sin(2 * np.pi * hz * t)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def speechlike(seconds=1.0, sr=16000, seed=0):
    """Noise shaped by a moving formant: enough structure to exercise every mel band."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


# ----------------------------------------------------------------------------- loading

@pytest.mark.parametrize("fmt,suffix", [("WAV", ".wav"), ("FLAC", ".flac"), ("OGG", ".ogg")])
def test_load_formats(tmp_path, fmt, suffix):
    path = tmp_path / f"a{suffix}"
    sf.write(str(path), tone(), 16000, format=fmt)
    wav = load_audio(path)
    assert wav.dtype == torch.float32 and wav.ndim == 1
    assert wav.shape[0] == 8000
    tolerance = 0.05 if fmt == "OGG" else 1e-3  # Vorbis is lossy
    assert abs(wav.abs().max().item() - 0.5) < tolerance


def test_downmix_and_resample(tmp_path):
    stereo = tone(seconds=1.0, sr=22050, hz=1000.0, channels=2)
    stereo[:, 1] *= 0.0  # the right channel is silent: the mix halves the amplitude
    path = tmp_path / "stereo.wav"
    sf.write(str(path), stereo, 22050)
    wav = load_audio(path)
    assert wav.shape[0] == 16000
    spectrum = np.abs(np.fft.rfft(wav.numpy()))
    assert abs(np.argmax(spectrum) - 1000) <= 1  # 1 Hz bins over one second: the tone stays at 1 kHz
    assert abs(wav[1000:-1000].abs().max().item() - 0.25) < 0.01


def test_array_input_int16_and_tensor():
    ints = (tone() * 32767).astype(np.int16)
    wav = load_audio(ints, sr=16000)
    assert wav.dtype == torch.float32 and abs(wav.abs().max().item() - 0.5) < 1e-3
    from_tensor = load_audio(torch.from_numpy(tone(sr=8000, hz=300.0)), sr=8000)
    assert from_tensor.shape[0] == 8000


def test_load_target_sr_and_save_round_trip(tmp_path):
    save_audio(tmp_path / "x.flac", torch.from_numpy(tone()).float())
    assert load_audio(tmp_path / "x.flac", target_sr=8000).shape[0] == 4000


def test_load_a_member_of_a_zip_archive(tmp_path):
    """tiny_data's layout: audio/<voice>.zip/<id>.ogg names one recording inside a voice's archive."""
    ogg = io.BytesIO()
    sf.write(ogg, tone(), 16000, format="OGG", subtype="OPUS")
    with zipfile.ZipFile(tmp_path / "voice.zip", "w") as archive:
        archive.writestr("utt_1.ogg", ogg.getvalue())
        archive.writestr("utt_1.segs", "header\n#\n0.5 100 pau\n")
    wav = load_audio(tmp_path / "voice.zip" / "utt_1.ogg")
    expected, _ = sf.read(io.BytesIO(ogg.getvalue()))
    assert wav.shape[0] == 8000 and torch.allclose(wav, torch.from_numpy(expected).float())
    assert read_packed(tmp_path / "voice.zip" / "utt_1.segs").decode().endswith("pau\n")
    assert read_packed(tmp_path / "voice.zip") == (tmp_path / "voice.zip").read_bytes()  # a plain file stays one
    with pytest.raises(AudioError, match=r"utt_2\.ogg: no such file \(voice\.zip has no member 'utt_2\.ogg'\)"):
        load_audio(tmp_path / "voice.zip" / "utt_2.ogg")
    with pytest.raises(FileNotFoundError, match=r"other\.zip/utt_1\.ogg: no such file$"):
        read_packed(tmp_path / "other.zip" / "utt_1.ogg")


def test_error_missing_file(tmp_path):
    with pytest.raises(AudioError, match=r"nope\.wav: no such file"):
        load_audio(tmp_path / "nope.wav")


def test_error_directory(tmp_path):
    with pytest.raises(AudioError, match="is a directory"):
        load_audio(tmp_path)


def test_error_not_audio(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio at all")
    with pytest.raises(AudioError, match=r"notes\.wav: not readable as audio"):
        load_audio(path)


def test_error_empty(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(str(path), np.zeros(0), 16000)
    with pytest.raises(AudioError, match=r"empty\.wav: the audio is empty"):
        load_audio(path)


def test_error_shorter_than_a_frame(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(str(path), tone(seconds=0.010), 16000)
    with pytest.raises(AudioError, match=r"short\.wav: 10\.0 ms is shorter than one 20 ms frame"):
        load_audio(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_error_non_finite(tmp_path, bad):
    samples = tone().astype(np.float32)
    samples[100] = bad
    path = tmp_path / "bad.wav"
    sf.write(str(path), samples, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"bad\.wav: the audio contains NaN or infinite samples"):
        load_audio(path)


def test_error_too_long(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(str(path), tone(seconds=3.0), 16000)
    with pytest.raises(AudioError, match=r"long\.wav: 3\.0 s is longer than the maximum of 2\.0 s"):
        load_audio(path, max_seconds=2.0)
    assert load_audio(path, max_seconds=None).shape[0] == 48000


def test_error_array_without_rate_or_bad_shape():
    with pytest.raises(AudioError, match="pass its sample rate"):
        load_audio(tone())
    with pytest.raises(AudioError, match="expected shape"):
        load_audio(np.zeros((2, 3, 4)), sr=16000)
    with pytest.raises(AudioError, match="must be numbers"):
        load_audio(np.array(["a", "b"]), sr=16000)


# ----------------------------------------------------------------------------- features vs librosa

@pytest.mark.parametrize("n_fft,n_mels,f_max", [(400, 80, None), (1024, 80, 8000.0), (512, 40, 7600.0)])
def test_mel_filterbank_matches_librosa(n_fft, n_mels, f_max, librosa):
    ours = mel_filterbank(16000, n_fft, n_mels, f_max=f_max)
    reference = librosa.filters.mel(sr=16000, n_fft=n_fft, n_mels=n_mels, fmax=f_max)
    torch.testing.assert_close(ours, torch.from_numpy(reference), atol=1e-6, rtol=1e-4)


def test_a_warped_filterbank_reads_formants_lower_or_higher():
    """VTLP: below the breakpoint every frequency is scaled by the warp, 0 and the Nyquist frequency stay,
    and the warp is continuous and increasing; warp 1 is the plain filterbank; warped 0.8, a 1250 Hz tone
    peaks in the band where a 1000 Hz tone peaks unwarped."""
    hz = torch.linspace(0, 8000, 801, dtype=torch.float64)
    for warp in (0.8, 1.2):
        warped = vtlp_warped(hz, warp, 8000.0)
        assert warped[0] == 0 and abs(float(warped[-1]) - 8000) < 1e-9 and bool((warped.diff() > 0).all())
        low = hz <= 3000
        torch.testing.assert_close(warped[low], hz[low] * warp)
    torch.testing.assert_close(mel_filterbank(16000, 400, 40, warp=1.0), mel_filterbank(16000, 400, 40))
    def peak_band(hz, warp):
        return int(mel_spectrogram(torch.from_numpy(tone(hz=hz)).float(), n_mels=40, warp=warp).mean(-1).argmax())
    assert peak_band(1250.0, 0.8) == peak_band(1000.0, 1.0) != peak_band(1250.0, 1.0)


@pytest.mark.parametrize("center", [True, False])
def test_mel_spectrogram_matches_librosa(center, librosa):
    wav = speechlike()
    ours = mel_spectrogram(torch.from_numpy(wav), n_fft=400, hop_length=160, n_mels=80, center=center)
    reference = librosa.feature.melspectrogram(y=wav, sr=16000, n_fft=400, hop_length=160, n_mels=80,
                                               center=center, pad_mode="reflect", power=2.0)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, torch.from_numpy(reference), atol=1e-4, rtol=1e-3)


def test_log_mel_batched_and_magnitude(librosa):
    wavs = torch.from_numpy(np.stack([speechlike(seed=0), speechlike(seed=1)]))
    batched = log_mel_spectrogram(wavs, n_fft=1024, hop_length=256, power=1.0)
    for i in range(2):
        reference = librosa.feature.melspectrogram(y=wavs[i].numpy(), sr=16000, n_fft=1024, hop_length=256,
                                                   n_mels=80, pad_mode="reflect", power=1.0)
        torch.testing.assert_close(batched[i], torch.log(torch.from_numpy(reference).clamp(min=1e-10)),
                                   atol=1e-3, rtol=1e-3)


def test_mfcc_matches_librosa(librosa):
    wav = speechlike(seconds=1.3)
    ours = mfcc(torch.from_numpy(wav), n_mfcc=13, n_fft=400, hop_length=320, n_mels=40, center=False)
    mel = librosa.feature.melspectrogram(y=wav, sr=16000, n_fft=400, hop_length=320, n_mels=40, center=False)
    reference = librosa.feature.mfcc(S=librosa.power_to_db(mel, top_db=None), n_mfcc=13)
    torch.testing.assert_close(ours, torch.from_numpy(reference), atol=2e-3, rtol=1e-3)


def test_mfcc_frames_align_with_a_320x_conv_front_end():
    for samples in (400, 719, 720, 16000, 16001, 23456):
        frames = mfcc(torch.zeros(samples) + 0.01, hop_length=320, center=False).shape[-1]
        assert frames == (samples - 400) // 320 + 1


def test_deltas_match_librosa(librosa):
    features = torch.from_numpy(np.random.default_rng(0).standard_normal((13, 50)).astype(np.float32))
    reference = librosa.feature.delta(features.numpy(), width=9, mode="nearest")
    torch.testing.assert_close(deltas(features), torch.from_numpy(reference), atol=1e-5, rtol=1e-4)
