"""Log-mel features, SpecAugment and feature statistics, in JAX (run on the accelerator).

Framing is causal and streamable: the signal is left-padded with ``n_fft - hop_length`` zeros
and framed with ``center=False``, so frame ``k`` covers samples ``[(k+1)*hop - n_fft, (k+1)*hop)``
and an utterance of ``n`` samples has ``n // hop_length`` frames. A frame inside
``audio_lengths`` never reads padding, so batching does not change the features of an
utterance. The result equals::

    librosa.feature.melspectrogram(y=np.pad(y, (n_fft - hop, 0)), sr=16000, n_fft=512,
        win_length=400, hop_length=160, n_mels=80, center=False, power=2.0)

(slaney mel scale and area normalization, periodic hann window zero-padded to ``n_fft``) followed
by ``log(x + log_floor)``. A streaming front end carries the last ``FeatureConfig.left_context``
samples between chunks (`log_mel_chunk`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import librosa
import numpy as np

__all__ = [
    "FeatureConfig",
    "FeatureStats",
    "feature_moments",
    "feature_stats",
    "log_mel",
    "log_mel_chunk",
    "spec_augment",
]


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Log-mel front end; the defaults are the jaxspeech convention (10 ms hop, 25 ms window)."""

    sample_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float = 8000.0
    log_floor: float = 1e-6

    def __post_init__(self):
        if not 0 < self.hop_length <= self.win_length <= self.n_fft:
            raise ValueError(
                f"need 0 < hop_length <= win_length <= n_fft, got {self.hop_length}, "
                f"{self.win_length}, {self.n_fft}"
            )

    @property
    def left_context(self) -> int:
        """Samples of history a frame needs beyond its own hop (the causal left padding)."""
        return self.n_fft - self.hop_length

    def num_frames(self, num_samples):
        """Frames for ``num_samples`` samples (int or integer array): ``num_samples // hop``."""
        return num_samples // self.hop_length


@functools.lru_cache(maxsize=16)
def _constants(cfg: FeatureConfig) -> tuple[np.ndarray, np.ndarray]:
    """(window [n_fft], mel filterbank [n_fft//2+1, n_mels]) as float32 numpy constants."""
    window = librosa.filters.get_window("hann", cfg.win_length, fftbins=True)
    window = librosa.util.pad_center(window, size=cfg.n_fft)
    mel = librosa.filters.mel(
        sr=cfg.sample_rate,
        n_fft=cfg.n_fft,
        n_mels=cfg.n_mels,
        fmin=cfg.fmin,
        fmax=cfg.fmax,
        htk=False,
        norm="slaney",
        dtype=np.float64,
    )
    return window.astype(np.float32), np.ascontiguousarray(mel.T.astype(np.float32))


def _frames(audio: jax.Array, cfg: FeatureConfig, left: jax.Array | None = None) -> jax.Array:
    """Causal frames ``[B, T, n_fft]`` with ``T = N // hop``, from strided slices (no gather).

    ``left`` (``[B, left_context]``) is the audio before ``audio``; zeros when omitted.
    """
    batch, n = audio.shape
    hop = cfg.hop_length
    num = n // hop
    pieces = -(-cfg.n_fft // hop)  # each frame spans this many consecutive hops
    total = (num + pieces - 1) * hop
    if left is None:
        left = jnp.zeros((batch, cfg.left_context), audio.dtype)
    padded = jnp.concatenate([left, audio], axis=1)[:, :total]
    padded = jnp.pad(padded, ((0, 0), (0, total - padded.shape[1])))
    hops = padded.reshape(batch, num + pieces - 1, hop)
    frames = jnp.concatenate([hops[:, i : i + num] for i in range(pieces)], axis=-1)
    return frames[..., : cfg.n_fft]


def _log_mel_frames(frames: jax.Array, cfg: FeatureConfig) -> jax.Array:
    window, mel = _constants(cfg)
    spec = jnp.fft.rfft(frames * window, n=cfg.n_fft, axis=-1)
    power = jnp.square(spec.real) + jnp.square(spec.imag)
    mels = jnp.matmul(power, mel, precision=jax.lax.Precision.HIGHEST)
    return jnp.log(mels + cfg.log_floor)


def log_mel(
    audio: jax.Array, audio_lengths: jax.Array, cfg: FeatureConfig = FeatureConfig()
) -> tuple[jax.Array, jax.Array]:
    """Log-mel features of a padded batch.

    Args:
      audio: ``[B, N]`` float audio at ``cfg.sample_rate``, zero beyond ``audio_lengths``.
      audio_lengths: ``[B]`` valid samples per row.
      cfg: the front end (static under ``jax.jit``; it is hashable).

    Returns:
      ``(feats [B, N // hop, n_mels] float32, frame_lengths [B] int32)``; frames at or beyond
      ``frame_lengths`` are zero.
    """
    audio = jnp.asarray(audio, jnp.float32)
    feats = _log_mel_frames(_frames(audio, cfg), cfg)
    frame_lengths = cfg.num_frames(jnp.asarray(audio_lengths, jnp.int32))
    valid = jnp.arange(feats.shape[1])[None, :] < frame_lengths[:, None]
    return jnp.where(valid[..., None], feats, 0.0), frame_lengths


def log_mel_chunk(
    context: jax.Array, chunk: jax.Array, cfg: FeatureConfig = FeatureConfig()
) -> tuple[jax.Array, jax.Array]:
    """Streaming log-mel: features of the next ``chunk`` given the audio before it.

    Args:
      context: ``[B, cfg.left_context]`` the last samples before ``chunk``; zeros at the start of
        an utterance (``jnp.zeros((B, cfg.left_context))``).
      chunk: ``[B, S]`` new samples, ``S`` a multiple of ``hop_length``.

    Returns:
      ``(feats [B, S // hop, n_mels], new_context [B, left_context])``. Concatenating the features
      of consecutive chunks gives exactly `log_mel` of the whole utterance.
    """
    if chunk.shape[1] % cfg.hop_length:
        raise ValueError(f"chunk of {chunk.shape[1]} samples is not a multiple of the hop")
    chunk = jnp.asarray(chunk, jnp.float32)
    context = jnp.asarray(context, jnp.float32)
    feats = _log_mel_frames(_frames(chunk, cfg, context), cfg)
    joined = jnp.concatenate([context, chunk], axis=1)
    new_context = joined[:, joined.shape[1] - cfg.left_context :]  # (not -k: k may be 0)
    return feats, new_context


def _band_mask(key, size, lengths, num_masks, max_width):
    """``[B, size]`` bool union of ``num_masks`` bands per row, each of width uniform in
    ``{0..max_width[b]}`` and starting uniformly so that it lies inside ``[0, lengths[b])``."""
    k_width, k_start = jax.random.split(key)
    shape = (lengths.shape[0], num_masks)
    max_width = jnp.minimum(max_width, lengths)[:, None]
    width = jnp.floor(jax.random.uniform(k_width, shape) * (max_width + 1)).astype(jnp.int32)
    width = jnp.minimum(width, max_width)
    span = lengths[:, None] - width + 1
    start = jnp.floor(jax.random.uniform(k_start, shape) * span).astype(jnp.int32)
    start = jnp.minimum(start, span - 1)
    pos = jnp.arange(size)[None, None, :]
    inside = (pos >= start[..., None]) & (pos < (start + width)[..., None])
    return jnp.any(inside, axis=1)


def spec_augment(
    key: jax.Array,
    feats: jax.Array,
    frame_lengths: jax.Array,
    *,
    num_freq_masks: int = 2,
    max_freq_width: int = 27,
    num_time_masks: int = 10,
    max_time_frac: float = 0.05,
    mask_value: float | jax.Array | None = None,
) -> jax.Array:
    """SpecAugment with length-adaptive time masks (Park et al. 2019; 2020 "large scale" variant).

    Per example: ``num_freq_masks`` bands of width ``U{0..max_freq_width}`` over mel bins, and
    ``num_time_masks`` bands of width ``U{0..floor(max_time_frac * frame_length)}`` placed inside
    the valid frames. Frames beyond ``frame_lengths`` are returned unchanged. The mask counts are
    Python ints (static under ``jax.jit``); the result is a pure function of ``key``.

    Args:
      mask_value: what masked cells become. ``None``: the example's mean over its valid frames
        and bins. Pass the global feature mean (``[F]``) so masked cells normalize to zero.
    """
    batch, time, num_bins = feats.shape
    lengths = jnp.asarray(frame_lengths, jnp.int32)
    valid = jnp.arange(time)[None, :] < lengths[:, None]
    k_freq, k_time = jax.random.split(key)
    freq = _band_mask(
        k_freq,
        num_bins,
        jnp.full((batch,), num_bins, jnp.int32),
        num_freq_masks,
        jnp.full((batch,), max_freq_width, jnp.int32),
    )
    max_time_width = jnp.floor(max_time_frac * lengths).astype(jnp.int32)
    times = _band_mask(k_time, time, lengths, num_time_masks, max_time_width) & valid
    masked = (freq[:, None, :] | times[:, :, None]) & valid[:, :, None]
    if mask_value is None:
        count = jnp.maximum(lengths * num_bins, 1).astype(feats.dtype)
        total = jnp.sum(jnp.where(valid[..., None], feats, 0.0), axis=(1, 2))
        fill = (total / count)[:, None, None]
    else:
        fill = jnp.asarray(mask_value, feats.dtype)
    return jnp.where(masked, fill, feats)


@jax.jit
def feature_moments(feats: jax.Array, frame_lengths: jax.Array):
    """Per-bin ``(count, mean [F], m2 [F])`` over the valid frames of one batch, where ``m2`` is
    the sum of squared deviations from the batch mean (stable to merge, see `FeatureStats`)."""
    valid = (jnp.arange(feats.shape[1])[None, :] < frame_lengths[:, None])[..., None]
    count = jnp.sum(valid, dtype=jnp.float32)
    mean = jnp.sum(jnp.where(valid, feats, 0.0), axis=(0, 1)) / jnp.maximum(count, 1.0)
    m2 = jnp.sum(jnp.where(valid, jnp.square(feats - mean), 0.0), axis=(0, 1))
    return count, mean, m2


class FeatureStats:
    """Accumulates per-bin mean and std of log-mel features over batches (float64 on the host).

    Batches merge with Chan et al.'s parallel variance update, so the result does not depend on
    how the data was split. The trainer sets the model's global feature normalization from
    ``result()``::

        stats = FeatureStats()
        for batch in batches:
            stats.update(*log_mel(batch["audio"], batch["audio_lengths"], cfg))
        mean, std = stats.result()
    """

    def __init__(self, num_bins: int | None = None):
        self.count = 0.0
        self.mean = None if num_bins is None else np.zeros(num_bins)
        self.m2 = None if num_bins is None else np.zeros(num_bins)

    def update(self, feats, frame_lengths) -> FeatureStats:
        count, mean, m2 = jax.device_get(feature_moments(feats, jnp.asarray(frame_lengths)))
        return self.merge(float(count), np.asarray(mean, np.float64), np.asarray(m2, np.float64))

    def merge(self, count: float, mean: np.ndarray, m2: np.ndarray) -> FeatureStats:
        """Adds the moments of another part of the data (e.g. another process's accumulator)."""
        if count == 0:
            return self
        if self.mean is None or self.count == 0:
            self.count, self.mean, self.m2 = count, mean.copy(), m2.copy()
            return self
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + np.square(delta) * (self.count * count / total)
        self.count = total
        return self

    def result(self, min_std: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
        """``(mean [F], std [F])`` as float32; std is the population std floored at ``min_std``."""
        if not self.count:
            raise ValueError("FeatureStats.result() before any valid frame was accumulated")
        std = np.sqrt(self.m2 / self.count)
        return self.mean.astype(np.float32), np.maximum(std, min_std).astype(np.float32)


def feature_stats(feats, frame_lengths, min_std: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [F], std [F])`` over the valid frames of one batch (see `FeatureStats` for many)."""
    return FeatureStats().update(feats, frame_lengths).result(min_std)
