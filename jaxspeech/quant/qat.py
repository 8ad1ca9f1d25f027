"""Quantization-aware training as a parameter-tree transformation.

Model code is unchanged; the train step calls

    qparams = qat_init(float_params, rules)               # once (warm start or fresh init)
    params  = qat_apply(qparams, rules, step)             # inside the loss, every step
    loss    = task_loss(params) + qat_regularizer(qparams, rules, weight)

and differentiates w.r.t. ``qparams``. ``qparams`` is a ``QATParams(params, amplitudes)`` pytree:
``params`` has the structure, shapes and shardings of the float tree, with every selected kernel
replaced by its ``theta``; ``amplitudes`` maps the path of each squashed kernel to its per-channel
amplitude ``a`` (see ``squash.py``). ``qat_apply`` maps each selected ``theta`` to
``w = a f(theta)`` and then, once ``step >= rule.warmup_steps`` (a ``jnp.where`` on the traced step,
so warm-up and quantized training are one compiled program), to ``fake_quant(w, bits, scale)`` with
straight-through gradients. The clipping scale is ``|a|`` for squashed kernels (the grid tiles
``(-a, a)``) and the per-channel ``max |w|`` for ``squash="identity"`` (plain QAT).

Rules select leaves by ``re.search`` on the "/"-joined path (``"encoder/layers/0/mlp/kernel"``;
nnx ``State`` leaves drop their trailing ``value``); the first matching rule wins, a rule with
``bits=None`` keeps what it matches in float, and only floating leaves with ``ndim >= min_ndim``
(default 2) are ever quantized, so biases and norm scales stay float.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxspeech.quant import squash as sq
from jaxspeech.quant.fake_quant import (
    MIN_SCALE,
    SUPPORTED_BITS,
    channel_max_abs,
    fake_quant,
    quantize,
)


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """How to quantize the kernels whose path matches ``pattern`` (``re.search``)."""

    pattern: str
    bits: int | None  # None: keep matching leaves in float (an exclusion rule)
    squash: str = "tanh"  # 'tanh' | 'cdf' | 'identity'
    warmup_steps: int = 0  # float training (w = a f(theta), unquantized) before this step
    channel_axes: int | tuple[int, ...] = (-1,)  # output-channel axes (flax: the last one)
    sigma: float = 1.0  # the 'cdf' squash's Gaussian scale
    learn_scale: bool = True  # train the amplitude a (else frozen at its init)
    amplitude_init: str = "max"  # 'max' | 'std', see squash.init_amplitude
    target_mean: float = 0.0  # regularizer target for mean(theta)
    target_var: float | None = None  # None: squash.default_target_var(squash, sigma)
    min_ndim: int = 2

    def __post_init__(self):
        if self.bits is not None and self.bits not in SUPPORTED_BITS:
            raise ValueError(f"rule {self.pattern!r}: bits must be in {SUPPORTED_BITS} or None")
        if self.squash not in sq.SQUASHES:
            raise ValueError(f"rule {self.pattern!r}: squash must be one of {sq.SQUASHES}")
        re.compile(self.pattern)
        axes = self.channel_axes
        object.__setattr__(self, "channel_axes", (axes,) if isinstance(axes, int) else tuple(axes))

    @property
    def var_target(self) -> float:
        if self.target_var is not None:
            return float(self.target_var)
        return sq.default_target_var(self.squash, self.sigma)


class QATParams(NamedTuple):
    """Trainable QAT parameters: the float tree with kernels replaced by theta, plus amplitudes."""

    params: Any
    amplitudes: dict[str, jax.Array]


def default_rules(
    bits: int = 4, squash: str = "tanh", warmup_steps: int = 0, **kw
) -> tuple[QuantRule, ...]:
    """Every ``kernel`` of ndim >= 2 (attention, feed-forward, convolution, predictor, joint)
    quantized; embeddings (``embed``/``embedding``), norms and biases stay float.

    Attention ``query``/``key``/``value`` kernels (``[embed, heads, kv]``) get a scale per
    (head, kv) output channel; every other kernel one per last-axis output channel."""
    return (
        QuantRule(r"(^|/)embed(ding)?(/|$)", None),
        QuantRule(r"(query|key|value)/kernel$", bits, squash, warmup_steps, (-2, -1), **kw),
        QuantRule(r"(^|/)kernel$", bits, squash, warmup_steps, **kw),
    )


def path_parts(keypath: Sequence[Any]) -> list[str | int]:
    """Key parts of a ``tree_flatten_with_path`` key path (nnx's trailing ``value`` dropped)."""
    parts: list[str | int] = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(k.key if isinstance(k.key, int) else str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(k.idx)
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(k.key)
        else:
            parts.append(str(k))
    if parts and parts[-1] in ("value", "raw_value"):
        parts.pop()
    return parts


def path_str(keypath: Sequence[Any]) -> str:
    """'/'-joined ``path_parts`` (e.g. ``"encoder/layers/0/mlp/kernel"``): what rules match."""
    return "/".join(str(p) for p in path_parts(keypath))


def match_rule(path: str, leaf: Any, rules: Sequence[QuantRule]) -> QuantRule | None:
    """The first rule matching ``path`` if ``leaf`` is quantizable, else None."""
    if not (hasattr(leaf, "ndim") and jnp.issubdtype(leaf.dtype, jnp.floating)):
        return None
    for rule in rules:
        if re.search(rule.pattern, path):
            if rule.bits is None or leaf.ndim < rule.min_ndim:
                return None
            return rule
    return None


def selected(params: Any, rules: Sequence[QuantRule]) -> dict[str, QuantRule]:
    """``{path: rule}`` for every leaf of ``params`` the rules quantize."""
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = path_str(kp)
        rule = match_rule(path, leaf, rules)
        if rule is not None:
            out[path] = rule
    return out


def _map_selected(fn, params: Any, rules: Sequence[QuantRule]) -> Any:
    """``tree_map`` applying ``fn(path, rule, leaf)`` to selected leaves, identity elsewhere."""

    def visit(kp, leaf):
        path = path_str(kp)
        rule = match_rule(path, leaf, rules)
        return leaf if rule is None else fn(path, rule, leaf)

    return jax.tree_util.tree_map_with_path(visit, params)


def qat_init(params: Any, rules: Sequence[QuantRule]) -> QATParams:
    """Warm start from a float tree: ``theta = f^-1(w / a)`` (clipped), ``a`` per rule's init."""
    amplitudes = {}

    def init(path, rule, w):
        if rule.squash == "identity":
            return w
        a = sq.init_amplitude(w, rule.amplitude_init, rule.channel_axes)
        amplitudes[path] = a
        return sq.init_theta(w, a, rule.squash, sigma=rule.sigma)

    theta = _map_selected(init, params, rules)
    return QATParams(theta, amplitudes)


def effective_kernel(theta, a, rule: QuantRule) -> tuple[jax.Array, jax.Array]:
    """The float kernel ``w`` (before quantization) and its quantizer scale, for one leaf."""
    if rule.squash == "identity":
        w = theta
        return w, channel_max_abs(w, rule.channel_axes)
    if a is None:
        raise KeyError(f"no amplitude for a {rule.squash!r}-squashed kernel ({rule.pattern!r})")
    if not rule.learn_scale:
        a = jax.lax.stop_gradient(a)
    w = sq.reparameterize(theta, a, rule.squash, sigma=rule.sigma)
    return w, jnp.maximum(jnp.abs(a), MIN_SCALE)


def qat_apply(qparams: QATParams, rules: Sequence[QuantRule], step) -> Any:
    """The effective (fake-quantized) parameter tree the model runs with at ``step``."""
    step = jnp.asarray(step)

    def apply(path, rule, theta):
        w, scale = effective_kernel(theta, qparams.amplitudes.get(path), rule)
        q = fake_quant(w, rule.bits, channel_axes=rule.channel_axes, scale=scale)
        if rule.warmup_steps <= 0:
            return q
        return jnp.where(step >= rule.warmup_steps, q, w)

    return _map_selected(apply, qparams.params, rules)


def qat_regularizer(qparams: QATParams, rules: Sequence[QuantRule], weight: float = 1.0):
    """``weight * sum_kernels [(mean(theta)-mu)^2 + (var(theta)-s2)^2]`` over squashed kernels."""
    total = jnp.zeros((), jnp.float32)
    for kp, leaf in jax.tree_util.tree_flatten_with_path(qparams.params)[0]:
        rule = match_rule(path_str(kp), leaf, rules)
        if rule is not None and rule.squash != "identity":
            total = total + sq.moment_penalty(leaf, rule.target_mean, rule.var_target)
    return weight * total


def bin_occupancy_entropy(w: jax.Array, bits: int, *, scale=None, channel_axes=-1) -> jax.Array:
    """Entropy (bits) of the histogram of quantization-bin occupancy of ``w``; its max is ``bits``.

    Bins are those of ``fake_quant`` with the given per-channel ``scale`` (default ``max |w|``);
    all channels are pooled into one histogram of ``2**bits`` bins.
    """
    if scale is None:
        scale = channel_max_abs(w, channel_axes)
    codes = quantize(w, bits, scale).reshape(-1)
    p = jnp.bincount(codes, length=2**bits) / codes.size
    return -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0))


def kernel_entropies(qparams: QATParams, rules: Sequence[QuantRule]) -> dict[str, float]:
    """Bin-occupancy entropy of every selected kernel with the scale its quantizer uses."""
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(qparams.params)[0]:
        path = path_str(kp)
        rule = match_rule(path, leaf, rules)
        if rule is not None:
            w, scale = effective_kernel(leaf, qparams.amplitudes.get(path), rule)
            out[path] = float(bin_occupancy_entropy(w, rule.bits, scale=scale))
    return out
