"""Quantization-aware training in the train loop: the config's `quant` section -> rules, state.

With `quant.enabled`, the train state's `params` is the *trainable* QAT tree

    {"theta": <nnx.State like the float params, selected kernels replaced by theta>,
     "amplitudes": <nested dict, one per-channel amplitude per squashed kernel>}

and the model runs with `effective_params(trainable, rules, step)`: `jaxspeech.quant.qat_apply`
(w = a f(theta), then fake quantization once `step >= quant.warmup_steps`). The loss adds
`quant.regularizer_weight` times the mean/variance regularizer of the squashed thetas. Without
`quant.enabled`, `params` is the float `nnx.State` and every function here is the identity.

Layer types (`quant.layer_bits`, each -1 = `quant.bits`, 0 = keep float) select kernels by path:
  attention     encoder self-attention query/key/value/out
  feed_forward  encoder feed-forward up/down
  convolution   the convolutional subsampling front end (convolutions and its projection)
  predictor     the prediction network (its embedding table always stays float)
  joint         the joint network and the auxiliary CTC head
Biases, norm scales and embeddings stay float.

Weight decay: on float matrices and on plain-QAT (`identity`) kernels as in float training; not on
squashed thetas (the regularizer holds their variance) nor on amplitudes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxspeech.quant import qat

LAYER_PATTERNS = {
    "attention": r"^encoder/blocks/\d+/attn/",
    "feed_forward": r"^encoder/blocks/\d+/ffn/",
    "convolution": r"^subsampling/",
    "predictor": r"^predictor/",
    "joint": r"^(joint|ctc_head)/",
}
_ATTENTION_QKV = r"(query|key|value)/kernel$"


def rules_from_config(quant_cfg) -> tuple[qat.QuantRule, ...] | None:
    """The QuantRules of a config's `quant` section, or None when QAT is off (or absent)."""
    if quant_cfg is None or not quant_cfg.get("enabled", False):
        return None
    layer_bits = dict(quant_cfg.get("layer_bits", {}))
    unknown = sorted(set(layer_bits) - set(LAYER_PATTERNS))
    if unknown:
        raise ValueError(
            f"config.quant.layer_bits has unknown layer types {unknown}; "
            f"expected some of {sorted(LAYER_PATTERNS)}"
        )
    common = dict(
        squash=quant_cfg.squash,
        warmup_steps=int(quant_cfg.warmup_steps),
        sigma=float(quant_cfg.sigma),
        learn_scale=bool(quant_cfg.learn_scale),
        amplitude_init=quant_cfg.amplitude_init,
    )
    rules = [qat.QuantRule(r"(^|/)embed(ding)?(/|$)", None)]
    for kind, prefix in LAYER_PATTERNS.items():
        bits = int(layer_bits.get(kind, -1))
        bits = int(quant_cfg.bits) if bits < 0 else bits
        if bits == 0:
            rules.append(qat.QuantRule(prefix, None))
            continue
        if kind == "attention":  # one scale per (head, kv) output channel
            rules.append(
                qat.QuantRule(prefix + ".*" + _ATTENTION_QKV, bits, channel_axes=(-2, -1), **common)
            )
        rules.append(qat.QuantRule(prefix + ".*kernel$", bits, **common))
    return tuple(rules)


def _nest(flat: dict[str, jax.Array], like) -> dict:
    """{'a/b/0/kernel': x} -> {'a': {'b': {0: {'kernel': x}}}}, keys typed as in `like`'s paths."""
    parts = {
        qat.path_str(kp): qat.path_parts(kp)
        for kp, _ in jax.tree_util.tree_flatten_with_path(like)[0]
    }
    out: dict = {}
    for path, value in flat.items():
        keys = parts[path]
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return out


def to_trainable(params, rules):
    """The trainable QAT tree of float `params` (warm start: theta = f^-1(w / a))."""
    if rules is None:
        return params
    qp = qat.qat_init(params, rules)
    return {"theta": qp.params, "amplitudes": _nest(qp.amplitudes, params)}


def as_qat_params(trainable) -> qat.QATParams:
    """The `jaxspeech.quant` view of a trainable tree (amplitudes keyed by '/'-joined path)."""
    flat = {
        qat.path_str(kp): a
        for kp, a in jax.tree_util.tree_flatten_with_path(trainable["amplitudes"])[0]
    }
    return qat.QATParams(trainable["theta"], flat)


def effective_params(trainable, rules, step):
    """The parameters the model runs with at `step` (fake-quantized kernels)."""
    if rules is None:
        return trainable
    return qat.qat_apply(as_qat_params(trainable), rules, step)


def regularizer(trainable, rules, weight: float):
    if rules is None or not weight:
        return jnp.zeros((), jnp.float32)
    return qat.qat_regularizer(as_qat_params(trainable), rules, weight)


def squashed_mask(trainable, rules):
    """True at the thetas of squashed kernels (w = a f(theta), f not the identity)."""

    def squashed(kp, leaf):
        rule = qat.match_rule(qat.path_str(kp), leaf, rules)
        return rule is not None and rule.squash != "identity"

    return {
        "theta": jax.tree_util.tree_map_with_path(squashed, trainable["theta"]),
        "amplitudes": jax.tree.map(lambda a: False, trainable["amplitudes"]),
    }


def decay_mask(trainable, rules):
    """True where AdamW's weight decay applies (see the module docstring)."""
    if rules is None:
        return jax.tree.map(lambda p: p.ndim >= 2, trainable)

    def theta_mask(kp, leaf):
        rule = qat.match_rule(qat.path_str(kp), leaf, rules)
        return leaf.ndim >= 2 and (rule is None or rule.squash == "identity")

    return {
        "theta": jax.tree_util.tree_map_with_path(theta_mask, trainable["theta"]),
        "amplitudes": jax.tree.map(lambda a: False, trainable["amplitudes"]),
    }


def describe(quant_cfg) -> dict:
    """What a checkpoint records of the QAT setup (a float and a QAT state are not compatible)."""
    if quant_cfg is None or not quant_cfg.get("enabled", False):
        return {}
    keys = ("bits", "squash", "layer_bits", "sigma", "learn_scale")
    return {k: (dict(quant_cfg[k]) if k == "layer_bits" else quant_cfg[k]) for k in keys}


def default_config(enabled: bool = False, **overrides):
    """The `quant` config section (QAT off unless `enabled`); keyword overrides set fields."""
    import ml_collections

    c = ml_collections.ConfigDict(
        dict(
            enabled=enabled,
            bits=4,  # 2, 3, 4 or 8 (any of 1..8 works)
            squash="tanh",  # 'tanh' (published) | 'cdf' (exactly uniform) | 'identity' (plain)
            # Per layer type: -1 = `bits`, 0 = keep float (see LAYER_PATTERNS).
            layer_bits=ml_collections.ConfigDict({k: -1 for k in LAYER_PATTERNS}),
            warmup_steps=0,  # float training (w = a f(theta), unquantized) before this step
            regularizer_weight=0.1,  # mean/variance regularizer of the squashed thetas
            sigma=1.0,  # the 'cdf' squash's Gaussian scale
            learn_scale=True,  # train the per-channel amplitudes a
            amplitude_init="max",  # 'max' | 'std' (see jaxspeech.quant.squash.init_amplitude)
        )
    )
    c.update(overrides)
    return c
