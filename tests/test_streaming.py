"""Streaming recognition == offline greedy decoding; jitted steps and model helpers compile once."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspeech.decoding import transducer_beam, transducer_greedy
from jaxspeech.decoding.greedy import run_model_search
from jaxspeech.decoding.streaming import StreamingRecognizer
from jaxspeech.features import FeatureConfig, log_mel
from jaxspeech.models import TransducerConfig, TransformerTransducer

FEATS = FeatureConfig(n_mels=8)
CFG = TransducerConfig(
    num_mels=8,
    vocab_size=7,
    d_model=32,
    num_heads=2,
    mlp_dim=48,
    num_layers=2,
    subsampling_channels=4,
    chunk_size=2,  # 8 feature frames = 1280 samples per encoder chunk
    left_chunks=2,
    predictor_dim=16,
    joint_dim=16,
)
N = 5000  # 31 feature frames: 3 full encoder chunks and a partial one of 7 frames


@pytest.fixture(scope="module")
def model():
    m = TransformerTransducer(CFG, rngs=nnx.Rngs(0))
    m.eval()
    # A blank bias so the random model mixes blanks and labels (not max_symbols on every frame).
    m.joint.out.bias[...] = jnp.zeros((CFG.vocab_size,)).at[0].set(1.0)
    return m


@pytest.fixture(scope="module")
def audio():
    return 0.1 * np.asarray(jax.random.normal(jax.random.key(1), (2, N)), np.float32)


def offline(model, audio, num_samples):
    feats, frame_lengths = log_mel(audio, jnp.full((audio.shape[0],), num_samples), FEATS)
    tokens, lengths, scores = transducer_greedy(model, feats, frame_lengths)
    rows = [list(np.asarray(tokens[i, : int(lengths[i])])) for i in range(audio.shape[0])]
    return rows, np.asarray(scores)


def test_streaming_equals_offline(model, audio):
    want, want_scores = offline(model, audio, N)
    assert 0 < sum(map(len, want)) < 3 * 7 * 2  # labels and blanks both occur
    rec = StreamingRecognizer(model, FEATS)
    # 800 samples = 5 feature frames per step (encoder chunks complete mid-step, 0 or 1 per
    # step); 2560 = 16 frames = exactly 2 encoder chunks per step. The last chunk is partial.
    for chunk in (800, 2560):
        got, scores = rec.transcribe(audio, chunk)
        assert got == want, chunk
        np.testing.assert_allclose(scores, want_scores, rtol=1e-4)
        assert rec._step._cache_size() <= 2  # one per chunk shape, never per call

    # A shorter utterance (the same audio cut at 3000 samples, passed as num_samples) also matches.
    want_short, _ = offline(model, np.where(np.arange(N) < 3000, audio, 0.0), 3000)
    got_short, _ = rec.transcribe(audio, 800, num_samples=3000)
    assert got_short == want_short


def test_step_compiles_once_and_emits_incrementally(model, audio):
    rec = StreamingRecognizer(model, FEATS)
    state = rec.init(2)
    total = [0, 0]
    for start in range(0, 4800, 1600):
        state, tokens, num = rec.step(state, audio[:, start : start + 1600])
        assert tokens.shape == (2, 2 * CFG.chunk_size * 3)  # up to 2 encoder chunks per step
        assert np.all(np.asarray(tokens)[np.arange(2 * CFG.chunk_size * 3) >= num[:, None]] == 0)
        total = [t + int(n) for t, n in zip(total, num, strict=True)]
    state, tokens, num = rec.step(state, audio[:, :1600] * 0, 0)  # an empty final chunk
    assert np.all(np.asarray(num) == 0)
    assert rec._step._cache_size() == 1
    state, _, _ = rec.finalize(state)
    assert int(state.num_pending) == 0 and sum(total) > 0


def test_model_helpers_compile_once_per_shape(model, audio):
    feats, frame_lengths = log_mel(audio, jnp.array([N, 4000]), FEATS)
    g1 = transducer_greedy(model, feats, frame_lengths)
    compiled = run_model_search._cache_size()
    g2 = transducer_greedy(model, feats[::-1], frame_lengths[::-1])  # a new batch, same shapes
    assert run_model_search._cache_size() == compiled
    np.testing.assert_array_equal(g1[0][::-1], g2[0])
    b1 = transducer_beam(model, feats, frame_lengths, beam_size=1)
    np.testing.assert_array_equal(g1[0], b1[0])
    np.testing.assert_allclose(g1[2], b1[2], rtol=1e-5)
    b4 = transducer_beam(model, feats, frame_lengths, beam_size=4)
    assert np.all(np.asarray(b4[2]) >= np.asarray(g1[2]) - 1e-4)


def test_stateless_predictor(audio):
    """The int32 label-window state of the stateless predictor streams and beams as well."""
    m = TransformerTransducer(dataclasses.replace(CFG, predictor="stateless"), rngs=nnx.Rngs(1))
    m.eval()
    m.joint.out.bias[...] = jnp.zeros((CFG.vocab_size,)).at[0].set(1.0)
    want, want_scores = offline(m, audio, N)
    got, scores = StreamingRecognizer(m, FEATS).transcribe(audio, 1280)
    assert got == want and sum(map(len, want)) > 0
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4)
    feats, frame_lengths = log_mel(audio, jnp.array([N, N]), FEATS)
    b4 = transducer_beam(m, feats, frame_lengths, beam_size=4)
    assert np.all(np.asarray(b4[2]) >= want_scores - 1e-4)


@pytest.mark.parametrize("whole", [False, True])
def test_gated_encoder_streams_with_skipping(audio, whole):
    """With arbitrators, the recognizer skips gated-off components (per component, or whole
    blocks) and still equals offline greedy decoding, as does its masked execution."""
    cfg = dataclasses.replace(
        CFG, arbitrator="acoustic", arbitrator_dim=8, gate_init_bias=0.0, whole_block_gates=whole
    )
    m = TransformerTransducer(cfg, rngs=nnx.Rngs(2))
    m.eval()
    m.joint.out.bias[...] = jnp.zeros((CFG.vocab_size,)).at[0].set(1.0)
    feats, frame_lengths = log_mel(audio, jnp.full((2,), N), FEATS)
    _, _, trace = m.encode_with_trace(feats, frame_lengths)
    on = float(jnp.mean(trace.attn[:, :, : int(jnp.min(frame_lengths)) // 4] > 0.5))
    assert 0.1 < on < 0.9  # a real mixture of on and off components
    want, want_scores = offline(m, audio, N)
    for skip in (True, False):
        got, scores = StreamingRecognizer(m, FEATS, skip=skip).transcribe(audio, 800)
        assert got == want, skip
        np.testing.assert_allclose(scores, want_scores, rtol=1e-4)


def test_audio_too_short_for_an_encoder_frame(model, audio):
    """Under one encoder frame (4 feature frames, 640 samples), unpadded: offline greedy and beam
    emit nothing with score 0; an empty chunk streamed is a no-op."""
    for n in (0, 160, 480):
        feats, frame_lengths = log_mel(audio[:1, :n], jnp.array([n]), FEATS)
        for search in (transducer_greedy, transducer_beam):
            tokens, lengths, scores = search(model, feats, frame_lengths)
            assert int(lengths[0]) == 0 and float(scores[0]) == 0.0, (n, search.__name__)
    feats, frame_lengths = log_mel(audio[:1, :640], jnp.array([640]), FEATS)
    assert np.isfinite(transducer_greedy(model, feats, frame_lengths)[2]).all()
    rec = StreamingRecognizer(model, FEATS)
    state, _, num = rec.step(rec.init(2), audio[:, :1600])
    after, tokens, num = rec.step(state, audio[:, :0])
    assert np.all(np.asarray(num) == 0) and not np.asarray(tokens).any()
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)


def test_recognizers_take_the_models_mel_count(model, audio):
    """Without a feature config the offline and streaming recognizers use the model's num_mels (8
    here, not the default 80); a mismatched one is refused with the fix."""
    from jaxspeech.train.evaluate import Recognizer

    want, _ = offline(model, audio, N)
    assert Recognizer(model)(audio, np.array([N, N])) == want
    assert StreamingRecognizer(model).transcribe(audio, 800)[0] == want
    with pytest.raises(ValueError, match=r"pass FeatureConfig\(n_mels=8\)"):
        Recognizer(model, FeatureConfig())
