"""In-place self-distillation of a gated encoder (`model.full_pass_weight`, `model.distill_weight`):
the ungated pass's terms against the ungated model and a hand-computed KL, the teacher's
stop-gradient, the combined loss, and a real train step."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_arbitrator import CFG as ARB_CFG  # tests/test_arbitrator.py

from jaxspeech import features, pyfile
from jaxspeech.models import TransducerConfig, TransformerTransducer
from jaxspeech.models.attention import length_mask
from jaxspeech.train import loop, sharding
from jaxspeech.train import state as state_lib
from jaxspeech.train import step as step_lib

# The arbitrator tests' tiny model, without arbitrators (static pruning needs none), with a CTC
# head (the KL reads it) and no dropout (the two passes comparable).
CFG = dataclasses.replace(ARB_CFG, arbitrator="none", dropout=0.0, ctc_weight=0.5)
WEIGHTS = dict(full_pass_weight=0.7, distill_weight=1.3)
LENGTHS = jnp.array([128, 90])
LABELS = jnp.array([[3, 4, 5, 6, 7], [1, 2, 3, 0, 0]])
LABEL_LENGTHS = jnp.array([5, 3])


def _model(**overrides) -> TransformerTransducer:
    fields = {**CFG.__dict__, **WEIGHTS, **overrides}
    m = TransformerTransducer(TransducerConfig(**fields), rngs=nnx.Rngs(0))
    m.eval()
    return m


@pytest.fixture(scope="module")
def feats():
    return jax.random.normal(jax.random.key(1), (2, 128, CFG.num_mels))


def _terms(model, feats):
    graphdef, state = nnx.split(model)
    run = lambda s, x: nnx.merge(graphdef, s).loss_terms(x, LENGTHS, LABELS, LABEL_LENGTHS)
    return jax.jit(run)(state, feats)


def test_full_pass_is_the_ungated_model_and_distill_is_the_ctc_kl(feats):
    # Static pruning: attention off in layer 0, FFN off in layer 1.
    gated = _model(static_attention="01", static_ffn="10")
    terms = _terms(gated, feats)
    plain = _model(full_pass_weight=0.0, distill_weight=0.0)  # same seed: the same weights
    ref = _terms(plain, feats)
    np.testing.assert_allclose(terms["rnnt_full"], ref["rnnt"], rtol=1e-5)
    np.testing.assert_allclose(terms["ctc_full"], ref["ctc"], rtol=1e-5)
    assert not np.allclose(terms["rnnt"], ref["rnnt"], rtol=1e-3)  # the gated pass differs
    # The KL by hand, from the two encoders' outputs.
    enc_g, n = gated.encode(feats, LENGTHS)
    enc_f, _ = plain.encode(feats, LENGTHS)
    p = np.asarray(jax.nn.softmax(plain.ctc_head(enc_f)), np.float64)
    q = np.asarray(jax.nn.softmax(gated.ctc_head(enc_g)), np.float64)
    kl = np.sum(p * (np.log(p) - np.log(q)), axis=-1) * np.asarray(length_mask(n, p.shape[1]))
    np.testing.assert_allclose(terms["distill"], kl.sum(axis=1), rtol=1e-4)
    assert float(jnp.min(terms["distill"])) > 0
    # The combined loss weighs each term as documented.
    want = (
        terms["rnnt"] + 0.5 * terms["ctc"] + 0.7 * (terms["rnnt_full"] + 0.5 * terms["ctc_full"])
        + 1.3 * terms["distill"]
    )  # fmt: skip
    np.testing.assert_allclose(gated.combine_loss_terms(terms), want, rtol=1e-6)


def test_all_gates_on_makes_the_distill_term_zero(feats):
    terms = _terms(_model(arbitrator="acoustic", gate_init_bias=50.0), feats)
    np.testing.assert_allclose(terms["distill"], 0.0, atol=1e-5)
    np.testing.assert_allclose(terms["rnnt_full"], terms["rnnt"], rtol=1e-5)


def test_the_teacher_gets_no_gradient_from_the_distill_term(feats):
    # Layer 0's attention runs only in the ungated (teacher) pass: the KL cannot reach it, while
    # the full pass's own loss does.
    model = _model(static_attention="01", static_ffn="11")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def grads(name):
        def f(p):
            m = nnx.merge(graphdef, p, rest)
            return jnp.sum(m.loss_terms(feats, LENGTHS, LABELS, LABEL_LENGTHS)[name])

        g = jax.jit(jax.grad(f))(params)
        attn0 = jax.tree.leaves(g["encoder"]["blocks"][0]["attn"])
        ffn1 = jax.tree.leaves(g["encoder"]["blocks"][1]["ffn"])
        return max(float(jnp.max(jnp.abs(x))) for x in attn0), max(
            float(jnp.max(jnp.abs(x))) for x in ffn1
        )

    attn0, ffn1 = grads("distill")
    assert attn0 == 0.0 and ffn1 > 0  # the student side (used by both passes) does learn
    assert grads("rnnt_full")[0] > 0


def test_config_validation():
    with pytest.raises(ValueError, match="need a gated encoder"):
        _model(full_pass_weight=1.0, distill_weight=0.0)
    with pytest.raises(ValueError, match="ctc_weight"):
        _model(arbitrator="acoustic", ctc_weight=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        _model(arbitrator="acoustic", distill_weight=-1.0)


@pytest.mark.slow
def test_train_step_reports_the_distillation_terms():
    """One real jitted train step of `commands_arbitrator.py:tiny,arbitrator,2,distill` (without a
    temperature schedule: the gates' RNG state must still be traced in the loss)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = pyfile.load(os.path.join(root, "experiments", "commands_arbitrator.py")).get_config(
        "tiny,arbitrator,2,distill"
    )
    assert config.model.full_pass_weight == 1.0 and config.model.distill_weight > 0
    config.model.ctc_weight = 0.3  # the tiny model has no CTC head; the KL needs one
    mesh, rules = sharding.make_mesh(config.mesh), sharding.axis_rules(config.mesh)
    model_cfg = state_lib.model_config(config.model, vocab_size=CFG.vocab_size)
    tx, schedule = state_lib.make_optimizer(config.optim, 4)
    graphdef, state, shardings = state_lib.create_train_state(model_cfg, tx, mesh, rules)
    train_step = step_lib.make_train_step(
        graphdef, tx, schedule, feature_cfg=features.FeatureConfig(),
        state_shardings=shardings, batch_sharding=sharding.batch_sharding(mesh, rules),
        compute_ramp=loop._compute_ramp(model_cfg, config.train),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    batch = {
        "audio": (0.1 * rng.standard_normal((4, 8000))).astype(np.float32),
        "audio_lengths": np.array([8000, 6000, 7000, 5000], np.int32),
        "labels": np.array([[3, 4, 5], [1, 2, 0], [6, 7, 8], [9, 0, 0]], np.int32),
        "label_lengths": np.array([3, 2, 3, 1], np.int32),
    }
    state, metrics = train_step(state, batch)
    for name in ("rnnt_full", "distill", "compute"):
        assert np.isfinite(float(metrics[name])), name
    assert float(metrics["rnnt_full"]) > 0 and float(metrics["distill"]) >= 0
    assert float(metrics["finite"]) == 1.0
