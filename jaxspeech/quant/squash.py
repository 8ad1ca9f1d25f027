"""Squashed re-parameterization of weights: ``w = a * f(theta)``.

"Squashed weight distribution for low-bit quantization" (Interspeech 2022) trains ``theta`` instead
of ``w`` so that, with ``theta`` held near a Gaussian by a mean/variance regularizer, ``w`` is
close to uniform on ``(-a, a)`` and a uniform quantizer with clipping scale ``a`` uses all of
its levels.

Squash functions ``f`` (all map R onto (-1, 1), except identity):
  ``"tanh"``      ``f(theta) = tanh(theta)`` -- the published form. ``tanh(theta)`` is exactly
                  uniform when ``theta`` is logistic with scale 1/2 (variance ``pi**2 / 12``); for a
                  Gaussian ``theta`` of that variance it is only roughly uniform.
  ``"cdf"``       ``f(theta) = 2 Phi(theta / sigma) - 1 = erf(theta / (sigma sqrt 2))`` -- exactly
                  uniform on (-1, 1) when ``theta ~ N(0, sigma**2)``.
  ``"identity"``  ``w = theta`` (plain QAT; no amplitude, no regularizer target).

Amplitude ``a``: one per output channel (kept dims, broadcastable to the kernel), a *trainable*
parameter by default (``qat.QuantRule.learn_scale=False`` freezes it at its initial value). It is
also the quantizer's clipping scale, so the quantization grid always tiles ``(-a, a)`` exactly.
``init_amplitude`` offers ``"max"`` (``a = max |w|``: the warm start reproduces the float kernel
up to the clip below) and ``"std"`` (``a = sqrt(3) std(w)``: the uniform law with the kernel's
variance; large weights are clipped).

Warm start: ``init_theta(w, a, squash)`` inverts ``f`` on ``clip(w / a, -(1-eps), 1-eps)``.

Regularizer, per kernel: ``(mean(theta) - mu)**2 + (var(theta) - s2)**2`` with default targets
``mu = 0`` and ``s2 = default_target_var(squash, sigma)`` (``pi**2/12`` for tanh, ``sigma**2`` for
cdf); the weight is the caller's (``qat.qat_regularizer(..., weight)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.scipy.special import erf, erfinv

from jaxspeech.quant.fake_quant import MIN_SCALE, reduce_axes

SQUASHES = ("tanh", "cdf", "identity")
# Inputs of the inverse transform are clipped to |x| <= 1 - INIT_EPS (f^-1 is infinite at +-1).
INIT_EPS = 1e-3


def _check(squash: str) -> str:
    if squash not in SQUASHES:
        raise ValueError(f"squash must be one of {SQUASHES}, got {squash!r}")
    return squash


def squash_fn(theta: jax.Array, squash: str, *, sigma: float = 1.0) -> jax.Array:
    """``f(theta)`` in (-1, 1) (identity: ``theta``)."""
    if _check(squash) == "tanh":
        return jnp.tanh(theta)
    if squash == "cdf":
        return erf(theta / (sigma * math.sqrt(2.0)))
    return theta


def inverse_squash(x: jax.Array, squash: str, *, sigma: float = 1.0) -> jax.Array:
    """``f^-1(x)`` for ``x`` in (-1, 1); ``x`` is first clipped to ``|x| <= 1 - INIT_EPS``."""
    if _check(squash) == "identity":
        return x
    x = jnp.clip(x, -(1.0 - INIT_EPS), 1.0 - INIT_EPS)
    if squash == "tanh":
        return jnp.arctanh(x)
    return sigma * math.sqrt(2.0) * erfinv(x)


def reparameterize(theta: jax.Array, a: jax.Array | None, squash: str, *, sigma: float = 1.0):
    """``w = a * f(theta)`` (``theta`` itself for identity, where ``a`` is ignored)."""
    if _check(squash) == "identity":
        return theta
    return (a * squash_fn(theta.astype(jnp.float32), squash, sigma=sigma)).astype(theta.dtype)


def init_amplitude(
    w: jax.Array, method: str = "max", channel_axes: int | Sequence[int] = -1
) -> jax.Array:
    """Per-channel amplitude ``a`` (float32, kept dims) from a float kernel ``w``."""
    axes = reduce_axes(w.ndim, channel_axes)
    w = w.astype(jnp.float32)
    if method == "max":
        a = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
    elif method == "std":
        a = math.sqrt(3.0) * jnp.std(w, axis=axes, keepdims=True)
    else:
        raise ValueError(f"amplitude init method must be 'max' or 'std', got {method!r}")
    return jnp.maximum(a, MIN_SCALE)


def init_theta(w: jax.Array, a: jax.Array | None, squash: str, *, sigma: float = 1.0):
    """``theta = f^-1(clip(w / a))`` so that ``reparameterize(theta, a) ~= w`` (warm start)."""
    if _check(squash) == "identity":
        return w
    x = w.astype(jnp.float32) / a
    return inverse_squash(x, squash, sigma=sigma).astype(w.dtype)


def default_target_var(squash: str, sigma: float = 1.0) -> float:
    """The variance of ``theta`` for which ``f(theta)`` is (close to) uniform on (-1, 1)."""
    if _check(squash) == "tanh":
        return math.pi**2 / 12.0  # logistic(scale 1/2): tanh of it is exactly uniform
    if squash == "cdf":
        return float(sigma) ** 2
    raise ValueError("identity squash has no target variance; pass target_var explicitly")


def moment_penalty(theta: jax.Array, target_mean: float, target_var: float) -> jax.Array:
    """``(mean(theta) - mu)**2 + (var(theta) - s2)**2`` over the whole kernel (a scalar)."""
    t = theta.astype(jnp.float32)
    mean = jnp.mean(t)
    var = jnp.mean(jnp.square(t - mean))
    return jnp.square(mean - target_mean) + jnp.square(var - target_var)
