"""Audio decoding: any file soundfile reads (wav, flac, ogg, ...) -> float32 mono 16 kHz numpy.

Every failure to produce audio from a file (missing, unreadable, corrupt, empty, non-finite) is an
`AudioDecodeError` naming the file, so a data source can skip and count it (see
`jaxspeech.data.sources.SkipCorrupt`) instead of crashing a long training run.
"""

from __future__ import annotations

import io
import os

import numpy as np
import soundfile as sf
import soxr

__all__ = ["SAMPLE_RATE", "AudioDecodeError", "decode_audio", "load_audio", "to_float32"]

SAMPLE_RATE = 16000


class AudioDecodeError(Exception):
    """Audio that could not be decoded; ``path`` names the file (or ``"<bytes>"``)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # grain worker processes send their errors pickled
        return (AudioDecodeError, (self.path, self.reason))


def to_float32(
    samples: np.ndarray, sample_rate: int, target_rate: int = SAMPLE_RATE, *, name: str = "<array>"
) -> np.ndarray:
    """``[N]`` or ``[N, C]`` samples (integer PCM or float) -> float32 mono at ``target_rate``.

    Integer PCM is scaled by its full range (int16 / 32768; unsigned PCM such as uint8 is centred
    on its midpoint first); channels are averaged; resampling uses soxr (high quality); the result
    is clipped to [-1, 1].
    """
    x = np.asarray(samples)
    if np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(x.dtype)
        half = 2 ** (info.bits - 1)
        x = (x.astype(np.float64) - (half if info.min == 0 else 0)) / half
    x = x.astype(np.float32, copy=False)
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32)
    if x.ndim != 1:
        raise AudioDecodeError(name, f"expected [samples] or [samples, channels], got {x.shape}")
    if x.size == 0:
        raise AudioDecodeError(name, "no samples")
    if not np.all(np.isfinite(x)):
        raise AudioDecodeError(name, "non-finite samples (NaN or Inf)")
    if sample_rate != target_rate:
        x = soxr.resample(x, sample_rate, target_rate, quality="HQ").astype(np.float32, copy=False)
    return np.clip(x, -1.0, 1.0)


def load_audio(path: str | os.PathLike, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Reads an audio file as float32 mono at ``target_rate``; raises `AudioDecodeError`."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise AudioDecodeError(name, "file not found")
    try:
        samples, rate = sf.read(name, dtype="float32", always_2d=True)
    except Exception as e:  # any decoder failure (TypeError for headerless .raw, too)
        raise AudioDecodeError(name, f"unreadable audio ({type(e).__name__}: {e})") from e
    return to_float32(samples, rate, target_rate, name=name)


def decode_audio(
    data: bytes, target_rate: int = SAMPLE_RATE, *, name: str = "<bytes>"
) -> np.ndarray:
    """Decodes an encoded audio file held in memory (e.g. flac bytes); raises `AudioDecodeError`."""
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # as in `load_audio`
        raise AudioDecodeError(name, f"unreadable audio ({type(e).__name__}: {e})") from e
    return to_float32(samples, rate, target_rate, name=name)
