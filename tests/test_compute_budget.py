"""The compute budget (`model.compute_target`): the batch-mean hinge against a hand computation,
no pressure within the budget, the plain compute loss's gradient above it, padding rows left
out, the model's loss using it in place of the compute price, and the annealed budget
(`train.budget_anneal`)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_arbitrator import CFG, LENGTHS, _model  # tests/test_arbitrator.py

from jaxspeech.models import flops
from jaxspeech.models.arbitrator import budget_anneal
from jaxspeech.train import loop
from jaxspeech.train import step as step_lib

LABELS, LABEL_LENGTHS = jnp.array([[1, 2, 3], [4, 5, 0]]), jnp.array([3, 2])


def test_budget_excess_is_the_batch_means_hinge():
    fraction = jnp.array([0.5, 0.3, 0.9, 0.0])
    valid = jnp.array([True, True, True, False])  # the last row pads the batch
    mean = (0.5 + 0.3 + 0.9) / 3
    over = flops.budget_excess(fraction, valid, 0.4)
    np.testing.assert_allclose(jnp.sum(over) / 3, mean - 0.4, rtol=1e-6)
    np.testing.assert_allclose(over, [0.1, -0.1, 0.5, 0.0], atol=1e-6)
    # Over the budget: each valid utterance's gradient is the plain compute loss's.
    grad = jax.grad(lambda f: jnp.sum(flops.budget_excess(f, valid, 0.4)))(fraction)
    np.testing.assert_array_equal(grad, [1.0, 1.0, 1.0, 0.0])
    # Within it (the padding row's 0 does not pull the mean down): zero, and no gradient.
    within = flops.budget_excess(fraction, valid, 0.6)
    np.testing.assert_array_equal(within, np.zeros(4))
    grad = jax.grad(lambda f: jnp.sum(flops.budget_excess(f, valid, 0.6)))(fraction)
    np.testing.assert_array_equal(grad, np.zeros(4))
    # The mean is over the valid rows only (0.567 binds a budget of 0.42); counting the padding
    # row would give 0.425, within a budget of 0.43.
    assert float(jnp.sum(flops.budget_excess(fraction, valid, 0.42))) > 0
    assert float(jnp.sum(flops.budget_excess(fraction, jnp.ones(4, bool), 0.43))) == 0


@pytest.fixture(scope="module")
def feats():
    return jax.random.normal(jax.random.key(1), (2, 128, CFG.num_mels))


def _sums(model, feats, scale=None, target=None):
    """The train step's loss sums (`step._loss_sums`) and the gradient of their total."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = {"labels": LABELS, "label_lengths": LABEL_LENGTHS, "audio_lengths": jnp.array([1, 1])}

    def run(p):
        model = nnx.merge(graphdef, p, rest)
        return step_lib._loss_sums(model, batch, feats, LENGTHS, scale, compute_target=target)

    return jax.jit(run)(params), jax.jit(jax.grad(lambda p: run(p)[0]))(params)


def _arbitrator_grad(grads):
    g = grads["encoder"]["arbitrator"]
    g = {k: v for k, v in g.items() if k != "temperature"}
    return np.concatenate([np.ravel(v) for v in jax.tree.leaves(g)])


def test_the_loss_pays_only_the_excess_over_the_budget(feats):
    """Straight-through gates (deterministic), no dropout: the same gates in every model."""
    common = dict(compute_weight=50.0, gate_estimator="st", dropout=0.0)
    price = _model(**common)
    price.train()
    (total, _, _, terms), g_price = _sums(price, feats)
    mean = float(jnp.sum(terms["compute"])) / 2
    assert 0.2 < mean < 1.0
    # A budget above the mean: only the task loss is paid, and no compute gradient.
    slack = _model(**common, compute_target=min(1.0, mean + 0.1))
    slack.train()
    (total_s, _, _, terms_s), g_slack = _sums(slack, feats)
    np.testing.assert_allclose(terms_s["compute"], terms["compute"], rtol=1e-6)  # raw: reported
    np.testing.assert_allclose(float(terms_s["compute_excess"]), 0.0, atol=1e-7)
    np.testing.assert_allclose(total_s, terms["rnnt"], rtol=1e-6)
    task = _model(**{**common, "compute_weight": 0.0})
    task.train()
    (_, _, _, _), g_task = _sums(task, feats)
    np.testing.assert_allclose(_arbitrator_grad(g_slack), _arbitrator_grad(g_task), atol=1e-6)
    # A budget below it: the excess, weighted; the gradient is the price's (the offset has none).
    binding = _model(**common, compute_target=mean - 0.1)
    binding.train()
    (total_b, _, _, terms_b), g_binding = _sums(binding, feats)
    np.testing.assert_allclose(float(terms_b["compute_excess"]) / 2, 0.1, rtol=1e-4)
    np.testing.assert_allclose(total_b, total - 50.0 * 2 * (mean - 0.1), rtol=1e-5)
    np.testing.assert_allclose(
        _arbitrator_grad(g_binding), _arbitrator_grad(g_price), rtol=1e-4, atol=1e-6
    )
    # The compute ramp scales the budget's term like the price's.
    (total_half, *_), _ = _sums(binding, feats, scale=0.5)
    np.testing.assert_allclose(total_half, terms["rnnt"] + 25.0 * 2 * 0.1, rtol=1e-4)


def test_an_annealed_budget_is_the_cubic_of_gradual_pruning(feats):
    """train.budget_anneal = (start, steps): 1 until start, then C + (1 - C)(1 - p)^3, C after;
    the train step's override of the budget gives the loss of a model built with that budget."""
    budget = budget_anneal(0.4, 10, 20, num_steps=50, hard_steps=20)
    want = [1.0, 1.0, 0.4 + 0.6 * 0.5**3, 0.4 + 0.6 * 0.25**3, 0.4, 0.4]
    np.testing.assert_allclose([budget(s) for s in (0, 10, 20, 25, 30, 49)], want, rtol=1e-6)
    for bad in ((0.0, 10, 20), (0.4, -1, 20), (0.4, 10, 0), (0.4, 11, 20)):  # the last: too late
        with pytest.raises(ValueError, match="budget_anneal"):
            budget_anneal(*bad, num_steps=50, hard_steps=20)
    common = dict(compute_weight=50.0, gate_estimator="st", dropout=0.0)
    loose = _model(**common, compute_target=0.9)
    loose.train()
    (_, _, _, terms), _ = _sums(loose, feats)
    mean = float(jnp.sum(terms["compute"])) / 2
    (total, _, _, t_over), g_over = _sums(loose, feats, target=jnp.float32(mean - 0.1))
    tight = _model(**common, compute_target=mean - 0.1)
    tight.train()
    (total_t, _, _, t_tight), g_tight = _sums(tight, feats)
    np.testing.assert_allclose(t_over["compute_excess"], t_tight["compute_excess"], rtol=1e-5)
    np.testing.assert_allclose(total, total_t, rtol=1e-6)
    np.testing.assert_allclose(_arbitrator_grad(g_over), _arbitrator_grad(g_tight), rtol=1e-5)
    (total_1, _, _, t_1), _ = _sums(tight, feats, target=jnp.float32(1.0))  # no constraint yet
    assert float(t_1["compute_excess"]) == 0.0
    np.testing.assert_allclose(total_1, t_1["rnnt"], rtol=1e-6)
    # The loop builds it from the train config, and refuses it where nothing can anneal.
    tc = {"budget_anneal": (10, 20), "num_steps": 50, "hard_gate_steps": 20}
    assert float(loop._compute_budget(tight.cfg, tc)(10)) == 1.0
    assert loop._compute_budget(tight.cfg, {**tc, "budget_anneal": (0, 0)}) is None
    with pytest.raises(ValueError, match="no arbitrators"):
        loop._compute_budget(_model(arbitrator="none").cfg, tc)
    with pytest.raises(ValueError, match="compute_target"):  # an anneal needs a budget
        loop._compute_budget(dataclasses.replace(loose.cfg, compute_target=0.0), tc)


def test_config_validation():
    with pytest.raises(ValueError, match="compute_target"):
        _model(compute_target=1.5)
    with pytest.raises(ValueError, match="needs arbitrators"):
        _model(arbitrator="none", compute_target=0.4)
