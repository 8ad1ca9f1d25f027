"""Streaming Transformer encoder: pre-LN blocks with chunked self-attention and a KV-cached step.

Block: `x + g_attn * MHSA(LN(x))`, then `x + g_ffn * FFN(LN(x))`, where the optional per-frame gates
`g` ([B, T], 0 = component off, the residual carries the input) are for arbitrators; with gates None
the block is the plain pre-LN block (no multiply is traced). A final LayerNorm follows the stack.

Streaming (`Encoder.step`): each layer keeps a rolling cache of the keys/values of its S most recent
input frames, S = (left_chunks + lookahead_chunks) * chunk_size, or, for left_chunks = -1
(unlimited), `max_stream_frames` rounded up to whole chunks plus the lookahead. Without lookahead a
chunk attends to [cache; itself], exactly the chunked mask, so the concatenated step outputs equal
the offline encoder. With lookahead L > 0 a layer must see L future chunks of its input before it
can emit a chunk: each layer holds its last L input chunks pending and emits the chunk L chunks
back, so the stack's output lags its input by `delay_chunks = num_layers * L` chunks (the caller
feeds `delay_chunks` padding chunks at the end, masked through `end`); the outputs are again exactly
the offline ones. With left_chunks = -1, audio longer than `max_stream_frames` encoder frames
keeps streaming, but the oldest frames then fall out of the window (the streamed model then behaves
like one with left context `max_stream_frames`).
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

LayerStreamState = tuple[KVCache, jax.Array]  # (keys/values cache, pending inputs [B, L*C, D])


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
        state: LayerStreamState,
        x: jax.Array,
        kv_positions: jax.Array,
        mask: jax.Array,
        *,
        attn_gate: jax.Array | None = None,
        ffn_gate: jax.Array | None = None,
    ) -> tuple[LayerStreamState, jax.Array]:
        """Takes the newest input chunk x [B,C,D] (at kv_positions [C]) and returns the output
        chunk L chunks earlier (L = lookahead; the pending inputs wait in the state's buffer).

        mask: bool, broadcastable to [B,1,C,S+C] over the keys [cache; x]. Gates [B,C] refer to
        the output chunk.
        """
        cache, pending = state
        c = x.shape[1]
        kv_in = self.attn_norm(x)
        if pending.shape[1]:  # lookahead: the query chunk is the oldest pending one
            inputs = jnp.concatenate([pending, x], axis=1)
            x, pending = inputs[:, :c], inputs[:, c:]
            q_in = self.attn_norm(x)
        else:
            q_in = kv_in
        q_positions = kv_positions - pending.shape[1]
        cache, y = self.attn.step(cache, q_in, kv_in, q_positions, kv_positions, mask)
        x = _gated(x, y, attn_gate)
        return (cache, pending), _gated(x, self.ffn(self.ffn_norm(x)), ffn_gate)


class Encoder(nnx.Module):
    """Stack of `EncoderBlock`s with chunked attention, plus a final LayerNorm."""

    def __init__(self, cfg: TransducerConfig, *, rngs: nnx.Rngs):
        self.chunk_size = cfg.chunk_size
        self.left_chunks = cfg.left_chunks
        self.lookahead_chunks = cfg.lookahead_chunks
        self.max_stream_frames = cfg.max_stream_frames
        self.d_model = cfg.d_model
        self.dtype = cfg.compute_dtype
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
        """Frames of keys/values kept per layer by `step` (left context plus lookahead)."""
        ahead = self.lookahead_chunks * self.chunk_size
        if self.left_chunks >= 0:
            return self.left_chunks * self.chunk_size + ahead
        return -(-self.max_stream_frames // self.chunk_size) * self.chunk_size + ahead

    @property
    def delay_chunks(self) -> int:
        """Chunks between a `step` input and its output: num_layers * lookahead_chunks."""
        return len(self.blocks) * self.lookahead_chunks

    def init_state(self, batch: int) -> tuple[LayerStreamState, ...]:
        """Per layer: zero KV cache [B, cache_size, H, K] x 2 and pending inputs [B, L*C, D]."""
        pending = (batch, self.lookahead_chunks * self.chunk_size, self.d_model)
        return tuple(
            (b.attn.init_cache(batch, self.cache_size), jnp.zeros(pending, self.dtype))
            for b in self.blocks
        )

    def step(
        self,
        state: tuple[LayerStreamState, ...],
        x: jax.Array,
        offset: jax.Array,
        end: jax.Array | None = None,
        *,
        attn_gates: jax.Array | None = None,
        ffn_gates: jax.Array | None = None,
    ) -> tuple[tuple[LayerStreamState, ...], jax.Array]:
        """Feeds chunk x [B, C, D] at encoder frames offset..offset+C-1 (offset: int32 scalar,
        shared by the batch); returns the output chunk at frames offset - delay_chunks * C.

        `end` [B] (optional): frames at positions >= end are padding (masked as keys, exactly as
        `__call__` masks frames >= lengths). Gates: [num_layers, B, C] each, or None; layer i's
        gates refer to its output chunk (frames offset - (i + 1) * lookahead_chunks * C ...).
        """
        b, c, _ = x.shape
        size, ahead = self.cache_size, self.lookahead_chunks * c
        new_state = []
        for i, (layer_state, block) in enumerate(zip(state, self.blocks, strict=True)):
            start = offset - i * ahead  # position of this layer's newest input chunk
            key_pos = start - size + jnp.arange(size + c, dtype=jnp.int32)  # [cache; chunk]
            valid = jnp.broadcast_to(key_pos >= 0, (b, size + c))
            if end is not None:
                valid &= key_pos[None, :] < end[:, None]
            layer_state, x = block.step(
                layer_state,
                x,
                key_pos[size:],
                valid[:, None, None, :],
                attn_gate=None if attn_gates is None else attn_gates[i],
                ffn_gate=None if ffn_gates is None else ffn_gates[i],
            )
            new_state.append(layer_state)
        return tuple(new_state), self.norm(x)
