"""Streaming Transformer encoder: pre-LN blocks with chunked self-attention and a KV-cached step.

Block: `x + g_attn * MHSA(LN(x))`, then `x + g_ffn * FFN(LN(x))`, where the optional per-frame gates
`g` ([B, T], 0 = component off, the residual carries the input) come from arbitrators
(`jaxspeech.models.arbitrator`), static pruning (`static_attention`/`static_ffn`: fixed gates) or
the caller; with gates None the block is the plain pre-LN block (no multiply is traced). A final
LayerNorm follows the stack.

Gated attention: a frame whose attention gate is off (g <= 0.5) is neither a query nor a key/value
in that layer: other frames attend only to the active frames of their chunked context, so an off
frame's query, key, value and output projections are all skipped (`jaxspeech.models.flops` counts
exactly that). An active frame always sees itself. Three executions, equal whenever they apply:
  masked    (`__call__`, training): every frame is computed, keys masked by the hard gate and
            outputs multiplied by the gate value (gradients reach the gates through the multiply);
  gathered  (`forward(..., capacity=K)`, batched inference): per utterance, each component's
            active frames are gathered (in time order) into K slots, computed, and scattered back;
            active frames beyond K are dropped (treated as off) and counted in `GateTrace.dropped`;
  skipping  (`step(..., skip=True)`, streaming inference, lookahead 0): per chunk, each component's
            active frames, pooled over the batch of streams, are gathered into the smallest
            capacity of `stream_capacities(B)` (0, powers of two, multiples of B * C / 8) that
            holds them, one `lax.switch` branch per capacity (0: not executed at all; the full
            B * C: the masked computation, the same frames without gathering); attention
            scores are computed for every query of the chunk (cheap: the projections dominate),
            so a server streaming B utterances at once spends per-frame savings, not only
            whole-chunk ones. With whole-block gates one switch runs or skips the block.

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

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspeech.models.arbitrator import Arbitrator, hard
from jaxspeech.models.attention import (
    KVCache,
    MultiHeadSelfAttention,
    attend,
    chunk_context,
    length_mask,
)
from jaxspeech.models.config import TransducerConfig, dense, layer_norm
from jaxspeech.models.gathering import active_slots, by_capacity, put, take

LayerStreamState = tuple[KVCache, jax.Array]  # (keys/values/valid cache, pending [B, L*C, D])


class GateTrace(NamedTuple):
    """The gates an encoder pass used: values [num_layers, B, T] (ones on valid frames when
    ungated), and `dropped` [B] int32: active component-frames that did not fit the capacity of
    gathered execution (0 otherwise)."""

    attn: jax.Array
    ffn: jax.Array
    dropped: jax.Array


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
        """x [B,T,D]; mask bool broadcastable to [B,1,T,T]; positions int [T]; gates [B,T]
        (masked execution: frames whose attention is off are masked out as keys)."""
        if attn_gate is not None:
            mask = mask & hard(attn_gate)[:, None, None, :]
        x = _gated(x, self.attn(self.attn_norm(x), mask, positions), attn_gate)
        return _gated(x, self.ffn(self.ffn_norm(x)), ffn_gate)

    def gathered(
        self, x: jax.Array, context, attn_on: jax.Array, ffn_on: jax.Array, capacity: int
    ) -> tuple[jax.Array, jax.Array]:
        """Hard-gated block computing only active frames (gathered execution, see the module
        docstring). x [B,T,D]; context(q_pos, k_pos) -> bool (the chunked mask); on [B,T] bool
        (False on padding). Returns (x, dropped [B])."""
        slots = active_slots(attn_on, capacity)
        q, k, v = self.attn.qkv(self.attn_norm(take(x, slots.idx)), slots.idx)
        mask = context(slots.idx, slots.idx) & slots.filled[:, None, :]
        y = self.attn.dropout(self.attn.out(attend(q, k, v, mask[:, None])))
        x = x + put(y, slots).astype(x.dtype)
        ffn_slots = active_slots(ffn_on, capacity)
        x = x + put(self.ffn(self.ffn_norm(take(x, ffn_slots.idx))), ffn_slots).astype(x.dtype)
        return x, slots.dropped + ffn_slots.dropped

    def step(
        self,
        state: LayerStreamState,
        x: jax.Array,
        kv_positions: jax.Array,
        mask: jax.Array,
        *,
        attn_gate: jax.Array | None = None,
        ffn_gate: jax.Array | None = None,
        capacities: tuple[int, ...] | None = None,
        whole: bool = False,
    ) -> tuple[LayerStreamState, jax.Array]:
        """Takes the newest input chunk x [B,C,D] (at kv_positions [C]) and returns the output
        chunk L chunks earlier (L = lookahead; the pending inputs wait in the state's buffer).

        mask: bool, broadcastable to [B,1,C,S+C] over the keys [cache; x]. Gates [B,C] refer to
        the output chunk and need L = 0. `capacities` (skipping execution, hard gates given):
        each component runs at the smallest of these capacities that holds its active frames;
        `whole` (skipping, equal gates): the block runs or is skipped as one branch.
        """
        cache, pending = state
        c = x.shape[1]
        if (attn_gate is not None or ffn_gate is not None) and pending.shape[1]:
            raise ValueError("gated streaming needs lookahead_chunks = 0")
        if capacities is not None:
            return self._step_skipping(
                state, x, kv_positions, mask, attn_gate, ffn_gate, capacities, whole
            )
        kv_in = self.attn_norm(x)
        if pending.shape[1]:  # lookahead: the query chunk is the oldest pending one
            inputs = jnp.concatenate([pending, x], axis=1)
            x, pending = inputs[:, :c], inputs[:, c:]
            q_in = self.attn_norm(x)
        else:
            q_in = kv_in
        q_positions = kv_positions - pending.shape[1]
        kv_valid = None if attn_gate is None else hard(attn_gate)
        cache, y = self.attn.step(cache, q_in, kv_in, q_positions, kv_positions, mask, kv_valid)
        x = _gated(x, y, attn_gate)
        return (cache, pending), _gated(x, self.ffn(self.ffn_norm(x)), ffn_gate)

    def _step_skipping(self, state, x, kv_positions, mask, attn_gate, ffn_gate, capacities, whole):
        """Skipping execution of one chunk of B streams: each component's active frames, pooled
        over the batch ([B, C] -> B*C frames), are gathered into the smallest of `capacities`
        that holds them all (`lax.switch`: one branch per capacity; 0 runs nothing; the full
        B*C runs the masked computation instead, as many frames without the gathering).
        `whole` (the two gates are equal): one switch for the whole block."""
        cache, pending = state
        b, c, _ = x.shape
        full = b * c
        flat = lambda a: a.reshape((1, full) + a.shape[2:])  # noqa: E731
        rows = lambda a: a.reshape((b, c) + a.shape[2:])  # noqa: E731
        attn_on, ffn_on = flat(hard(attn_gate)), flat(hard(ffn_gate))
        positions = jnp.tile(kv_positions, b)

        def attention(capacity, cache, x):
            if capacity == 0:
                return self.attn.push_invalid(cache, c), jnp.zeros_like(x)
            if capacity == full:  # masked: as many frames as gathering, and no gathering
                on, h = rows(attn_on), self.attn_norm(x)
                cache, y = self.attn.step(cache, h, h, kv_positions, kv_positions, mask, on)
                return cache, (on[..., None] * y).astype(x.dtype)
            slots = active_slots(attn_on, capacity)
            xs = flat(x)
            q, k, v = self.attn.qkv(self.attn_norm(take(xs, slots.idx)), positions[slots.idx])
            q, k, v = (rows(put(a, slots)) for a in (q, k, v))
            # scores for every query of the chunk (a few % of the block's FLOPs), the
            # projections only for the active frames (the capacity holds them all)
            cache, ctx = self.attn.attend_cached(cache, q, k, v, mask, rows(attn_on), project=False)
            y = self.attn.dropout(self.attn.out(take(flat(ctx), slots.idx)))
            return cache, rows(put(y, slots)).astype(x.dtype)

        def ffn(capacity, x):
            if capacity == 0:
                return jnp.zeros_like(x)
            if capacity == full:
                return (rows(ffn_on)[..., None] * self.ffn(self.ffn_norm(x))).astype(x.dtype)
            slots = active_slots(ffn_on, capacity)
            xs = flat(x)
            return rows(put(self.ffn(self.ffn_norm(take(xs, slots.idx))), slots)).astype(x.dtype)

        def block(capacity, cache, x):
            cache, y = attention(capacity, cache, x)
            x = x + y
            return cache, x + ffn(capacity, x)

        if whole:
            cache, x = by_capacity(jnp.sum(attn_on), capacities, block, cache, x)
            return (cache, pending), x
        cache, y = by_capacity(jnp.sum(attn_on), capacities, attention, cache, x)
        x = x + y
        return (cache, pending), x + by_capacity(jnp.sum(ffn_on), capacities, ffn, x)


class Encoder(nnx.Module):
    """Stack of `EncoderBlock`s with chunked attention, plus a final LayerNorm; with
    `cfg.arbitrator` set, an `Arbitrator` gates each block's components per frame."""

    def __init__(self, cfg: TransducerConfig, *, rngs: nnx.Rngs):
        self.chunk_size = cfg.chunk_size
        self.left_chunks = cfg.left_chunks
        self.lookahead_chunks = cfg.lookahead_chunks
        self.max_stream_frames = cfg.max_stream_frames
        self.d_model = cfg.d_model
        self.dtype = cfg.compute_dtype
        self.blocks = nnx.List([EncoderBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = layer_norm(cfg.d_model, cfg, rngs=rngs)
        self.arbitrator = Arbitrator(cfg, rngs=rngs) if cfg.arbitrator != "none" else None
        self.static_gates = cfg.static_gates

    @property
    def gated(self) -> bool:
        """Whether components can be off: arbitrators or static pruning."""
        return self.arbitrator is not None or self.static_gates is not None

    def context(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        """The chunked mask between arbitrary frame positions (`attention.chunk_context`)."""
        return chunk_context(
            q_positions, k_positions, self.chunk_size, self.left_chunks, self.lookahead_chunks
        )

    def attention_mask(self, lengths: jax.Array, num_frames: int) -> jax.Array:
        """Boolean [B, 1, T, T]: chunked mask and key padding."""
        frames = jnp.arange(num_frames)
        chunks = self.context(frames, frames)
        return chunks[None, None] & length_mask(lengths, num_frames)[:, None, None, :]

    def _layer_gates(self, i, block, x, acoustic, valid, attn_gates, ffn_gates):
        """Layer i's (attention, FFN) gates [B,T]: the caller's, the arbitrator's, the static
        pruning's (off: zeros; on: None), or None."""
        if acoustic is None and attn_gates is None and ffn_gates is None and self.static_gates:
            off = jnp.zeros(valid.shape, jnp.float32)
            attn_on, ffn_on = self.static_gates[i]
            return None if attn_on else off, None if ffn_on else off
        if acoustic is None:
            return (
                None if attn_gates is None else attn_gates[i],
                None if ffn_gates is None else ffn_gates[i],
            )
        logits = acoustic[i]
        extra = self.arbitrator.block_logits(i, block.attn_norm(x))
        if extra is not None:
            logits = logits + extra
        gates = self.arbitrator.gates(logits, valid)
        return gates[0], gates[1]

    def forward(
        self,
        x: jax.Array,
        lengths: jax.Array,
        *,
        attn_gates: jax.Array | None = None,
        ffn_gates: jax.Array | None = None,
        capacity: int | None = None,
    ) -> tuple[jax.Array, GateTrace]:
        """x [B,T,D], lengths [B] -> ([B,T,D], GateTrace). Gates: [num_layers, B, T] each, or
        None (then the arbitrator's, if the model has one). `capacity` (frames per utterance per
        component): gathered execution with hard gates (inference)."""
        b, t, _ = x.shape
        valid = length_mask(lengths, t)
        mask = self.attention_mask(lengths, t)
        positions = jnp.arange(t, dtype=jnp.int32)
        acoustic = None
        if attn_gates is None and ffn_gates is None and self.arbitrator is not None:
            acoustic = self.arbitrator.acoustic_logits(x)
        dropped = jnp.zeros((b,), jnp.int32)
        used = []
        for i, block in enumerate(self.blocks):
            ga, gf = self._layer_gates(i, block, x, acoustic, valid, attn_gates, ffn_gates)
            if capacity is None:
                x = block(x, mask, positions, attn_gate=ga, ffn_gate=gf)
            else:
                on_a = valid if ga is None else hard(ga) & valid
                on_f = valid if gf is None else hard(gf) & valid
                x, d = block.gathered(x, self.context, on_a, on_f, capacity)
                dropped = dropped + d
            ones = valid.astype(jnp.float32)
            used.append((ones if ga is None else ga * ones, ones if gf is None else gf * ones))
        trace = GateTrace(jnp.stack([a for a, _ in used]), jnp.stack([f for _, f in used]), dropped)
        return self.norm(x), trace

    def __call__(
        self,
        x: jax.Array,
        lengths: jax.Array,
        *,
        attn_gates: jax.Array | None = None,
        ffn_gates: jax.Array | None = None,
    ) -> jax.Array:
        """x [B,T,D], lengths [B] -> [B,T,D] (`forward` without the trace)."""
        return self.forward(x, lengths, attn_gates=attn_gates, ffn_gates=ffn_gates)[0]

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

    def stream_capacities(self, batch: int) -> tuple[int, ...]:
        """Capacities of skipping execution for `batch` streams of C-frame chunks (N = batch * C
        frames): 0 (not run), the powers of two below N, and the multiples of max(C, N / 8) up
        to N (so a busy batch wastes at most an eighth of N, not up to half)."""
        full = batch * self.chunk_size
        step = max(self.chunk_size, full // 8)
        sizes, k = {0, *range(step, full + 1, step), full}, 1
        while k < full:
            sizes.add(k)
            k *= 2
        return tuple(sorted(sizes))

    def init_state(self, batch: int) -> tuple[LayerStreamState, ...]:
        """Per layer: empty KV cache ([B, cache_size, H, K] x 2 and validity [B, cache_size])
        and pending inputs [B, L*C, D]."""
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
        skip: bool = False,
    ) -> tuple[tuple[LayerStreamState, ...], jax.Array]:
        """Feeds chunk x [B, C, D] at encoder frames offset..offset+C-1 (offset: int32 scalar,
        shared by the batch); returns the output chunk at frames offset - delay_chunks * C.

        `end` [B] (optional): frames at positions >= end are padding (masked as keys, exactly as
        `__call__` masks frames >= lengths). Gates: [num_layers, B, C] each, or None (then the
        arbitrator's, if any); layer i's gates refer to its output chunk (frames offset - (i + 1)
        * lookahead_chunks * C ...). Gates (given or the arbitrator's) need lookahead_chunks = 0
        here (`encode` takes any lookahead). `skip` (hard gates): components run only on their
        active frames (skipping execution, see the module docstring). C must be `chunk_size`.
        """
        b, c, _ = x.shape
        if c != self.chunk_size:
            raise ValueError(f"a streamed chunk has chunk_size = {self.chunk_size} frames, got {c}")
        size, ahead = self.cache_size, self.lookahead_chunks * c
        frame_pos = offset + jnp.arange(c, dtype=jnp.int32)
        valid = jnp.ones((b, c), bool) if end is None else frame_pos[None, :] < end[:, None]
        acoustic = None
        if attn_gates is None and ffn_gates is None and self.arbitrator is not None:
            acoustic = self.arbitrator.acoustic_logits(x)
        whole = acoustic is not None and self.arbitrator.whole_block  # equal gates per layer
        new_state = []
        for i, (layer_state, block) in enumerate(zip(state, self.blocks, strict=True)):
            start = offset - i * ahead  # position of this layer's newest input chunk
            key_pos = start - size + jnp.arange(size + c, dtype=jnp.int32)  # [cache; chunk]
            key_valid = jnp.broadcast_to(key_pos >= 0, (b, size + c))
            if end is not None:
                key_valid &= key_pos[None, :] < end[:, None]
            ga, gf = self._layer_gates(i, block, x, acoustic, valid, attn_gates, ffn_gates)
            skipping = skip and (ga is not None or gf is not None)
            if skipping:
                ga = valid.astype(jnp.float32) if ga is None else ga
                gf = valid.astype(jnp.float32) if gf is None else gf
            layer_state, x = block.step(
                layer_state,
                x,
                key_pos[size:],
                key_valid[:, None, None, :],
                attn_gate=ga,
                ffn_gate=gf,
                capacities=self.stream_capacities(b) if skipping else None,
                whole=whole,
            )
            new_state.append(layer_state)
        return tuple(new_state), self.norm(x)
