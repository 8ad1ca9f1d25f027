"""Jitted train and eval steps.

Features are computed on device inside the step (`features.log_mel`, plus `spec_augment` when
training). Loss normalization: the per-utterance RNN-T negative log-likelihood (nats, summed over
the utterance's lattice) is averaged over the *valid* utterances of the global batch (padding rows
have audio_lengths == 0). `loss_per_token` (the same total divided by the number of label tokens)
is reported as a metric.

Quantization-aware training (`quant_rules`, see `jaxspeech.train.quantize`): the state's `params`
is the trainable QAT tree, the model runs with its fake-quantized effective parameters, and the
optimized loss adds the squashed-weight regularizer (`quant_weight`; reported as
`quant_regularizer`, while `loss` stays the task loss).

Non-finite loss or gradients: the update is not applied (the state passes through unchanged) and
`finite` is 0 in the metrics; the host loop then fails fast naming the step (`nonfinite='fail'`).
A skip-and-count policy only needs a different host reaction.

Arbitrators (`jaxspeech.models.arbitrator`): `gate_temperature(step)` sets the gates' relaxation
temperature before each step; the loss includes `compute_weight * compute` (the model's `loss`;
`compute_ramp(step)` scales the weight: a delayed, ramped compute loss; `compute_budget(step)`
sets a compute budget's value: an annealed budget), and `compute` (the mean executed fraction of
the gated encoder's FLOPs under the sampled gates) is reported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxspeech import features
from jaxspeech.train import quantize

BATCH_KEYS = ("audio", "audio_lengths", "labels", "label_lengths")


def _features(batch, feature_cfg, spec_augment_cfg, key):
    feats, feat_lengths = features.log_mel(batch["audio"], batch["audio_lengths"], feature_cfg)
    if key is not None and spec_augment_cfg is not None and spec_augment_cfg.get("enabled", False):
        feats = features.spec_augment(
            key,
            feats,
            feat_lengths,
            num_freq_masks=spec_augment_cfg["num_freq_masks"],
            max_freq_width=spec_augment_cfg["max_freq_width"],
            num_time_masks=spec_augment_cfg["num_time_masks"],
            max_time_frac=spec_augment_cfg["max_time_frac"],
        )
    return feats, feat_lengths


def _loss_sums(
    model,
    batch,
    feats,
    feat_lengths,
    compute_scale=None,
    teacher=None,
    teacher_weight=0.0,
    compute_target=None,
):
    """(loss sum, valid utterances, label tokens, {term: sum} of the loss terms (unscaled)).
    `compute_scale` multiplies the compute term's weight (a ramp; None: the model's weight);
    `teacher`: the teacher's lattice on this batch, whose distillation term (`teacher_kd`)
    enters the loss at `teacher_weight`; `compute_target`: the compute budget's value at this
    step (an anneal; None: the model's `compute_target`)."""
    terms = model.loss_terms(
        feats,
        feat_lengths,
        batch["labels"],
        batch["label_lengths"],
        teacher=teacher,
        compute_target=compute_target,
    )
    valid = (batch["audio_lengths"] > 0).astype(jnp.float32)
    weighted = dict(terms)
    if compute_scale is not None:
        for name in ("compute", "compute_excess"):
            if name in terms:
                weighted[name] = terms[name] * compute_scale
    per_example = model.combine_loss_terms(weighted)
    if teacher is not None:
        per_example = per_example + teacher_weight * terms["teacher_kd"]
    per_example = per_example.astype(jnp.float32) * valid
    num_tokens = jnp.sum(batch["label_lengths"].astype(jnp.float32) * valid)
    sums = {k: jnp.sum(v.astype(jnp.float32) * valid) for k, v in terms.items()}
    return jnp.sum(per_example), jnp.sum(valid), num_tokens, sums


def _with_temperature(rest, gate_temperature, step):
    """The non-parameter state with the arbitrator's `GateTemperature` set to its value at step
    (None: unchanged). Always a new tree: the loss mutates RNG counters (the arbitrator's gate
    noise) inside the gradient's trace, so their variables must be created in it."""
    tau = None if gate_temperature is None else jnp.asarray(gate_temperature(step), jnp.float32)

    def put(path, leaf):
        if tau is not None and "['arbitrator']['temperature']" in jax.tree_util.keystr(path):
            return tau
        return leaf

    return jax.tree_util.tree_map_with_path(put, rest)


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    schedule,
    *,
    feature_cfg,
    spec_augment_cfg=None,
    seed: int = 0,
    state_shardings=None,
    batch_sharding=None,
    quant_rules=None,
    quant_weight: float = 0.0,
    gate_temperature=None,
    compute_ramp=None,
    teacher=None,
    teacher_weight: float = 0.0,
    compute_budget=None,
):
    """Returns `train_step(state, batch) -> (state, metrics)`, jitted with donation of `state`.

    `gate_temperature`: step -> arbitrator gate temperature (None: the model's stored value).
    `compute_ramp`: step -> multiplier of the compute loss weight (None: 1).
    `compute_budget`: step -> the compute budget's value (None: the model's `compute_target`),
    reported as `compute_budget`.
    `teacher`: (graphdef, state, shardings or None) of a frozen trained model (any transducer
    with this run's tokenizer), run in eval mode on each step's (augmented) features; the loss
    adds `teacher_weight` * its lattice distillation term (`losses.distill.lattice_kd`),
    reported as `teacher_kd` (nats per utterance)."""
    spec_augment_cfg = None if spec_augment_cfg is None else dict(spec_augment_cfg)
    base_key = jax.random.key(seed)

    def teacher_lattice(teacher_state, batch, feats, feat_lengths):
        if teacher is None:
            return None
        model = nnx.merge(teacher[0], teacher_state)
        model.eval()
        lattice = model.lattice(feats, feat_lengths, batch["labels"], batch["label_lengths"])
        return jax.lax.stop_gradient(lattice)

    def train_step(state, batch, teacher_state=None):
        step = state["step"]
        key = jax.random.fold_in(base_key, step)
        feats, feat_lengths = _features(batch, feature_cfg, spec_augment_cfg, key)
        lattice = teacher_lattice(teacher_state, batch, feats, feat_lengths)

        def loss_fn(trainable):
            params = quantize.effective_params(trainable, quant_rules, step)
            model = nnx.merge(
                graphdef, params, _with_temperature(state["rest"], gate_temperature, step)
            )
            model.train()
            scale = None if compute_ramp is None else compute_ramp(step)
            budget = None if compute_budget is None else compute_budget(step)
            total, count, tokens, sums = _loss_sums(
                model, batch, feats, feat_lengths, scale, lattice, teacher_weight, budget
            )
            loss = total / jnp.maximum(count, 1.0)
            reg = quantize.regularizer(trainable, quant_rules, quant_weight)
            # The updated non-parameter state (dropout RNG counters) leaves through the aux.
            _, _, rest = nnx.split(model, nnx.Param, ...)
            return loss + reg, (loss, reg, total, count, tokens, sums, rest)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (objective, aux), grads = grad_fn(state["params"])
        loss, reg, total, count, tokens, sums, rest = aux
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
        # Keep the old parameters and optimizer state on a non-finite step (the step counter and
        # the RNG streams still advance).
        updated = jax.tree.map(
            lambda a, b: jnp.where(finite, a, b),
            (params, opt_state),
            (state["params"], state["opt_state"]),
        )
        new = {"step": step + 1, "params": updated[0], "rest": rest, "opt_state": updated[1]}
        metrics = {
            "loss": loss,
            "loss_per_token": total / jnp.maximum(tokens, 1.0),
            "grad_norm": grad_norm,
            "learning_rate": schedule(step),
            "num_utterances": count,
            "finite": finite.astype(jnp.float32),
        }
        if quant_rules is not None:
            metrics["quant_regularizer"] = reg
        for name in ("compute", "compute_excess", "rnnt_full", "distill", "teacher_kd"):
            if name in sums:
                metrics[name] = sums[name] / jnp.maximum(count, 1.0)
        if compute_ramp is not None:
            metrics["compute_weight_scale"] = compute_ramp(step)
        if compute_budget is not None:
            metrics["compute_budget"] = compute_budget(step)
        return new, metrics

    kwargs = {}
    if state_shardings is not None:
        in_shardings = (state_shardings, {k: batch_sharding for k in BATCH_KEYS})
        if teacher is not None:
            in_shardings += (teacher[2],)
        kwargs = dict(in_shardings=in_shardings, out_shardings=(state_shardings, None))
    jitted = jax.jit(train_step, donate_argnums=(0,), **kwargs)
    if teacher is None:
        return jitted
    teacher_state = teacher[1]
    return lambda state, batch: jitted(state, batch, teacher_state)


def make_eval_step(
    graphdef, *, feature_cfg, state_shardings=None, batch_sharding=None, quant_rules=None
):
    """Returns `eval_step(state, batch) -> {'loss_sum', 'num_utterances', 'num_tokens'}`."""

    def eval_step(state, batch):
        feats, feat_lengths = _features(batch, feature_cfg, None, None)
        params = quantize.effective_params(state["params"], quant_rules, state["step"])
        model = nnx.merge(graphdef, params, state["rest"])
        model.eval()
        total, count, tokens, _ = _loss_sums(model, batch, feats, feat_lengths)
        return {"loss_sum": total, "num_utterances": count, "num_tokens": tokens}

    kwargs = {}
    if state_shardings is not None:
        kwargs = dict(in_shardings=(state_shardings, {k: batch_sharding for k in BATCH_KEYS}))
    return jax.jit(eval_step, **kwargs)
