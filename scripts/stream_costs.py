r"""What a streamed component's time is made of, on a random model (no trained model or data).
The modes of `scripts/bench_arbitrator.py` that price the compute loss in time:

`--component_costs` (no trained model or data): streaming time per layer of attention and of
feed-forward, each measured by switching the other off everywhere (static pruning of a random
model of `--config`), against their FLOP ratio: the `model.attention_cost` that makes the compute
loss price time instead of FLOPs on this machine.

  python scripts/bench_arbitrator.py --component_costs \
      --config experiments/commands_arbitrator.py:none,scratch,deep --streams 16 \
      --utterances 64 --seconds 3

`--frame_costs` (no trained model or data): streaming time of a random gated model of `--config`
with every component on for k = 0, 1, 2, 4, 8 frames of each chunk. A line through it splits a
component's time into a part per chunk it runs in and a part per frame it runs on: the share per
chunk is the `model.chunk_price_share` (`priced=S`) that makes the compute loss price time.

  python scripts/bench_arbitrator.py --frame_costs \
      --config experiments/commands_arbitrator.py:none,scratch,deep --set num_layers=16
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech import pyfile
from jaxspeech.models import flops

_bench = pyfile.sibling(__file__, "bench_arbitrator")
config_model, interleaved_seconds, stream_pass = (
    _bench.config_model, _bench.interleaved_seconds, _bench.stream_pass,
)  # fmt: skip


def component_costs(
    config_path: str, streams: int, utterances: int, seconds: float, repeats: int = 5,
    **model_fields,
) -> dict:  # fmt: skip
    """Streaming wall time per layer of attention and of feed-forward, against their FLOPs.

    The config's encoder (random weights) streams `utterances` random inputs of `seconds` each,
    `streams` at once, four ways: every component on, feed-forward networks off everywhere
    (attention only), attention off everywhere, all off (static pruning, skipping execution);
    timed interleaved ("all" is reported as a check: about attention + ffn - none). Per layer,
    attention's time is (attention only - all off) / L, and the
    same for feed-forward; `attention_cost` = (attention time / FFN time) / (attention FLOPs /
    FFN FLOPs): the `model.attention_cost` that makes the compute loss a fraction of time.
    `model_fields` override the config's model section."""
    cfg = config_model(config_path, **model_fields).cfg
    on, off = "1" * cfg.num_layers, "0" * cfg.num_layers
    variants = {"all": (on, on), "attention": (on, off), "ffn": (off, on), "none": (off, off)}
    frames = int(seconds * 100)
    feat = np.random.default_rng(0).normal(size=(frames, cfg.num_mels)).astype(np.float32)
    passes = {}
    for name, (attn, ffn) in variants.items():
        static = dict(arbitrator="none", static_attention=attn, static_ffn=ffn)
        model = config_model(config_path, **model_fields, **static)
        passes[name] = stream_pass(model, [feat] * utterances, skip=True, streams=streams)
    t = interleaved_seconds(passes, repeats)
    layers, n = cfg.num_layers, frames // cfg.subsampling_factor
    f = flops.encoder_flops(cfg, jnp.array([n]), n)
    attn_flops, ffn_flops = float(f["attention_full"][0]), float(f["ffn_full"][0])
    attn_s = (t["attention"] - t["none"]) / layers
    ffn_s = (t["ffn"] - t["none"]) / layers
    out = {
        "streams": streams,
        "seconds": t,
        "attention_s_per_layer": attn_s,
        "ffn_s_per_layer": ffn_s,
        "time_ratio": attn_s / ffn_s,
        "flop_ratio": attn_flops / ffn_flops,
    }
    out["attention_cost"] = out["time_ratio"] / out["flop_ratio"]
    return out


def frame_pattern_pass(model, feats: list[np.ndarray], k: int, *, skip: bool, streams: int = 1):
    """`stream_pass` of an arbitrated `model` whose gates, in every layer and for attention and
    feed-forward alike, are on for the first `k` frames of each chunk and off for the rest,
    whatever the input (the arbitrator's logits replaced while the pass is compiled: it is
    compiled once, in `stream_pass`, and keeps the pattern)."""
    from unittest import mock

    from jaxspeech.models.arbitrator import Arbitrator

    layers, chunk = model.cfg.num_layers, model.cfg.chunk_size

    def pattern(self, x):  # x [B, T, D] -> logits [L, 2, B, T]
        on = (jnp.arange(x.shape[1]) % chunk) < k
        return jnp.broadcast_to(jnp.where(on, 1.0, -1.0), (layers, 2, *x.shape[:2]))

    with mock.patch.object(Arbitrator, "acoustic_logits", pattern):
        return stream_pass(model, feats, skip=skip, streams=streams)


def frame_costs(
    config_path: str, streams: int, utterances: int, seconds: float, repeats: int = 5,
    ks: tuple[int, ...] = (0, 1, 2, 4, 8), **model_fields,
) -> dict:  # fmt: skip
    """Streaming wall time of the gated encoder with every component on for k frames of each
    chunk (`frame_pattern_pass`, skipping execution; k in `ks`, powers of two so that the
    gathered capacities are exact), timed interleaved with the ungated encoder of the same
    config. The least-squares line through time(k) - time(0) for k >= 1, a + b k, splits a
    component's time in a chunk into a part per chunk it runs in (a) and a part per frame (b):
    `chunk_share` = a / (a + chunk b) is the `model.chunk_price_share` that makes the per-chunk
    price a price of this machine's time. `model_fields` override the config's model section."""
    gated = dict(arbitrator="acoustic", gate_per_chunk=False, ffn_per_frame=False)
    model = config_model(config_path, **model_fields, **gated)
    cfg = model.cfg
    plain = dict(arbitrator="none", static_attention="", static_ffn="")
    ungated = config_model(config_path, **model_fields, **plain)
    feat = np.random.default_rng(0).normal(size=(int(seconds * 100), cfg.num_mels))
    feats = [feat.astype(np.float32)] * utterances
    passes = {"ungated": stream_pass(ungated, feats, skip=False, streams=streams)}
    for k in ks:
        passes[k] = frame_pattern_pass(model, feats, k, skip=True, streams=streams)
    t = interleaved_seconds(passes, repeats)
    on = [k for k in ks if k > 0]
    b, a = np.polyfit(on, [t[k] - t[0] for k in on], 1)
    return {
        "streams": streams,
        "seconds": {str(k): v for k, v in t.items()},
        "per_chunk_s": float(a),
        "per_frame_s": float(b),
        "chunk_share": float(a / (a + cfg.chunk_size * b)),
    }


def report(
    config_path: str, streams: int, utterances: int, seconds: float, *, per_frame: bool,
    fields: dict,
) -> dict:  # fmt: skip
    """Runs `frame_costs` (`per_frame`) or `component_costs`, prints its JSON and a summary."""
    kind = jax.devices()[0].device_kind
    if per_frame:
        out = frame_costs(config_path, streams, utterances, seconds, **fields)
        summary = (
            f"per component and chunk: {1e3 * out['per_chunk_s']:.2f} ms once it runs, "
            f"{1e3 * out['per_frame_s']:.2f} ms per frame: chunk_price_share "
            f"{out['chunk_share']:.2f} ({streams} streams, on {kind})"
        )
    else:
        out = component_costs(config_path, streams, utterances, seconds, **fields)
        summary = (
            f"per layer: attention {1e3 * out['attention_s_per_layer']:.1f} ms, feed-forward "
            f"{1e3 * out['ffn_s_per_layer']:.1f} ms (time ratio {out['time_ratio']:.2f}, FLOP "
            f"ratio {out['flop_ratio']:.2f}): attention_cost {out['attention_cost']:.2f} "
            f"({streams} streams, on {kind})"
        )
    print(json.dumps(out, indent=1))
    print(summary)
    return out
