"""Difficulty knobs and signal augmentation: speed perturbation, level, additive noise at an SNR.

Every knob that makes the corpus harder or easier lives in `Difficulty`; the defaults are
documented field by field. All randomness comes from a `numpy.random.Generator` that the caller
seeds per example (base seed + split + example index), so results do not depend on scheduling.

SNR definition: 10*log10(mean(clean**2) / mean(noise**2)) over the whole utterance (clean speech
including its short silence pads), measured on the 16 kHz float signals before int16 conversion.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import soxr

SAMPLE_RATE = 16000
NOISE_KINDS = ("white", "pink", "babble")


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """Knobs of the corpus' difficulty (ranges are uniform [low, high])."""

    # espeak speaking rate in words per minute (espeak's normal is 175).
    rate_wpm: tuple[int, int] = (145, 205)
    # espeak base pitch 0-100 (50 = the voice's normal): per-utterance pitch variation.
    pitch: tuple[int, int] = (30, 70)
    # espeak pitch range 0-100 (0 = monotone, 50 = normal intonation).
    pitch_range: tuple[int, int] = (30, 80)
    # Speed perturbation factor (tempo and pitch together, by resampling); >1 is faster.
    speed: tuple[float, float] = (0.95, 1.05)
    # Silence added before and after the speech, seconds.
    pad_s: tuple[float, float] = (0.05, 0.3)
    # RMS level of the clean speech in dBFS.
    level_dbfs: tuple[float, float] = (-32.0, -18.0)
    # Share of utterances left clean (their `snr` is +inf).
    clean_fraction: float = 0.3
    # SNR range in dB for the noisy ones.
    snr_db: tuple[float, float] = (10.0, 35.0)
    # Probabilities of each noise kind (white, pink, babble) for the noisy ones.
    noise_mix: tuple[float, float, float] = (0.25, 0.35, 0.4)
    # Babble: number of overlapping talkers drawn from the babble pool.
    babble_talkers: tuple[int, int] = (3, 7)


def uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def resample_with_speed(audio: np.ndarray, in_rate: int, speed: float) -> np.ndarray:
    """Resample int16/float audio at `in_rate` to 16 kHz float32 in [-1, 1], played `speed` times
    faster (duration / speed, pitch * speed): one soxr call does both."""
    x = audio.astype(np.float32)
    if audio.dtype == np.int16:
        x /= 32768.0
    return soxr.resample(x, in_rate, SAMPLE_RATE / speed).astype(np.float32)


def power(x: np.ndarray) -> float:
    return float(np.mean(np.square(x, dtype=np.float64)))


def set_level(x: np.ndarray, dbfs: float) -> np.ndarray:
    return (x * (10.0 ** (dbfs / 20.0) / math.sqrt(max(power(x), 1e-20)))).astype(np.float32)


def white_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal(n).astype(np.float32)


def pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """1/f power spectrum noise by shaping white noise in the frequency domain."""
    size = 1 << max(n - 1, 1).bit_length()  # a power of two: fast FFT
    spec = np.fft.rfft(rng.standard_normal(size))
    freqs = np.arange(spec.size, dtype=np.float64)
    freqs[0] = 1.0
    pink = np.fft.irfft(spec / np.sqrt(freqs), size)[:n]
    return (pink / math.sqrt(max(power(pink), 1e-20))).astype(np.float32)


def babble_noise(
    rng: np.random.Generator, n: int, pool: list[np.ndarray], talkers: tuple[int, int]
) -> np.ndarray:
    """Sum of several pool utterances (each at unit power, tiled and randomly shifted)."""
    if not pool:
        raise ValueError("babble noise needs a non-empty pool of utterances")
    count = int(rng.integers(talkers[0], talkers[1] + 1))
    out = np.zeros(n, np.float32)
    for idx in rng.choice(len(pool), size=min(count, len(pool)), replace=False):
        src = pool[int(idx)]
        tiled = np.tile(src, n // src.size + 2)
        start = int(rng.integers(src.size))
        out += tiled[start : start + n] / math.sqrt(max(power(src), 1e-20))
    return out


def make_noise(
    kind: str,
    rng: np.random.Generator,
    n: int,
    babble_pool: list[np.ndarray],
    difficulty: Difficulty,
) -> np.ndarray:
    if kind == "white":
        return white_noise(rng, n)
    if kind == "pink":
        return pink_noise(rng, n)
    if kind == "babble":
        return babble_noise(rng, n, babble_pool, difficulty.babble_talkers)
    raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KINDS}")


def mix_at_snr(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """clean + g * noise with g chosen so that power(clean) / power(g * noise) is `snr_db`."""
    if noise.shape != clean.shape:
        raise ValueError(f"clean {clean.shape} and noise {noise.shape} shapes differ")
    gain = math.sqrt(power(clean) / (max(power(noise), 1e-20) * 10.0 ** (snr_db / 10.0)))
    return (clean + gain * noise).astype(np.float32)


def to_int16(x: np.ndarray) -> np.ndarray:
    """Float [-1, 1] to int16; the whole signal is scaled down first if it would clip (so the
    SNR of a mix is unchanged)."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > 0.999:
        x = x * (0.999 / peak)
    return np.round(x * 32767.0).astype(np.int16)


def perturb_and_mix(
    raw: np.ndarray,
    in_rate: int,
    rng: np.random.Generator,
    difficulty: Difficulty,
    babble_pool: list[np.ndarray],
) -> tuple[np.ndarray, np.ndarray, float, str]:
    """The augmentation chain for one synthesized utterance.

    Returns (audio int16 16 kHz, clean float32 16 kHz before noise, snr_db (+inf if clean),
    noise kind ("none" if clean)).
    """
    speech = resample_with_speed(raw, in_rate, uniform(rng, difficulty.speed))
    pads = [int(uniform(rng, difficulty.pad_s) * SAMPLE_RATE) for _ in range(2)]
    clean = set_level(np.pad(speech, pads), uniform(rng, difficulty.level_dbfs))
    if rng.random() < difficulty.clean_fraction:
        return to_int16(clean), clean, math.inf, "none"
    kind = NOISE_KINDS[
        int(
            rng.choice(
                len(NOISE_KINDS), p=np.asarray(difficulty.noise_mix) / sum(difficulty.noise_mix)
            )
        )
    ]
    snr = uniform(rng, difficulty.snr_db)
    noise = make_noise(kind, rng, clean.size, babble_pool, difficulty)
    return to_int16(mix_at_snr(clean, noise, snr)), clean, snr, kind
