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


KVCache = tuple[jax.Array, jax.Array, jax.Array]  # keys (rotated), values [B,S,H,K]; valid [B,S]


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
        """Queries of one chunk against a rolling cache of the S latest frames plus a new chunk.

        q_in [B,C,D] (queries, at absolute q_positions [C]); kv_in [B,C,D] (the newest chunk, at
        kv_positions [C]; the same chunk as q_in without lookahead); mask bool broadcastable to
        [B,1,C,S+C] over the keys [cache; new chunk]; kv_valid [B,C] bool (default all): which
        new frames are keys at all (a frame whose attention is gated off is not). Returns the
        cache holding the last S frames of [cache; new chunk] (keys stored rotated at their
        absolute positions, with their validity).
        """
        q = rotary(self.query(q_in), q_positions)
        k = rotary(self.key(kv_in), kv_positions)
        return self.attend_cached(cache, q, k, self.value(kv_in), mask, kv_valid)

    def attend_cached(
        self,
        cache: KVCache,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        mask: jax.Array,
        kv_valid: jax.Array | None = None,
        *,
        project: bool = True,
    ) -> tuple[KVCache, jax.Array]:
        """`step` after the projections: q [B,Q,H,K] (rotated) against [cache; k/v [B,C,H,K]].
        With `project=False` the output is the attention's [B,Q,H,K], before `out`."""
        if kv_valid is None:
            kv_valid = jnp.ones(k.shape[:2], bool)
        keys = jnp.concatenate([cache[0], k], axis=1)
        values = jnp.concatenate([cache[1], v], axis=1)
        valid = jnp.concatenate([cache[2], kv_valid], axis=1)
        out = attend(q, keys, values, mask & valid[:, None, None, :])
        if project:
            out = self.dropout(self.out(out))
        return _keep_last(cache, (keys, values, valid)), out

    def push_invalid(self, cache: KVCache, frames: int) -> KVCache:
        """The cache after `frames` new frames that are not keys (attention gated off on all)."""
        b, _, h, k = cache[0].shape
        zeros = jnp.zeros((b, frames, h, k), cache[0].dtype)
        valid = jnp.zeros((b, frames), bool)
        new = (zeros, zeros, valid)
        grown = tuple(jnp.concatenate(p, axis=1) for p in zip(cache, new, strict=True))
        return _keep_last(cache, grown)


def _keep_last(cache: KVCache, grown: KVCache) -> KVCache:
    """The last S frames of each of `grown` (S = the cache's size: the oldest frames leave)."""
    drop = grown[0].shape[1] - cache[0].shape[1]
    return tuple(a[:, drop:] for a in grown)
