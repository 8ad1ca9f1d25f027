"""Per-channel symmetric uniform quantization with straight-through gradients.

The level set ("mid-rise", exactly ``2**bits`` levels, no zero level). For a channel with clipping
scale ``s > 0`` and ``n = 2**bits`` levels the step is ``delta = 2 s / n`` and the levels are

    level(k) = (k + 1/2) * delta,    k in [-n/2, n/2 - 1],

i.e. ``+-delta/2, +-3 delta/2, ..., +-(s - delta/2)``: symmetric around zero, every one of the
``2**bits`` codes used, and the ``n`` bins ``[k delta, (k+1) delta)`` tile ``[-s, s]`` exactly, so
weights uniform on ``[-s, s]`` occupy every bin equally (the point of the squashed
re-parameterization, see ``squash.py``). A weight maps to
``k = clip(floor(w / delta), -n/2, n/2 - 1)`` and is stored as the
unsigned code ``u = k + n/2`` in ``[0, 2**bits - 1]``.

The scale is per output channel: ``channel_axes`` are kept, every other axis is reduced. By
default ``s = max |w|`` over the reduced axes (nothing is clipped); a caller may pass its own scale
(e.g. the squash amplitude ``a`` of ``w = a f(theta)``, or a clipped scale), and weights with
``|w| > s`` then saturate at the outermost level. The scale is a constant for the quantizer
(``stop_gradient``); a learnable scale receives its gradient through the re-parameterization.

Straight-through estimator (``jax.custom_vjp``): d fake_quant(w) / dw = 1 where ``|w| <= s`` and 0
outside. A custom VJP (not ``w + stop_gradient(q - w)``) keeps the forward value bit-identical to
``dequantize(quantize(w))``, which ``export.py`` relies on.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Floor on the per-channel scale so an all-zero channel does not divide by zero.
MIN_SCALE = 1e-12
SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def _check_bits(bits: int) -> int:
    if int(bits) != bits or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be an integer in {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def reduce_axes(ndim: int, channel_axes: int | Sequence[int]) -> tuple[int, ...]:
    """The axes reduced when computing per-channel statistics (all but ``channel_axes``)."""
    if isinstance(channel_axes, int):
        channel_axes = (channel_axes,)
    keep = {a % ndim for a in channel_axes} if ndim else set()
    return tuple(a for a in range(ndim) if a not in keep)


def channel_max_abs(w: jax.Array, channel_axes: int | Sequence[int] = -1) -> jax.Array:
    """Per-channel ``max |w|`` with kept dims (broadcastable to ``w``), floored at ``MIN_SCALE``."""
    s = jnp.max(jnp.abs(w), axis=reduce_axes(w.ndim, channel_axes), keepdims=True)
    return jnp.maximum(s.astype(jnp.float32), MIN_SCALE)


def quantize(w: jax.Array, bits: int, scale: jax.Array) -> jax.Array:
    """Unsigned codes ``u in [0, 2**bits - 1]`` (uint8) of ``w`` for a broadcastable ``scale``."""
    bits = _check_bits(bits)
    half = 2 ** (bits - 1)
    delta = jnp.asarray(scale, jnp.float32) * (2.0 ** (1 - bits))  # exact: power-of-two factor
    k = jnp.clip(jnp.floor(w.astype(jnp.float32) / delta), -half, half - 1)
    return (k + half).astype(jnp.uint8)


def dequantize(codes: jax.Array, bits: int, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Values of codes: ``(u - 2**(bits-1) + 1/2) * 2**(1-bits) * scale``, cast to ``dtype``.

    ``(u - n/2 + 1/2) * 2**(1-bits)`` is an exact small dyadic number, so the result is one rounded
    multiply and identical wherever it is evaluated (eager, jitted, or numpy float32).
    """
    bits = _check_bits(bits)
    unit = (codes.astype(jnp.float32) - (2 ** (bits - 1) - 0.5)) * (2.0 ** (1 - bits))
    return (unit * jnp.asarray(scale, jnp.float32)).astype(dtype)


def levels(bits: int, scale: float = 1.0) -> jax.Array:
    """All ``2**bits`` quantization levels for one channel of scale ``scale`` (ascending)."""
    codes = jnp.arange(2 ** _check_bits(bits), dtype=jnp.uint8)
    return dequantize(codes, bits, jnp.float32(scale))


def _make_ste(bits: int):
    @jax.custom_vjp
    def ste(w, scale):
        return dequantize(quantize(w, bits, scale), bits, scale, w.dtype)

    def fwd(w, scale):
        return ste(w, scale), (w, scale)

    def bwd(res, g):
        w, scale = res
        inside = jnp.abs(w.astype(jnp.float32)) <= scale
        return jnp.where(inside, g, jnp.zeros_like(g)), jnp.zeros_like(scale)

    ste.defvjp(fwd, bwd)
    return ste


_STE = {b: _make_ste(b) for b in SUPPORTED_BITS}


def fake_quant(
    w: jax.Array,
    bits: int,
    *,
    channel_axes: int | Sequence[int] = -1,
    scale: jax.Array | None = None,
) -> jax.Array:
    """Quantize-dequantize ``w`` to ``2**bits`` mid-rise levels per channel, straight-through grads.

    Args:
      w: a float kernel, e.g. ``[in, out]`` (flax Dense) or ``[width, in, out]`` (conv).
      bits: bit width (1..8); the output takes exactly ``2**bits`` distinct values per channel.
      channel_axes: axes that index output channels (kept when computing the scale).
      scale: per-channel clipping scale broadcastable to ``w``; default ``max |w|`` per channel.
        Treated as a constant (no gradient).

    Returns:
      An array like ``w`` (same dtype) holding ``dequantize(quantize(w, bits, s), bits, s)``;
      its gradient w.r.t. ``w`` is 1 where ``|w| <= s`` and 0 elsewhere.
    """
    bits = _check_bits(bits)
    if scale is None:
        scale = channel_max_abs(w, channel_axes)
    scale = jax.lax.stop_gradient(jnp.maximum(jnp.asarray(scale, jnp.float32), MIN_SCALE))
    return _STE[bits](w, scale)


def fake_quant_activations(x: jax.Array, bits: int, feature_axes: int = 1) -> jax.Array:
    """Per-token fake quantization of activations: one symmetric max-abs scale per position over
    the last `feature_axes` (feature) axes, computed on the fly, ``2**bits`` mid-rise levels,
    straight-through gradients. What an integer kernel with per-row input scales computes; the
    scale needs no calibration and no state, and it does not mix positions (or batch rows)."""
    if not 1 <= feature_axes <= x.ndim:
        raise ValueError(
            f"fake_quant_activations needs {feature_axes} feature axes, got a {x.ndim}-D array"
        )
    return fake_quant(x, bits, channel_axes=tuple(range(x.ndim - feature_axes)))
