"""Static export of an arbitrator model: the choice from the gates' on-rates, and the pruned
plain model's encoder output against the gated model's under the same (static) gates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspeech.models import TransducerConfig, TransformerTransducer
from jaxspeech.train import static_export

CFG = TransducerConfig(
    vocab_size=12,
    d_model=32,
    num_heads=2,
    mlp_dim=48,
    num_layers=3,
    subsampling_channels=4,
    chunk_size=4,
    left_chunks=2,
    predictor_dim=16,
    joint_dim=16,
    arbitrator="acoustic",
    arbitrator_dim=8,
    gate_init_bias=0.0,
    compute_weight=0.1,
)
LENGTHS = jnp.array([128, 90])


@pytest.fixture(scope="module")
def batches():
    return [(jax.random.normal(jax.random.key(1), (2, 128, CFG.num_mels)), LENGTHS)]


def gated_model(seed=0):
    m = TransformerTransducer(CFG, rngs=nnx.Rngs(seed))
    m.eval()
    return m


def encoded(m, feats, lengths, **gates):
    enc, enc_lengths, _ = m.encode_with_trace(feats, lengths, **gates)
    valid = (jnp.arange(enc.shape[1])[None] < enc_lengths[:, None])[..., None]
    return np.asarray(jnp.where(valid, enc, 0.0))


def test_fixed_gates_export_exactly(batches):
    """Gates fixed by the arbitrator's output bias (layer 0 all on, layer 1 all off, layer 2
    FFN only): the choice, the pruned config, and the pruned model's output equals the gated
    model's own."""
    m = gated_model()
    m.encoder.arbitrator.logits.kernel[...] = jnp.zeros_like(
        m.encoder.arbitrator.logits.kernel[...]
    )
    m.encoder.arbitrator.logits.bias[...] = jnp.array([5.0, 5.0, -5.0, -5.0, -5.0, 5.0])
    choice = static_export.static_choice(m, batches)
    assert choice.attn == (True, False, False) and choice.ffn == (True, False, True)
    assert choice.layers == (0, 2) and choice.agreement == 1.0 and choice.partial() == []
    pruned = static_export.pruned_model(m, choice)
    cfg = pruned.cfg
    assert (cfg.num_layers, cfg.arbitrator, cfg.compute_weight) == (2, "none", 0.0)
    assert (cfg.static_attention, cfg.static_ffn) == ("10", "11")
    assert pruned.encoder.arbitrator is None
    feats, lengths = batches[0]
    np.testing.assert_allclose(
        encoded(pruned, feats, lengths), encoded(m, feats, lengths), atol=1e-5
    )


def test_mixed_gates_export_the_static_choice(batches):
    """Per-frame gates that differ from frame to frame: agreement below 1, and the pruned model
    equals the gated model run with the static gates (not its own)."""
    m = gated_model(seed=0)
    bias = jnp.array([0.0, 0.0, 3.0, 3.0, -3.0, -3.0])  # layer 0 mixed, 1 mostly on, 2 off
    m.encoder.arbitrator.logits.bias[...] = bias
    attn_on, ffn_on, frames = static_export.gate_rates(m, batches)
    assert frames == float(jnp.sum(LENGTHS // CFG.subsampling_factor))
    assert 0.05 < attn_on[0] < 0.95 and attn_on[1] > 0.5 and ffn_on[2] < 0.5
    choice = static_export.static_choice(m, batches, threshold=0.5)
    np.testing.assert_array_equal(choice.attn + choice.ffn, np.r_[attn_on, ffn_on] >= 0.5)
    partial = {(c, i) for c, i, _ in choice.partial()}
    assert ("attention", 0) in partial and ("ffn", 2) not in partial
    assert {(c, i) for c, i, _ in choice.partial(margin=0.5)} == set()
    # brute force: the share of valid (layer, component, frame) decisions equal to the choice
    feats, lengths = batches[0]
    _, enc_lengths, trace = m.encode_with_trace(feats, lengths)
    valid = np.arange(trace.attn.shape[-1])[None] < np.asarray(enc_lengths)[:, None]
    same = [
        (np.asarray(g) > 0.5) == np.array(kept)[:, None, None]
        for g, kept in ((trace.attn, choice.attn), (trace.ffn, choice.ffn))
    ]
    want = sum(s[:, valid].sum() for s in same) / (2 * CFG.num_layers * valid.sum())
    assert choice.agreement == pytest.approx(want) and choice.agreement < 1.0
    pruned = static_export.pruned_model(m, choice)
    gates = static_export.static_gates(choice, lengths // CFG.subsampling_factor, 32)
    fixed = encoded(m, feats, lengths, attn_gates=gates[0], ffn_gates=gates[1])
    np.testing.assert_allclose(encoded(pruned, feats, lengths), fixed, atol=1e-5)
    assert np.abs(encoded(m, feats, lengths) - fixed).max() > 1e-3  # its own gates differ


def test_bad_input_is_refused(batches):
    plain = TransformerTransducer(
        TransducerConfig(**{**CFG.__dict__, "arbitrator": "none", "compute_weight": 0.0}),
        rngs=nnx.Rngs(0),
    )
    with pytest.raises(ValueError, match="no gates"):
        static_export.static_choice(plain, batches)
    with pytest.raises(ValueError, match="threshold"):
        static_export.static_choice(gated_model(), batches, threshold=0.0)
    m = gated_model()
    m.encoder.arbitrator.logits.bias[...] = jnp.full((6,), -5.0)
    with pytest.raises(ValueError, match="keeps no component"):
        static_export.pruned_model(m, static_export.static_choice(m, batches))
