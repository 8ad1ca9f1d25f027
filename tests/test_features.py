"""Log-mel against librosa, SpecAugment masks, feature statistics against numpy."""

import functools

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest

from jaxspeech.features import (
    FeatureConfig,
    FeatureStats,
    feature_stats,
    log_mel,
    log_mel_chunk,
    spec_augment,
)

CFG = FeatureConfig()
_log_mel = jax.jit(log_mel, static_argnums=2)


def _librosa_log_mel(y, cfg=CFG):
    """The contract's reference, in float64: causal left padding then center=False."""
    y = np.pad(np.asarray(y, np.float64), (cfg.n_fft - cfg.hop_length, 0))
    mel = librosa.feature.melspectrogram(
        y=y,
        sr=cfg.sample_rate,
        n_fft=cfg.n_fft,
        win_length=cfg.win_length,
        hop_length=cfg.hop_length,
        n_mels=cfg.n_mels,
        fmin=cfg.fmin,
        fmax=cfg.fmax,
        center=False,
        power=2.0,
    )
    return mel.T, np.log(mel.T + cfg.log_floor)


def _signals():
    rng = np.random.default_rng(0)
    n = 16000 + 77
    t = np.arange(n) / 16000
    chirp = 0.5 * np.sin(2 * np.pi * (200 + 3000 * t) * t) + 0.05 * rng.standard_normal(n)
    chirp[4000:6000] = 0.0  # exact silence: log(log_floor)
    chirp[9000:9300] *= 1e-4
    tone = 0.9 * np.sin(2 * np.pi * 1000 * t)  # deep spectral valleys next to a loud peak
    return [chirp.astype(np.float32), tone.astype(np.float32)]


# Tolerance: float32 FFT + matmul vs librosa in float64. The mel power has relative error ~1e-5
# (observed 1.2e-5 on noise, a few e-6 typical); in log space that is the same absolute error
# wherever mel >> log_floor. In bins ~80 dB below a loud frame's peak, where mel ~ log_floor, the
# float32 rounding of the loud bins' leakage dominates: observed 1.6e-4 for a 0.9-amplitude tone.
# So: |log diff| < 1e-3 everywhere, and < 1e-4 where the reference mel power exceeds 1e-3.
@pytest.mark.parametrize("which", [0, 1])
def test_log_mel_matches_librosa(which):
    y = _signals()[which]
    feats, lengths = _log_mel(jnp.asarray(y)[None], jnp.array([y.size]), CFG)
    mel, ref = _librosa_log_mel(y)
    assert feats.shape == (1, y.size // 160, 80) == (1,) + ref.shape
    assert int(lengths[0]) == CFG.num_frames(y.size) == ref.shape[0]
    diff = np.abs(np.asarray(feats[0]) - ref)
    assert diff.max() < 1e-3
    assert diff[mel > 1e-3].max() < 1e-4


def test_log_mel_batch_padding_and_causality():
    """A padded batch gives each row's own features; padding frames are zero; frames are causal."""
    chirp, tone = _signals()
    n_short = 9_999
    audio = np.zeros((2, chirp.size), np.float32)
    audio[0] = chirp
    audio[1, :n_short] = tone[:n_short]
    feats, lengths = _log_mel(jnp.asarray(audio), jnp.array([chirp.size, n_short]), CFG)
    np.testing.assert_array_equal(lengths, [chirp.size // 160, n_short // 160])
    alone, _ = _log_mel(jnp.asarray(tone[None, :n_short]), jnp.array([n_short]), CFG)
    np.testing.assert_allclose(feats[1, : lengths[1]], alone[0], atol=1e-5)
    assert np.all(np.asarray(feats[1, lengths[1] :]) == 0.0)
    # Frame k depends only on samples < (k + 1) * hop: changing later samples leaves it alone.
    k = 40
    changed = chirp.copy()
    changed[(k + 1) * 160 :] = 0.3
    a, _ = _log_mel(jnp.asarray(chirp[None]), jnp.array([chirp.size]), CFG)
    b, _ = _log_mel(jnp.asarray(changed[None]), jnp.array([chirp.size]), CFG)
    np.testing.assert_array_equal(a[0, : k + 1], b[0, : k + 1])
    assert not np.allclose(a[0, k + 1], b[0, k + 1])


@pytest.mark.parametrize("cfg", [CFG, FeatureConfig(n_fft=256, win_length=256, hop_length=256)])
def test_log_mel_chunk_streams_exactly(cfg):
    """Chunk by chunk, carrying left_context samples, equals log_mel on the whole utterance
    (also with frames that do not overlap: no context to carry)."""
    chirp, tone = _signals()
    size = 32 * 160  # 32 frames of CFG, 20 of the other
    n = 3 * size
    audio = jnp.asarray(np.stack([chirp[:n], tone[:n]]))
    offline, _ = _log_mel(audio, jnp.array([n, n]), cfg)
    step = jax.jit(log_mel_chunk, static_argnums=2)
    context = jnp.zeros((2, cfg.left_context))
    parts = []
    for start in range(0, n, size):
        feats, context = step(context, audio[:, start : start + size], cfg)
        assert context.shape == (2, cfg.left_context)
        parts.append(feats)
    np.testing.assert_allclose(np.concatenate(parts, axis=1), offline, atol=1e-5)
    with pytest.raises(ValueError, match="not a multiple of the hop"):
        log_mel_chunk(context, audio[:, :100], cfg)


def test_log_mel_short_input():
    feats, lengths = _log_mel(jnp.zeros((2, 100)), jnp.array([100, 50]), CFG)
    assert feats.shape == (2, 0, 80)
    np.testing.assert_array_equal(lengths, [0, 0])


def _augment(key, feats, lengths, **kw):
    fn = jax.jit(functools.partial(spec_augment, **kw))
    return np.asarray(fn(key, feats, lengths))


def test_spec_augment_masks():
    batch, time, bins = 16, 200, 80
    rng = np.random.default_rng(1)
    feats = jnp.asarray(rng.uniform(1.0, 2.0, (batch, time, bins)), jnp.float32)
    lengths = jnp.asarray(rng.integers(40, time + 1, batch), jnp.int32)
    feats = jnp.where((jnp.arange(time)[None, :] < lengths[:, None])[..., None], feats, 0.0)
    kw = dict(num_freq_masks=2, max_freq_width=27, num_time_masks=3, max_time_frac=0.05)
    out = _augment(jax.random.key(0), feats, lengths, mask_value=-7.0, **kw)
    np.testing.assert_array_equal(
        out, _augment(jax.random.key(0), feats, lengths, mask_value=-7.0, **kw)
    )
    assert not np.array_equal(
        out, _augment(jax.random.key(1), feats, lengths, mask_value=-7.0, **kw)
    )
    masked = out == -7.0
    unmasked = np.asarray(feats)
    for b in range(batch):
        n = int(lengths[b])
        assert not masked[b, n:].any() and np.all(out[b, n:] == 0.0)  # padding untouched
        np.testing.assert_array_equal(out[b][~masked[b]], unmasked[b][~masked[b]])
        valid = masked[b, :n]
        freq_cols = valid.all(axis=0)  # masked bins are masked in every valid frame
        time_rows = valid.all(axis=1)
        # Every masked cell is explained by a masked bin or a masked frame.
        np.testing.assert_array_equal(valid, freq_cols[None, :] | time_rows[:, None])
        assert freq_cols.sum() <= 2 * 27
        assert time_rows.sum() <= 3 * int(0.05 * n)
        for runs, limit in ((freq_cols, 27), (time_rows, int(0.05 * n))):
            edges = np.diff(np.concatenate([[0], runs.astype(int), [0]]))
            widths = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
            assert len(widths) <= (2 if runs is freq_cols else 3)
            assert np.all(widths <= 2 * limit)  # two bands may touch
    # Widths are uniform in {0..max}: over many examples the mean is about max / 2 per band.
    mean_freq = masked[:, 0, :].sum(1).mean()
    assert 10 < mean_freq < 54


def test_spec_augment_default_fill_is_utterance_mean():
    rng = np.random.default_rng(4)
    feats = jnp.asarray(rng.normal(2.0, 1.0, (1, 100, 80)), jnp.float32).at[0, 50:].set(0.0)
    out = _augment(
        jax.random.key(3),
        feats,
        jnp.array([50]),
        num_freq_masks=2,
        max_freq_width=40,
        num_time_masks=2,
        max_time_frac=0.2,
    )
    mean = np.asarray(feats[0, :50]).mean()
    changed = out != np.asarray(feats)
    assert changed.any()
    np.testing.assert_allclose(out[changed], mean, rtol=1e-5)
    assert np.all(out[0, 50:] == 0.0)


def test_feature_stats_match_numpy():
    rng = np.random.default_rng(2)
    acc = FeatureStats()
    rows = []
    for offset in (0.0, 5.0, -3.0):  # batches with different means exercise the merge
        feats = rng.normal(offset, 2.0, (4, 30, 80)).astype(np.float32)
        lengths = rng.integers(1, 31, 4)
        acc.update(jnp.asarray(feats), lengths)
        rows += [feats[b, : lengths[b]] for b in range(4)]
    frames = np.concatenate(rows).astype(np.float64)
    mean, std = acc.result()
    np.testing.assert_allclose(mean, frames.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std, frames.std(0), rtol=1e-5)
    one_mean, one_std = feature_stats(jnp.asarray(frames[None]), np.array([len(frames)]))
    np.testing.assert_allclose(one_mean, frames.mean(0), atol=1e-4)
    np.testing.assert_allclose(one_std, frames.std(0), rtol=1e-4)
    with pytest.raises(ValueError, match="before any valid frame"):
        FeatureStats().result()
