"""Chunked attention masks, rotary positions and multi-head self-attention with a KV cache.

Positions: rotary embeddings (RoPE, Su et al. 2021) on queries and keys at absolute frame
positions, so every attention score depends only on the relative distance i - j. With limited left
context (left_chunks >= 0) a query only ever sees distances in
[-(lookahead_chunks + 1) * chunk_size + 1, (left_chunks + 1) * chunk_size - 1], whatever the
utterance length, so a model trained on utterances longer than that window meets no new distance at
test time on arbitrarily long audio. With left_chunks = -1 distances are unbounded and RoPE
extrapolation beyond the longest training utterance is not guaranteed (the usual RoPE caveat).
Angles are computed in float32 from int32 positions, identically offline and streaming (so the two
agree exactly); on streams of ~1e5 encoder frames (about an hour) the float32 rounding of the
absolute angles reaches ~1e-2 rad at the highest frequency, a small perturbation of the relative
scores.

Chunked mask: frame i in chunk c_i = i // chunk_size may attend to frame j iff
c_i - left_chunks <= c_j <= c_i + lookahead_chunks (no lower bound for left_chunks = -1) and j is a
valid (unpadded) frame.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspeech.models.config import Einsum, TransducerConfig, dense_init, zeros_init


def chunk_context(
    q_positions: jax.Array,
    k_positions: jax.Array,
    chunk_size: int,
    left_chunks: int,
    lookahead_chunks: int,
) -> jax.Array:
    """Boolean [..., Tq, Tk]: may a query at q_positions [..., Tq] see a key at k_positions
    [..., Tk] (frame positions, any leading batch shape), under the chunked mask."""
    diff = (q_positions // chunk_size)[..., :, None] - (k_positions // chunk_size)[..., None, :]
    allowed = diff >= -lookahead_chunks
    if left_chunks >= 0:
        allowed &= diff <= left_chunks
    return allowed


def chunk_mask(
    num_frames: int, chunk_size: int, left_chunks: int, lookahead_chunks: int
) -> jax.Array:
    """Boolean [T, T] mask, True where query frame i may attend to key frame j."""
    frames = jnp.arange(num_frames)
    return chunk_context(frames, frames, chunk_size, left_chunks, lookahead_chunks)


def length_mask(lengths: jax.Array, num_frames: int) -> jax.Array:
    """Boolean [B, T], True for frames < lengths."""
    return jnp.arange(num_frames)[None, :] < lengths[:, None]


def rotary(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotate x [B, T, H, K] (K even) by angles positions * theta_k, theta_k = 1e4^(-2k/K);
    positions int [T] (shared by the batch) or [B, T].

    Uses the "rotate half" layout: pairs are (x[..., k], x[..., k + K/2]).
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [(B,) T, K/2]
    angles = jnp.broadcast_to(angles, (x.shape[0], *angles.shape[-2:]))[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention. q [B,Tq,H,K], k/v [B,Tk,H,K], mask broadcastable to [B,H,Tq,Tk].

    Scores and softmax run in float32. A query with no visible key (every key masked, e.g. all
    gated off) outputs zeros.
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqhk,bthk->bhqt", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1) * jnp.any(mask, axis=-1, keepdims=True)
    probs = probs.astype(v.dtype)
    return jnp.einsum("bhqt,bthk->bqhk", probs, v)


# A ring buffer of R frames: keys (rotated), values [B, R, H, K]; validity [B, R].
KVCache = tuple[jax.Array, jax.Array, jax.Array]


class MultiHeadSelfAttention(nnx.Module):
    """Multi-head self-attention with rotary positions; offline (`__call__`) and cached (`step`)."""

    def __init__(self, cfg: TransducerConfig, *, rngs: nnx.Rngs):
        d, h = cfg.d_model, cfg.num_heads
        self.num_heads, self.head_dim = h, d // h
        self.dtype = cfg.compute_dtype

        def proj(einsum: str, shape, axes, bias_shape, bias_axes):
            return Einsum(
                einsum,
                shape,
                bias_shape,
                act_bits=cfg.activation_bits,
                dtype=cfg.compute_dtype,
                param_dtype=cfg.params_dtype,
                kernel_init=dense_init(axes),
                bias_init=zeros_init(bias_axes),
                rngs=rngs,
            )

        qkv = (
            "btd,dhk->bthk",
            (d, h, d // h),
            ("embed", "heads", "kv"),
            (h, d // h),
            ("heads", "kv"),
        )
        self.query = proj(*qkv)
        self.key = proj(*qkv)
        self.value = proj(*qkv)
        self.out = proj("bthk,hkd->btd", (h, d // h, d), ("heads", "kv", "embed"), (d,), ("embed",))
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def qkv(self, x: jax.Array, positions: jax.Array):
        """Rotated queries and keys, and values [B,T,H,K]; positions [T] or [B,T]."""
        q = rotary(self.query(x), positions)
        k = rotary(self.key(x), positions)
        return q, k, self.value(x)

    def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array) -> jax.Array:
        """x [B,T,D], mask bool broadcastable to [B,1,T,T], positions int [T] -> [B,T,D]."""
        q, k, v = self.qkv(x, positions)
        return self.dropout(self.out(attend(q, k, v, mask)))

    def init_cache(self, batch: int, size: int) -> KVCache:
        """An empty ring of `size` frames (keys and values [B, size, H, K], validity [B, size])."""
        shape = (batch, size, self.num_heads, self.head_dim)
        valid = jnp.zeros((batch, size), bool)
        return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype), valid

    def step(
        self,
        cache: KVCache,
        q_in: jax.Array,
        kv_in: jax.Array,
        q_positions: jax.Array,
        kv_positions: jax.Array,
        mask: jax.Array,
        kv_valid: jax.Array | None = None,
    ) -> tuple[KVCache, jax.Array]:
        """Queries of one chunk against a ring buffer of the R latest frames, the new chunk
        included.

        q_in [B,C,D] (queries, at absolute q_positions [C]); kv_in [B,C,D] (the newest chunk, at
        kv_positions [C], consecutive, the first a multiple of C; the same chunk as q_in
        without lookahead) is written over the oldest C frames of the ring, at slot
        kv_positions[0] mod R (R a multiple of C); kv_valid [B,C] bool (default all): which new
        frames are keys at all (a frame whose attention is gated off is not). mask: bool,
        broadcastable to [B,1,C,R] over the ring's slots (`ring_positions` gives each slot's
        frame). Keys are stored rotated at their absolute positions, so the ring's order does
        not matter to the attention (a softmax over a set of keys).
        """
        q = rotary(self.query(q_in), q_positions)
        k = rotary(self.key(kv_in), kv_positions)
        return self.attend_cached(cache, q, k, self.value(kv_in), mask, kv_valid, kv_positions[0])

    def attend_cached(
        self,
        cache: KVCache,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        mask: jax.Array,
        kv_valid: jax.Array | None,
        first: jax.Array,
        *,
        project: bool = True,
    ) -> tuple[KVCache, jax.Array]:
        """`step` after the projections: k/v [B,C,H,K] (rotated; their first frame at position
        `first`) written into the ring, then q [B,Q,H,K] (rotated) against it. With
        `project=False` the output is the attention's [B,Q,H,K], before `out`."""
        if kv_valid is None:
            kv_valid = jnp.ones(k.shape[:2], bool)
        cache = _write(cache, (k, v, kv_valid), first)
        out = attend(q, cache[0], cache[1], mask & cache[2][:, None, None, :])
        if project:
            out = self.dropout(self.out(out))
        return cache, out

    def push_invalid(self, cache: KVCache, frames: int, first: jax.Array) -> KVCache:
        """The ring after `frames` new frames from position `first` that are not keys (attention
        gated off on all of them)."""
        b, _, h, k = cache[0].shape
        zeros = jnp.zeros((b, frames, h, k), cache[0].dtype)
        return _write(cache, (zeros, zeros, jnp.zeros((b, frames), bool)), first)


def _write(cache: KVCache, new: KVCache, first: jax.Array) -> KVCache:
    """`new` ([B, C, ...] each) written into the ring at slot first mod R: in place inside a
    jitted loop (no copy of the ring, unlike concatenating and dropping the oldest frames)."""
    slot = jnp.remainder(first, cache[0].shape[1]).astype(jnp.int32)
    return tuple(
        jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), slot, axis=1)
        for c, n in zip(cache, new, strict=True)
    )


def ring_positions(newest: jax.Array, chunk: int, size: int) -> jax.Array:
    """int32 [size]: the frame each slot of a ring of `size` frames holds once the chunk of
    `chunk` frames starting at position `newest` is written (slot p mod size holds frame p, for
    the `size` frames up to newest + chunk - 1; those before 0 are negative: never written)."""
    oldest = newest + chunk - size
    return oldest + jnp.remainder(jnp.arange(size, dtype=jnp.int32) - oldest, size)
