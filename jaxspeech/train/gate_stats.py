"""What a model's hard gates execute over a set of batches.

`traces` runs the encoder under the model's inference gates (the arbitrators' hard decisions, or
static pruning; an ungated model runs everything) and yields, per batch, the per-utterance FLOP
counts of `jaxspeech.models.flops.encoder_flops` (plus `gated_chunks`: the gated stack priced per
chunk, `flops.chunk_priced`, where a component counts for a whole chunk if any frame of it has it
on: what batch-1 streaming spends) and the gates themselves. `executed` sums them: FLOPs, and per
layer the fraction of valid frames each component runs on. The arbitrator bench, the gate
analysis and the static export read the gates through these two functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspeech.models import flops
from jaxspeech.models.attention import length_mask


def traces(model, batches):
    """Yields, per (feats [B, T, F], feat_lengths [B]) of `batches`, numpy arrays: (per-utterance
    FLOPs [B] by `flops.encoder_flops` key and `gated_chunks`; attention gates [L, B, T];
    feed-forward gates [L, B, T]; encoder lengths [B]). One compile per padded length."""
    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def trace_of(state, x, lengths):
        m = nnx.merge(graphdef, state)
        _, enc_lengths, trace = m.encode_with_trace(x, lengths)
        cfg, t = m.cfg, trace.attn.shape[-1]
        out = flops.encoder_flops(cfg, enc_lengths, t, trace.attn, trace.ffn)
        valid = length_mask(enc_lengths, t)
        whole = [flops.chunk_priced(g, valid, cfg.chunk_size) for g in (trace.attn, trace.ffn)]
        out["gated_chunks"] = flops.encoder_flops(cfg, enc_lengths, t, *whole)["gated"]
        return out, trace.attn, trace.ffn, enc_lengths

    for feats, lengths in batches:
        yield jax.tree.map(np.asarray, trace_of(state, jnp.asarray(feats), jnp.asarray(lengths)))


def executed(model, batches) -> dict:
    """Over `batches`: each `traces` FLOP key summed over the utterances (float64), `frames` (the
    valid encoder frames), and `attn_on` / `ffn_on` (per layer [L], the fraction of the valid
    frames whose gate is on)."""
    totals: dict = {"frames": 0.0}
    on = {"attn_on": 0.0, "ffn_on": 0.0}
    for counts, attn, ffn, enc_lengths in traces(model, batches):
        for k, v in counts.items():
            totals[k] = totals.get(k, 0.0) + float(np.sum(v, dtype=np.float64))
        valid = np.arange(attn.shape[-1])[None] < enc_lengths[:, None]  # [B, T]
        for k, g in (("attn_on", attn), ("ffn_on", ffn)):
            on[k] = on[k] + np.sum((g > 0.5) & valid, axis=(1, 2), dtype=np.float64)
        totals["frames"] += float(np.sum(enc_lengths))
    if totals["frames"] == 0:
        raise ValueError("the batches have no valid frames: give them some utterances")
    totals.update({k: v / totals["frames"] for k, v in on.items()})
    return totals
