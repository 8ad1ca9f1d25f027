"""Analytic encoder FLOP counts, full and executed under arbitrator gates (per utterance).

Counted: the matrix products, 2 FLOPs per multiply-add; elementwise work (norms, softmax, rotary,
activations, residual adds) is not counted (a few percent at these sizes, and the same whether a
component is gated or not). With D = d_model, M = mlp_dim, A = arbitrator_dim, L = num_layers, per
valid encoder frame t and layer:

  attention, if frame t's attention is on:  8 D^2 (query, key, value and output projections)
            + 4 D * n_t (scores and weighted values against its n_t visible keys)
  feed-forward, if on:                       4 D M
  arbitrator (always runs):                  2 D A + 4 A L  (+ 4 D per layer for acoustic+block)

A frame whose attention is off is not a key or value for anyone in that layer (its projections
are skipped, see `jaxspeech.models.encoder`), so n_t counts the *active* frames in t's chunked
context: with gates g (in [0, 1]) and the context matrix C (chunk mask & both frames valid), the
context cost is 4 D * g^T C g. The same formula, with g = the relaxed gates, is the differentiable
compute loss (`compute_fraction`); with hard gates it is the executed count. The convolutional
front end (`subsampling`) is never gated and is reported separately: "gated encoder" fractions
are over the Transformer stack plus arbitrator, "whole encoder" ones add the front end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxspeech.models.arbitrator import frame_chunks
from jaxspeech.models.attention import chunk_mask, length_mask
from jaxspeech.models.config import TransducerConfig


def subsampling_flops_per_frame(cfg: TransducerConfig) -> int:
    """FLOPs of the convolutional front end per encoder frame (3x3 stride-2 convs + projection)."""
    n = cfg.num_subsampling_layers
    freq, channels, total = [cfg.num_mels], [1], 0
    for j in range(1, n + 1):
        freq.append((freq[-1] + 1) // 2)
        channels.append(cfg.subsampling_channels)
        time_frames = 2 ** (n - j)  # layer j's output frames per encoder frame
        total += 2 * time_frames * freq[j] * channels[j] * 9 * channels[j - 1]
    return total + 2 * channels[-1] * freq[-1] * cfg.d_model


def arbitrator_flops_per_frame(cfg: TransducerConfig) -> int:
    if cfg.arbitrator == "none":
        return 0
    d, a, n = cfg.d_model, cfg.arbitrator_dim, cfg.num_layers
    block = 2 * d * 2 * n if cfg.arbitrator == "acoustic+block" else 0
    return 2 * d * a + 2 * a * 2 * n + block


def encoder_flops(
    cfg: TransducerConfig,
    lengths: jax.Array,
    num_frames: int,
    attn_gates: jax.Array | None = None,
    ffn_gates: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Per-utterance FLOPs [B] (float32) of the encoder on `num_frames` padded encoder frames.

    Gates: [num_layers, B, T] values (None: all on). Returns the components `attention_proj`,
    `attention_context`, `ffn`, `arbitrator`, `subsampling`, and `gated` (their sum without the
    front end), `gated_full` (the same with every gate on, arbitrator included; its parts
    `attention_full` and `ffn_full`) and `whole`, `whole_full` (with the front end).
    """
    d, m = cfg.d_model, cfg.mlp_dim
    valid = length_mask(lengths, num_frames).astype(jnp.float32)  # [B, T]
    context = chunk_mask(num_frames, cfg.chunk_size, cfg.left_chunks, cfg.lookahead_chunks)
    context = context[None].astype(jnp.float32) * valid[:, :, None] * valid[:, None, :]
    on = jnp.broadcast_to(valid, (cfg.num_layers, *valid.shape))
    ga = on if attn_gates is None else attn_gates.astype(jnp.float32) * valid
    gf = on if ffn_gates is None else ffn_gates.astype(jnp.float32) * valid
    frames = jnp.sum(valid, axis=1)

    def attention(g):
        proj = 8.0 * d * d * jnp.sum(g, axis=(0, 2))
        pairs = jnp.einsum("lbt,bts,lbs->b", g, context, g)
        return proj, 4.0 * d * pairs

    proj, ctx = attention(ga)
    full_proj, full_ctx = attention(on)
    out = {
        "attention_proj": proj,
        "attention_context": ctx,
        "ffn": 4.0 * d * m * jnp.sum(gf, axis=(0, 2)),
        "arbitrator": float(arbitrator_flops_per_frame(cfg)) * frames,
        "subsampling": float(subsampling_flops_per_frame(cfg)) * frames,
    }
    out["gated"] = out["attention_proj"] + out["attention_context"] + out["ffn"] + out["arbitrator"]
    out["attention_full"] = full_proj + full_ctx
    out["ffn_full"] = 4.0 * d * m * cfg.num_layers * frames
    out["gated_full"] = out["attention_full"] + out["ffn_full"] + out["arbitrator"]
    out["whole"] = out["gated"] + out["subsampling"]
    out["whole_full"] = out["gated_full"] + out["subsampling"]
    return out


def chunk_priced(gates: jax.Array, valid: jax.Array, chunk: int, share: float = 1.0) -> jax.Array:
    """Gates [..., B, T] priced per chunk (`TransducerConfig.price_per_chunk`): every valid frame
    of a chunk (frames [k chunk, (k + 1) chunk)) takes the chunk's largest gate value, so with
    hard gates a component costs its whole chunk when it is on for any frame of it. The gradient
    goes to the chunk's largest gates (shared equally among ties): with all 8 frames on, each
    frame carries an eighth of the chunk's price, with one frame left on, all of it.

    `share` < 1 (`TransducerConfig.chunk_price_share`) mixes in the per-frame price: the result
    is share * (the above) + (1 - share) * gates, a cost of share per chunk that runs plus
    1 - share per frame that runs (in units of a full chunk's price)."""
    g = jnp.where(valid, gates, 0.0)
    peak = jnp.max(frame_chunks(g, chunk), axis=-1)
    whole = jnp.where(valid, jnp.repeat(peak, chunk, axis=-1)[..., : valid.shape[-1]], 0.0)
    return share * whole + (1 - share) * g


def compute_fraction(
    cfg: TransducerConfig, lengths: jax.Array, attn_gates: jax.Array, ffn_gates: jax.Array
) -> jax.Array:
    """Executed gated-encoder FLOPs as a fraction of the ungated model's (the same model without
    arbitrators), per utterance [B]; differentiable in the gates (the compute loss).

    With `cfg.attention_cost` = s != 1, attention FLOPs (projections and context) count s times
    in both the executed and the ungated cost: a cost in time on hardware where an attention
    FLOP takes s times as long as a feed-forward one (`scripts/bench_arbitrator.py
    --component_costs` measures s); the reported FLOP counts (`encoder_flops`) do not change.
    With `cfg.price_per_chunk`, the gates are priced per chunk first (`chunk_priced`, with
    `cfg.chunk_price_share` of the price per chunk)."""
    if cfg.price_per_chunk:
        valid = length_mask(lengths, attn_gates.shape[-1])
        share = cfg.chunk_price_share
        attn_gates = chunk_priced(attn_gates, valid, cfg.chunk_size, share)
        ffn_gates = chunk_priced(ffn_gates, valid, cfg.chunk_size, share)
    f = encoder_flops(cfg, lengths, attn_gates.shape[-1], attn_gates, ffn_gates)
    s = cfg.attention_cost
    executed = s * (f["attention_proj"] + f["attention_context"]) + f["ffn"] + f["arbitrator"]
    ungated = s * f["attention_full"] + f["ffn_full"]
    return executed / jnp.maximum(ungated, 1.0)


def budget_excess(fraction: jax.Array, valid: jax.Array, target: float | jax.Array) -> jax.Array:
    """The compute budget's loss term per utterance [B] (`TransducerConfig.compute_target`):
    its mean over the valid utterances is max(0, mean(fraction) - target), the batch's excess
    over the budget. Below the budget every entry is 0; above it, each valid utterance's
    entry is fraction - target, so each one's gradient is the plain compute loss's and an
    utterance under the budget still pays (the batch's mean is what is bounded)."""
    valid = valid.astype(fraction.dtype)
    mean = jnp.sum(fraction * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    over = (mean > target).astype(fraction.dtype)  # a step: no gradient flows through it
    return (fraction - target) * over * valid
