"""Streaming Transformer encoder: pre-LN blocks with chunked self-attention and a KV-cached step.

Block: `x + g_attn * MHSA(LN(x))`, then `x + g_ffn * FFN(LN(x))`, where the optional per-frame gates
`g` ([B, T], 0 = component off, the residual carries the input) are for arbitrators; with gates None
the block is the plain pre-LN block (no multiply is traced). A final LayerNorm follows the stack.

Streaming (`Encoder.step`): each layer keeps a rolling cache of the keys/values of the S most recent
frames: S = left_chunks * chunk_size, or, for left_chunks = -1 (unlimited), `max_stream_frames`
rounded up to whole chunks. A chunk attends to [cache; itself], which is exactly the chunked mask
for lookahead_chunks = 0, so the concatenated step outputs equal the offline encoder. With
left_chunks = -1, audio longer than `max_stream_frames` encoder frames keeps streaming, but the
oldest frames then fall out of the window (the streamed model then behaves like one with
left context `max_stream_frames`). Streaming with lookahead_chunks > 0 would need per-layer delays
and is not supported by `step` (`init_cache` raises).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspeech.models.attention import (
    KVCache,
    MultiHeadSelfAttention,
    chunk_mask,
    length_mask,
)
from jaxspeech.models.config import TransducerConfig, dense, layer_norm


class FeedForward(nnx.Module):
    """Linear(D -> mlp), GELU, dropout, Linear(mlp -> D), dropout."""

    def __init__(self, cfg: TransducerConfig, *, rngs: nnx.Rngs):
        self.up = dense(cfg.d_model, cfg.mlp_dim, ("embed", "mlp"), cfg, rngs=rngs)
        self.down = dense(cfg.mlp_dim, cfg.d_model, ("mlp", "embed"), cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dropout(self.down(self.dropout(jax.nn.gelu(self.up(x)))))


def _gated(x: jax.Array, y: jax.Array, gate: jax.Array | None) -> jax.Array:
    if gate is None:
        return x + y
    return x + gate[..., None].astype(y.dtype) * y


class EncoderBlock(nnx.Module):
    """Pre-LN Transformer block with optional per-frame component gates."""

    def __init__(self, cfg: TransducerConfig, *, rngs: nnx.Rngs):
        self.attn_norm = layer_norm(cfg.d_model, cfg, rngs=rngs)
        self.attn = MultiHeadSelfAttention(cfg, rngs=rngs)
        self.ffn_norm = layer_norm(cfg.d_model, cfg, rngs=rngs)
        self.ffn = FeedForward(cfg, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        positions: jax.Array,
        *,
        attn_gate: jax.Array | None = None,
        ffn_gate: jax.Array | None = None,
    ) -> jax.Array:
        """x [B,T,D]; mask bool broadcastable to [B,1,T,T]; positions int [T]; gates [B,T]."""
        x = _gated(x, self.attn(self.attn_norm(x), mask, positions), attn_gate)
        return _gated(x, self.ffn(self.ffn_norm(x)), ffn_gate)

    def step(
        self,
        cache: KVCache,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        *,
        attn_gate: jax.Array | None = None,
        ffn_gate: jax.Array | None = None,
    ) -> tuple[KVCache, jax.Array]:
        """One chunk x [B,C,D] against the layer's KV cache; see `MultiHeadSelfAttention.step`."""
        cache, y = self.attn.step(cache, self.attn_norm(x), positions, mask)
        x = _gated(x, y, attn_gate)
        return cache, _gated(x, self.ffn(self.ffn_norm(x)), ffn_gate)


class Encoder(nnx.Module):
    """Stack of `EncoderBlock`s with chunked attention, plus a final LayerNorm."""

    def __init__(self, cfg: TransducerConfig, *, rngs: nnx.Rngs):
        self.chunk_size = cfg.chunk_size
        self.left_chunks = cfg.left_chunks
        self.lookahead_chunks = cfg.lookahead_chunks
        self.max_stream_frames = cfg.max_stream_frames
        self.blocks = nnx.List([EncoderBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = layer_norm(cfg.d_model, cfg, rngs=rngs)

    def attention_mask(self, lengths: jax.Array, num_frames: int) -> jax.Array:
        """Boolean [B, 1, T, T]: chunked mask and key padding."""
        chunks = chunk_mask(num_frames, self.chunk_size, self.left_chunks, self.lookahead_chunks)
        return chunks[None, None] & length_mask(lengths, num_frames)[:, None, None, :]

    def __call__(
        self,
        x: jax.Array,
        lengths: jax.Array,
        *,
        attn_gates: jax.Array | None = None,
        ffn_gates: jax.Array | None = None,
    ) -> jax.Array:
        """x [B,T,D], lengths [B] -> [B,T,D]. Gates: [num_layers, B, T] each, or None."""
        mask = self.attention_mask(lengths, x.shape[1])
        positions = jnp.arange(x.shape[1], dtype=jnp.int32)
        for i, block in enumerate(self.blocks):
            x = block(
                x,
                mask,
                positions,
                attn_gate=None if attn_gates is None else attn_gates[i],
                ffn_gate=None if ffn_gates is None else ffn_gates[i],
            )
        return self.norm(x)

    @property
    def cache_size(self) -> int:
        """Frames of left context kept per layer by `step`."""
        if self.left_chunks >= 0:
            return self.left_chunks * self.chunk_size
        return -(-self.max_stream_frames // self.chunk_size) * self.chunk_size

    def init_cache(self, batch: int) -> tuple[KVCache, ...]:
        if self.lookahead_chunks:
            raise ValueError("streaming step requires lookahead_chunks == 0")
        return tuple(b.attn.init_cache(batch, self.cache_size) for b in self.blocks)

    def step(
        self,
        caches: tuple[KVCache, ...],
        x: jax.Array,
        offset: jax.Array,
        valid: jax.Array | None = None,
        *,
        attn_gates: jax.Array | None = None,
        ffn_gates: jax.Array | None = None,
    ) -> tuple[tuple[KVCache, ...], jax.Array]:
        """One chunk x [B, chunk_size, D] starting at encoder frame `offset` (int32 scalar).

        `valid` [B] (optional): number of valid frames in this chunk (the final partial chunk);
        later frames are masked as keys, as padding is offline. All streams of the batch share
        `offset`. Gates: [num_layers, B, chunk_size] each, or None (as in `__call__`).
        """
        b, c, _ = x.shape
        size = self.cache_size
        positions = offset + jnp.arange(c, dtype=jnp.int32)
        cache_valid = jnp.broadcast_to(offset - size + jnp.arange(size) >= 0, (b, size))
        chunk_valid = jnp.ones((b, c), bool) if valid is None else length_mask(valid, c)
        mask = jnp.concatenate([cache_valid, chunk_valid], axis=1)[:, None, None, :]
        new_caches = []
        for i, (cache, block) in enumerate(zip(caches, self.blocks, strict=True)):
            cache, x = block.step(
                cache,
                x,
                positions,
                mask,
                attn_gate=None if attn_gates is None else attn_gates[i],
                ffn_gate=None if ffn_gates is None else ffn_gates[i],
            )
            new_caches.append(cache)
        return tuple(new_caches), self.norm(x)
