"""Gathered execution's bookkeeping: each row's active frames in fixed-capacity slots, and the
`lax.switch` over capacities that skipping execution runs (`jaxspeech.models.encoder`)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Slots(NamedTuple):
    """Where gathered execution puts each row's active frames (`active_slots`)."""

    idx: jax.Array  # [B, K] int32: the frame in each slot (active ones in time order first)
    filled: jax.Array  # [B, K] bool: the slot holds an active frame
    dropped: jax.Array  # [B] int32: active frames beyond the capacity
    of_frame: jax.Array  # [B, T] int32: each active frame's slot; K for the others


def active_slots(on: jax.Array, capacity: int) -> Slots:
    """Slots of capacity K for the active frames of each row of on [B, T] (bool): `idx` is the
    stable argsort of ~on cut to K (active frames in time order, then inactive ones), computed by
    counting (a sort is slow on CPU): an active frame goes to slot (active frames before it), an
    inactive one to count + (inactive frames before it)."""
    count = jnp.sum(on, axis=1, dtype=jnp.int32)
    before_on = jnp.cumsum(on, axis=1, dtype=jnp.int32) - on
    before_off = jnp.arange(on.shape[1], dtype=jnp.int32)[None, :] - before_on
    slot = jnp.where(on, before_on, count[:, None] + before_off)
    rows = jnp.arange(on.shape[0])[:, None]
    frames = jnp.broadcast_to(jnp.arange(on.shape[1], dtype=jnp.int32), on.shape)
    idx = jnp.zeros((on.shape[0], capacity), jnp.int32).at[rows, slot].set(frames, mode="drop")
    filled = jnp.arange(capacity)[None, :] < count[:, None]
    of_frame = jnp.where(on & (slot < capacity), slot, capacity)
    return Slots(idx, filled, jnp.maximum(count - capacity, 0), of_frame)


def take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, T, ...] at idx [B, K] -> [B, K, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def put(y: jax.Array, slots: Slots) -> jax.Array:
    """y [B, K, ...] back at the frames [B, T, ...]: each active frame's slot, zeros elsewhere (a
    gather from y and a zero row, not a scatter: faster on CPU)."""
    pad = jnp.zeros((y.shape[0], 1) + y.shape[2:], y.dtype)
    return take(jnp.concatenate([y, pad], axis=1), slots.of_frame)


def by_capacity(count, capacities, run, *operands):
    """run(k, *operands) for the smallest k of `capacities` (sorted) that holds `count` active
    frames: one `lax.switch` branch per capacity. The index counts the capacities below `count`
    (`jnp.searchsorted` would loop: slow on CPU, where it cost more than a skipped layer)."""
    index = jnp.sum(jnp.asarray(capacities, jnp.int32) < count, dtype=jnp.int32)
    return jax.lax.switch(index, [functools.partial(run, k) for k in capacities], *operands)
