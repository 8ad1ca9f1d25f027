"""The train state, created directly sharded on the mesh.

The state is a plain dict (so Orbax saves it as is):
  step       int32 scalar
  params     nnx.State of the model's `nnx.Param`s (float32)
  rest       nnx.State of everything else in the model (feature_norm mean/std, RNG streams)
  opt_state  optax state for `params`

`graphdef` (the model's static structure) stays outside; `nnx.merge(graphdef, params, rest)` in the
jitted step rebuilds the model. Creation: `nnx.eval_shape` of the init gives the abstract state and
its logical axes, the config's rules give NamedShardings, and `jax.jit(init, out_shardings=...)`
materializes every array already in place (nothing is built on one device first).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxspeech.models import TransducerConfig, TransformerTransducer
from jaxspeech.train import quantize
from jaxspeech.train import sharding as sharding_lib


def model_config(model_cfg, *, vocab_size: int, bf16: bool = False) -> TransducerConfig:
    """TransducerConfig from the config's model section (vocab_size=-1: from the tokenizer)."""
    fields = dict(model_cfg)
    if fields.get("vocab_size", -1) in (-1, 0, None):
        fields["vocab_size"] = int(vocab_size)
    if bf16:
        fields.update(dtype="bfloat16", param_dtype="float32")
    known = {f.name for f in dataclasses.fields(TransducerConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"config.model has fields TransducerConfig does not know: {unknown}")
    return TransducerConfig(**fields)


def learning_rate_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then cosine decay, inverse square root, or constant."""
    peak, warmup = float(optim_cfg.learning_rate), max(int(optim_cfg.warmup_steps), 1)
    kind = optim_cfg.schedule
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0,
            peak,
            warmup,
            max(num_steps, warmup + 1),
            end_value=peak * optim_cfg.end_lr_fraction,
        )
    if kind == "rsqrt":

        def rsqrt(step):
            step = jnp.maximum(jnp.asarray(step, jnp.float32), 1.0)
            return peak * jnp.minimum(step / warmup, jnp.sqrt(warmup / step))

        return rsqrt
    if kind == "constant":
        return optax.linear_schedule(0.0, peak, warmup)
    raise ValueError(f"optim.schedule must be 'cosine', 'rsqrt' or 'constant', got {kind!r}")


def scale_module_updates(module: str, factor: float) -> optax.GradientTransformation:
    """Multiplies the updates of every parameter under a module named `module` by `factor` (a
    per-module learning-rate multiplier)."""
    key = f"[{module!r}]"

    def update(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map_with_path(
            lambda path, u: u * factor if key in jax.tree_util.keystr(path) else u, updates
        )
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(optim_cfg, num_steps: int, quant_rules=None):
    """Global-norm clipping then AdamW; weight decay only on matrices (not biases, norms; under
    QAT not on squashed thetas or amplitudes, see `quantize.decay_mask`). The arbitrators' updates
    are scaled by `optim.arbitrator_lr_scale` (default 1): fresh gates on a warm-started model
    must move much further than the trained weights. The squashed kernels' thetas (QAT) by
    `optim.theta_lr_scale` (default 1): Adam moves every parameter by about the learning rate,
    but theta's scale is ~1 (its regularizer's target) where a plain kernel's is ~fan_in^-1/2, so a
    squashed kernel learns that many times slower, relatively, than a plain one."""
    schedule = learning_rate_schedule(optim_cfg, num_steps)
    decay_mask = lambda params: quantize.decay_mask(params, quant_rules)
    arbitrator_scale = float(optim_cfg.get("arbitrator_lr_scale", 1.0))
    tx = optax.chain(
        optax.clip_by_global_norm(float(optim_cfg.grad_clip_norm)),
        optax.adamw(
            schedule,
            b1=optim_cfg.b1,
            b2=optim_cfg.b2,
            eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
            mask=decay_mask,
        ),
    )
    if arbitrator_scale != 1.0:
        tx = optax.chain(tx, scale_module_updates("arbitrator", arbitrator_scale))
    theta_scale = float(optim_cfg.get("theta_lr_scale", 1.0))
    if theta_scale != 1.0 and quant_rules is not None:
        squashed = lambda params: quantize.squashed_mask(params, quant_rules)
        tx = optax.chain(tx, optax.masked(optax.scale(theta_scale), squashed))
    return tx, schedule


def _build(cfg: TransducerConfig, seed: int, mean=None, std=None) -> TransformerTransducer:
    model = TransformerTransducer(cfg, rngs=nnx.Rngs(seed))
    if mean is not None:
        model.feature_norm.mean[...] = jnp.asarray(mean, jnp.float32)
        model.feature_norm.std[...] = jnp.asarray(std, jnp.float32)
    return model


def abstract_model(cfg: TransducerConfig, seed: int = 0) -> TransformerTransducer:
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: _build(cfg, seed))


def _state(params, rest, tx, quant_rules):
    trainable = quantize.to_trainable(params, quant_rules)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": trainable,
        "rest": rest,
        "opt_state": tx.init(trainable),
    }


def _init_fn(cfg: TransducerConfig, tx: optax.GradientTransformation, seed: int, quant_rules):
    def init(mean, std):
        with nnx.use_eager_sharding(False):
            model = _build(cfg, seed, mean, std)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return _state(params, rest, tx, quant_rules)

    return init


def abstract_train_state(
    cfg: TransducerConfig,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules,
    *,
    seed: int = 0,
    quant_rules=None,
):
    """(graphdef, abstract state of ShapeDtypeStructs carrying their shardings, shardings)."""
    f32 = jax.ShapeDtypeStruct((cfg.num_mels,), jnp.float32)
    abstract = jax.eval_shape(_init_fn(cfg, tx, seed, quant_rules), f32, f32)
    shardings = sharding_lib.tree_shardings(abstract, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )
    return nnx.graphdef(abstract_model(cfg, seed)), abstract, shardings


def create_train_state(
    cfg: TransducerConfig,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rules,
    *,
    seed: int = 0,
    feature_mean=None,
    feature_std=None,
    quant_rules=None,
    init_model: TransformerTransducer | None = None,
):
    """Returns (graphdef, state, state_shardings) with `state` materialized sharded on `mesh`.

    `init_model` (a trained model of the same configuration, or one this configuration extends
    with new parameters, e.g. arbitrators) warm-starts the state: its parameters (theta =
    f^-1(w / a) under QAT) and its feature normalization, the new parameters as initialized;
    step 0, fresh optimizer state."""
    graphdef, _, shardings = abstract_train_state(
        cfg, tx, mesh, rules, seed=seed, quant_rules=quant_rules
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with jax.set_mesh(mesh):
        if init_model is not None:  # its state over a fresh model (which may add parameters)
            with nnx.use_eager_sharding(False):
                fresh = _build(cfg, seed)
            nnx.update(fresh, nnx.state(init_model))
            _, params, rest = nnx.split(fresh, nnx.Param, ...)
            warm = jax.jit(lambda p, r: _state(p, r, tx, quant_rules), out_shardings=shardings)
            return graphdef, warm(params, rest), shardings
        mean = np.zeros(cfg.num_mels, np.float32) if feature_mean is None else feature_mean
        std = np.ones(cfg.num_mels, np.float32) if feature_std is None else feature_std
        init = jax.jit(
            _init_fn(cfg, tx, seed, quant_rules),
            in_shardings=(replicated, replicated),
            out_shardings=shardings,
        )
        state = init(jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32))
    return graphdef, state, shardings


def merge_model(graphdef, state, quant_rules=None) -> TransformerTransducer:
    """The nnx model held by a train state (host-side use: evaluation, export); under QAT with
    the parameters it runs with at the state's step (fake-quantized)."""
    params = quantize.effective_params(state["params"], quant_rules, state["step"])
    return nnx.merge(graphdef, params, state["rest"])


def param_shapes(state) -> dict[str, list[int]]:
    """{'encoder/layers/0/attn/query/kernel': [256, 4, 64], ...} for compatibility checks."""
    flat = nnx.to_flat_state(state["params"]) if hasattr(nnx, "to_flat_state") else None
    if flat is None:
        flat = state["params"].flat_state()
    return {"/".join(map(str, path)): list(np.shape(v)) for path, v in flat}


def count_params(state) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(state["params"])))
