"""Chunked masks, causality, padding invariance, gates, and streaming == offline encoding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspeech.models import (
    ConvSubsampling,
    Encoder,
    TransducerConfig,
    TransformerTransducer,
    chunk_mask,
)

CFG = TransducerConfig(
    num_mels=8,
    vocab_size=7,
    d_model=32,
    num_heads=2,
    mlp_dim=48,
    num_layers=2,
    subsampling_channels=4,
    chunk_size=2,
    left_chunks=2,
    lookahead_chunks=0,
    predictor_dim=16,
    joint_dim=16,
    dropout=0.1,
)


def _model(**overrides):
    m = TransformerTransducer(dataclasses.replace(CFG, **overrides), rngs=nnx.Rngs(0))
    m.eval()
    return m


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def feats():
    return jax.random.normal(jax.random.key(7), (2, 64, CFG.num_mels))  # 16 encoder frames


@pytest.mark.parametrize("left,ahead", [(0, 0), (2, 0), (1, 1), (-1, 0), (-1, 2)])
def test_chunk_mask_matches_definition(left, ahead):
    c, t = 3, 14
    mask = np.asarray(chunk_mask(t, c, left, ahead))
    for i in range(t):
        for j in range(t):
            ci, cj = i // c, j // c
            expected = cj <= ci + ahead and (left < 0 or cj >= ci - left)
            assert mask[i, j] == expected, (i, j)


def test_subsampling_is_causal():
    sub = ConvSubsampling(CFG, rngs=nnx.Rngs(1))
    sub.eval()
    x = jax.random.normal(jax.random.key(2), (1, 32, CFG.num_mels))
    y, lengths = sub(x, jnp.array([30]))
    assert y.shape == (1, 8, CFG.d_model) and int(lengths[0]) == 7
    for k in [5, 12, 19]:
        y2, _ = sub(x.at[:, k].add(3.0), jnp.array([30]))
        changed = np.any(np.abs(np.asarray(y2 - y)) > 1e-6, axis=-1)[0]
        # Encoder frame t depends only on feature frames < 4 (t + 1).
        assert not changed[: k // 4].any() and changed[k // 4], (k, changed)


@pytest.mark.parametrize("left,ahead", [(1, 0), (0, 1)])
def test_encoder_chunk_receptive_field(left, ahead):
    """One layer: frames of chunk c change iff the input changes in chunks c-left..c+ahead."""
    cfg = dataclasses.replace(CFG, num_layers=1, left_chunks=left, lookahead_chunks=ahead)
    enc = Encoder(cfg, rngs=nnx.Rngs(3))
    enc.eval()
    x = jax.random.normal(jax.random.key(4), (1, 12, cfg.d_model))  # 6 chunks of 2
    run = jax.jit(lambda x: enc(x, jnp.array([12])))
    y = run(x)
    noise = jax.random.normal(jax.random.key(5), (1, 2, cfg.d_model))
    for src in range(6):
        x2 = x.at[:, 2 * src : 2 * src + 2].add(noise)
        diff = np.abs(np.asarray(run(x2) - y)).max(axis=(0, 2)).reshape(6, 2).max(-1)
        for c in range(6):
            sees = c - left <= src <= c + ahead
            assert (diff[c] > 1e-6) == sees, (src, c, diff)


@pytest.mark.parametrize("ahead", [0, 1])
def test_future_beyond_lookahead_does_not_change_outputs(ahead, feats):
    m = _model(lookahead_chunks=ahead)
    lengths = jnp.array([64, 64])
    enc, _ = jax.jit(m.encode)(feats, lengths)
    # Change features from encoder chunk 4 onwards (feature frame 4 * chunk_size * 4 = 32).
    enc2, _ = jax.jit(m.encode)(feats.at[:, 32:].set(5.0), lengths)
    diff = np.abs(np.asarray(enc2 - enc)).max(axis=(0, 2)).reshape(8, 2).max(-1)
    # Through 2 layers of lookahead the receptive field reaches 2 * ahead chunks ahead.
    unaffected = 4 - 2 * ahead
    assert np.all(diff[:unaffected] == 0.0), diff
    assert np.all(diff[4:] > 1e-4), diff
    if ahead:
        assert diff[3] > 1e-4, diff  # lookahead really looks ahead


def test_padding_invariance(model, feats):
    lengths = jnp.array([64, 37])
    enc, enc_lengths = jax.jit(model.encode)(feats, lengths)
    garbage = jnp.where(jnp.arange(64)[None, :, None] >= lengths[:, None, None], 1e3, feats)
    enc2, _ = jax.jit(model.encode)(garbage, lengths)
    np.testing.assert_array_equal(enc_lengths, [16, 9])
    np.testing.assert_allclose(enc2, enc, atol=1e-5)
    # Within a chunk frames attend to later frames of the same chunk, so padding must be masked:
    # the utterance cut at 37 frames differs from the full one even in its valid frames.
    full, _ = jax.jit(model.encode)(feats, jnp.array([64, 64]))
    assert not np.allclose(full[1, :9], enc[1, :9], atol=1e-4)


def _stream(m, x, lengths=None):
    step = jax.jit(lambda s, c, n: m.encode_step(s, c, n))
    state, outs = m.encode_init_state(x.shape[0]), []
    n = m.feat_chunk_size
    for i in range(x.shape[1] // n):
        chunk_len = None if lengths is None else jnp.clip(lengths - i * n, 0, n)
        state, out = step(state, x[:, i * n : (i + 1) * n], chunk_len)
        outs.append(out)
    return state, jnp.concatenate(outs, axis=1)


def test_streaming_equals_offline(model, feats):
    enc, _ = jax.jit(model.encode)(feats, jnp.array([64, 64]))
    _, streamed = _stream(model, feats)
    np.testing.assert_allclose(streamed, enc, atol=1e-5)


def test_encoder_step_takes_chunk_size_frames(model):
    """`Encoder.step` on a chunk of another width is refused (it silently gave wrong frames)."""
    enc = model.encoder
    state = enc.init_state(1)
    for width in (1, 2 * enc.chunk_size):
        with pytest.raises(ValueError, match=f"chunk_size = {enc.chunk_size} frames, got {width}"):
            enc.step(state, jnp.zeros((1, width, enc.d_model)), jnp.int32(0))


def test_streaming_partial_last_chunk(model, feats):
    lengths = jnp.array([64, 45])
    enc, enc_lengths = jax.jit(model.encode)(feats, lengths)
    _, streamed = _stream(model, feats, lengths)
    for b in range(2):
        n = int(enc_lengths[b])
        np.testing.assert_allclose(streamed[b, :n], enc[b, :n], atol=1e-5)


def test_unlimited_left_context_streaming():
    m = _model(left_chunks=-1, max_stream_frames=16)
    x = jax.random.normal(jax.random.key(8), (1, 64, CFG.num_mels))
    enc, _ = jax.jit(m.encode)(x, jnp.array([64]))
    _, streamed = _stream(m, x)
    np.testing.assert_allclose(streamed, enc, atol=1e-5)
    # Past max_stream_frames the oldest frames leave the window: the stream then equals the
    # offline model with left context max_stream_frames (same parameters).
    x_long = jax.random.normal(jax.random.key(9), (1, 128, CFG.num_mels))
    _, streamed = _stream(m, x_long)
    windowed = _model(left_chunks=16 // CFG.chunk_size)
    enc_windowed, _ = jax.jit(windowed.encode)(x_long, jnp.array([128]))
    np.testing.assert_allclose(streamed, enc_windowed, atol=1e-5)


def test_long_utterance_limited_context(model):
    """Far longer than any training length: offline and streamed agree and stay finite."""
    x = jax.random.normal(jax.random.key(10), (1, 1024, CFG.num_mels))  # 256 encoder frames
    enc, _ = jax.jit(model.encode)(x, jnp.array([1024]))
    assert np.all(np.isfinite(enc))
    state, streamed = _stream(model, x)
    assert int(state.offset) == 256
    np.testing.assert_allclose(streamed, enc, atol=1e-4)
    # Relative positions only: a shifted copy of the audio gives the same outputs once the
    # receptive field no longer touches the start (here after 2 layers x 3 chunks).
    shifted, _ = jax.jit(model.encode)(x[:, 512:], jnp.array([512]))
    np.testing.assert_allclose(shifted[:, 16:], enc[:, 128 + 16 :], atol=1e-4)


def test_gates(model, feats):
    lengths = jnp.array([64, 50])
    x, enc_lengths = model.subsampling(feats, lengths)
    encoder = jax.jit(model.encoder.__call__)
    ones = jnp.ones((CFG.num_layers, 2, x.shape[1]))
    np.testing.assert_allclose(
        encoder(x, enc_lengths, attn_gates=ones, ffn_gates=ones), encoder(x, enc_lengths), atol=1e-6
    )
    zeros = jnp.zeros_like(ones)
    np.testing.assert_allclose(
        encoder(x, enc_lengths, attn_gates=zeros, ffn_gates=zeros), model.encoder.norm(x), atol=1e-5
    )
    # A gate of 0 on one frame's FFN in the last layer only changes that frame.
    ffn = ones.at[-1, 0, 5].set(0.0)
    diff = np.abs(np.asarray(encoder(x, enc_lengths, ffn_gates=ffn) - encoder(x, enc_lengths)))
    changed = diff.max(-1) > 1e-6
    assert changed[0, 5] and changed.sum() == 1
    # The streaming step takes the same gates, chunk by chunk.
    gates = jax.random.uniform(jax.random.key(11), ones.shape)
    offline = encoder(x, jnp.array([16, 16]), attn_gates=gates, ffn_gates=1.0 - gates)
    caches, outs, c = model.encoder.init_state(2), [], CFG.chunk_size
    step = jax.jit(model.encoder.step)
    for i in range(x.shape[1] // c):
        g = gates[:, :, i * c : (i + 1) * c]
        caches, out = step(
            caches, x[:, i * c : (i + 1) * c], jnp.int32(i * c), attn_gates=g, ffn_gates=1.0 - g
        )
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), offline, atol=1e-5)


@pytest.mark.parametrize("left", [1, -1])
def test_streaming_with_lookahead_equals_offline(left, feats):
    """Outputs lag by num_layers * lookahead chunks; after flushing they equal `encode`."""
    m = _model(lookahead_chunks=1, left_chunks=left, max_stream_frames=8)
    delay = m.stream_delay_chunks
    assert delay == CFG.num_layers
    lengths = jnp.array([64, 45])
    x = jnp.concatenate([feats, jnp.zeros((2, delay * m.feat_chunk_size, CFG.num_mels))], axis=1)
    _, streamed = _stream(m, x, lengths)
    streamed = streamed[:, delay * CFG.chunk_size :]
    windowed = _model(lookahead_chunks=1, left_chunks=left if left >= 0 else 4)
    enc, enc_lengths = jax.jit(windowed.encode)(feats, lengths)
    for b in range(2):
        n = int(enc_lengths[b])
        np.testing.assert_allclose(streamed[b, :n], enc[b, :n], atol=1e-5)
