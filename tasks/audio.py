"""Audio classification (DESIGN.md §0): one clip in, a class out. Numpy, scipy and soundfile
only: training, export and the service compute the same log-mel features here.

A clip is decoded with soundfile (WAV, FLAC, OGG, MP3; no system FFmpeg), averaged to mono,
resampled to 16 kHz (scipy's polyphase filter), then cut or padded with silence to the
model's window (`preprocessing.clip_seconds`, the longest training clip: the Whisper encoder
reads that many frames with its positional embeddings sliced to them, instead of 30 s).
Features are Whisper's: an 80-band log-mel spectrogram (25 ms Hann window, 10 ms hop,
Slaney mel scale), log10, floored 8 below the clip's maximum, scaled to about [-1, 1].

ONNX: inputs `input_features` FP32 [batch, mels, frames] and `attention_mask` INT64
[batch, frames] (1 on the clip's frames, 0 on the padding: the encoder mean-pools the clip
only); outputs `logits` and `pooled_embedding` as the other classifiers. The API takes
base64 audio files in `/predict`, files in `/predict_file`, BYTES in OIP. Drift: `input` is
the duration, `feature:loudness` the RMS level in dBFS.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from tasks.classification import Classification
from tasks.common import Prepared, encoded_bytes
from tasks.drift import CHECKS, FEATURE, Samples
from tasks.errors import InputError

SAMPLE_RATE = 16_000  # Hz, what Whisper's encoder was trained on
N_FFT = 400  # samples per STFT window: 25 ms
HOP = 160  # samples between frames: 10 ms
FEATURES = "input_features"
MASK = "attention_mask"
LOUDNESS = "loudness"
SILENCE_DB = -100.0  # dBFS of an all-zero clip
AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3")
MAX_RATE_X_CHANNELS = 96_000  # decoded samples per second of the duration limit: 48 kHz stereo


def read_audio(data: bytes, max_seconds: float) -> np.ndarray:
    """Encoded audio → mono float32 at SAMPLE_RATE. The duration is read from the header
    before anything is decoded: over `max_seconds` is a 413, undecodable or empty a 400."""
    import soundfile as sf

    if not data:
        raise InputError("empty_audio", "the audio input is empty")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, frames = f.samplerate, f.frames
            if rate <= 0:
                raise InputError("bad_audio", "the audio header has no sample rate")
            seconds = frames / rate
            if seconds > max_seconds:
                raise InputError(
                    "audio_too_long",
                    f"audio is {seconds:.1f} s long; the limit is {max_seconds:g} s",
                    status=413,
                )
            samples, limit = frames * f.channels, max_seconds * MAX_RATE_X_CHANNELS
            if samples > limit:  # what it decodes to, not its bytes: FLAC packs silence 1000x
                raise InputError(
                    "audio_too_large",
                    f"audio decodes to {samples} samples ({rate} Hz x {f.channels} channels x "
                    f"{seconds:.1f} s); the limit is {limit:.0f} ({max_seconds:g} s at 48 kHz "
                    "stereo): resample or mix it down",
                    status=413,
                )
            wave = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise InputError(
            "bad_audio",
            f"cannot decode the audio (WAV, FLAC, OGG or MP3): {str(e).splitlines()[0][:120]}",
        ) from None
    if wave.shape[0] == 0:
        raise InputError("empty_audio", "the audio holds no samples")
    return resample(wave.mean(axis=1), rate)


def resample(wave: np.ndarray, rate: int) -> np.ndarray:
    """Mono samples at `rate` → SAMPLE_RATE (scipy's polyphase filter, exact ratio)."""
    wave = np.asarray(wave, dtype=np.float32)
    if rate == SAMPLE_RATE:
        return wave
    from scipy.signal import resample_poly

    g = math.gcd(SAMPLE_RATE, int(rate))
    return resample_poly(wave, SAMPLE_RATE // g, int(rate) // g).astype(np.float32)


def loudness_db(wave: np.ndarray) -> float:
    """RMS level in dBFS (full scale = 1.0); SILENCE_DB for silence."""
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64)))) if len(wave) else 0.0
    return max(SILENCE_DB, 20 * math.log10(rms)) if rms > 0 else SILENCE_DB


# --------------------------------------------------------------------------- log-mel


def _hz_to_mel(f):
    """Slaney's mel scale: linear below 1 kHz, logarithmic above (librosa's default)."""
    f = np.asarray(f, dtype=np.float64)
    mel = f / (200.0 / 3)
    log = f >= 1000.0
    return np.where(log, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27), mel)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    hz = m * (200.0 / 3)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27) * (m - 15.0)), hz)


@lru_cache(maxsize=4)
def mel_filters(n_mels: int, n_fft: int = N_FFT, rate: int = SAMPLE_RATE) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] triangular filters, Slaney-normalised (equal area)."""
    freqs = np.linspace(0, rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(rate / 2), n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[:, None]
    return weights


@lru_cache(maxsize=1)
def _hann() -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float64)


def log_mel(wave: np.ndarray, n_samples: int, n_mels: int = 80) -> np.ndarray:
    """Whisper's features of a clip cut or padded to `n_samples`: [n_mels, n_samples / HOP]."""
    x = np.zeros(n_samples, dtype=np.float64)
    n = min(len(wave), n_samples)
    x[:n] = wave[:n]
    x = np.pad(x, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP]
    power = np.abs(np.fft.rfft(frames * _hann(), axis=1)) ** 2
    mel = mel_filters(n_mels) @ power.T
    log = np.log10(np.maximum(mel, 1e-10))[:, :-1]  # Whisper drops the last frame
    log = np.maximum(log, log.max() - 8.0)
    return ((log + 4.0) / 4.0).astype(np.float32)


def window(pre: dict) -> tuple[int, int]:
    """(samples, frames) of the model's input window."""
    samples = int(round(float(pre["clip_seconds"]) * SAMPLE_RATE))
    return samples, samples // HOP


def wav_bytes(wave: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """Float samples as a 16-bit WAV file (examples, warm-up, tests)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(wave, dtype=np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# --------------------------------------------------------------------------- the task


@dataclass(frozen=True, slots=True)
class Clip:
    """A decoded clip as it waits in the queue: the samples the model reads (its window) and
    the whole clip's duration and loudness (the drift statistics). A 60-s clip held whole
    was 3.8 MB per queued input for a model that reads a few seconds of it."""

    wave: np.ndarray  # float32 at SAMPLE_RATE, at most the model's window
    seconds: float
    loudness_db: float

    @classmethod
    def of(cls, wave: np.ndarray, samples: int) -> Clip:
        wave = np.asarray(wave, dtype=np.float32)
        head = wave[:samples].copy() if len(wave) > samples else wave  # copy: frees the rest
        return cls(head, len(wave) / SAMPLE_RATE, loudness_db(wave))

    @property
    def nbytes(self) -> int:
        return self.wave.nbytes


class AudioClassification(Classification):
    name = "audio-classification"
    heavy_inputs = decode_in_threads = True  # decoding and resampling: the decode threads
    checks = CHECKS + (FEATURE + LOUDNESS,)

    def __init__(self, spec, tokenizer=None, limits=None):
        super().__init__(spec, tokenizer, limits)
        self.samples, self.frames = window(self.pre)
        self.n_mels = int(self.pre.get("n_mels", 80))

    @property
    def example_input(self) -> str:
        t = np.arange(SAMPLE_RATE // 2) / SAMPLE_RATE
        return base64.b64encode(wav_bytes(0.3 * np.sin(2 * np.pi * 440 * t))).decode()

    def decode(self, value) -> Prepared:
        wave = read_audio(encoded_bytes(value, "audio"), self.limits.max_audio_seconds)
        return Prepared(Clip.of(wave, self.samples))

    def from_holdout(self, value) -> Prepared:
        return self.decode(str(value))  # base64 of the original file: the served path

    def feeds(self, items, stats: dict | None = None) -> dict:
        clips = [i.value for i in items]
        x = np.stack([log_mel(c.wave, self.samples, self.n_mels) for c in clips])
        mask = np.zeros((len(clips), self.frames), dtype=np.int64)
        for row, c in zip(mask, clips, strict=True):
            row[: max(1, min(self.frames, -(-len(c.wave) // HOP)))] = 1
        if stats is not None:
            stats["duration"] = [c.seconds for c in clips]
            stats[LOUDNESS] = [c.loudness_db for c in clips]
            stats["truncated"] = sum(1 for c in clips if c.seconds * SAMPLE_RATE > self.samples)
        return {FEATURES: x, MASK: mask}

    def parity_feeds(self, items, length=None) -> dict:
        return self.feeds(items)

    def run(self, session_run, items, stats=None):
        logits, embedding = session_run(self.feeds(items, stats))
        return logits, embedding

    def drift_input(self, stats: dict) -> list:
        return stats["duration"]

    def drift_samples(self, outputs, embedding, stats) -> Samples:
        s = super().drift_samples(outputs, embedding, stats)
        s.features = np.asarray(stats[LOUDNESS], dtype=np.float64)[:, None]
        s.kinds = ("numeric",)
        return s

    def input_summary(self, clips: list[Clip]) -> dict:
        """The card's reference input statistics (export, on the holdout)."""
        from tasks.common import quantile_hist

        return {
            "duration_seconds": quantile_hist([c.seconds for c in clips]),
            "loudness_db": quantile_hist([c.loudness_db for c in clips]),
        }

    def warm_items(self):
        rng = np.random.default_rng(0)
        long = (0.1 * rng.standard_normal(self.samples)).astype(np.float32)
        return Prepared(Clip.of(np.zeros(HOP * 10), self.samples)), Prepared(
            Clip.of(long, self.samples)
        )
