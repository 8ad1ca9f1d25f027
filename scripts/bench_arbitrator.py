r"""Arbitrated encoder: executed compute and measured wall time against a baseline.

  python scripts/bench_arbitrator.py --workdir runs/arbitrator/arbitrator_4 \
      --baseline runs/arbitrator/none --utterances 200
  python scripts/bench_arbitrator.py --workdir runs/arbitrator/arbitrator_4 \
      --baseline runs/arbitrator/none --utterances 200 --streams 16
  python scripts/bench_arbitrator.py --synthetic --config experiments/librispeech_arbitrator.py \
      --batch 16 --seconds 16 --keep 1,0.6,0.4,0.2

For the first `--utterances` of the test split: the executed encoder FLOPs under the model's
hard gates (`jaxspeech.models.flops`; the gated Transformer stack with its arbitrator, the
whole encoder with the convolutional front end, and the gated stack priced per chunk, where a
component counts for a whole chunk if any frame of it has it on) as a fraction of the baseline
model's, and the wall time of streaming each utterance alone (batch 1, chunk by chunk through
`encode_step` in one jitted loop per utterance, as an on-device recognizer runs) with gated-off
components skipped, with them computed and masked, and for the baseline, each timed in the same
run after a warm-up (compile) call. Ratios < 1 mean faster than the baseline. `--streams B`: a
server streaming B utterances at once, in lock step; skipping then gathers each component's
active frames over the whole batch, so frames switched off turn into time even where the chunks
they sit in are partly on.

`--component_costs` and `--frame_costs` (no trained model or data): what a streamed component's
time is made of, on a random model of `--config` (`scripts/stream_costs.py`, which documents them).

`--synthetic` (no trained model or data): batched offline encoding of random features by the
config's encoder with random per-frame gates keeping a fraction `--keep` of each component, timed
three ways: ungated, masked (every frame computed, the training-time execution) and gathered (the
active frames in fixed-capacity buffers, capacity = keep * frames * 1.25), with the gathered
output checked against the masked one.
"""

from __future__ import annotations

import argparse
import ast
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech.train import gate_stats

EVAL_BATCH = 32


def test_features(config, n: int, data_dir: str = "", split: str = "test") -> list[np.ndarray]:
    """Log-mel features [T, F] of the first n utterances of the config's test split (or of
    `split`: `config.data[split]`, e.g. "validation")."""
    from jaxspeech import features
    from jaxspeech.data import sources

    source = sources.open_source(config.data[split], data_dir=data_dir or None)
    log_mel = jax.jit(features.log_mel)
    out = []
    for i in range(min(n, len(source))):
        audio = np.asarray(source[i]["audio"], np.float32)[None]
        feats, lengths = log_mel(jnp.asarray(audio), jnp.array([audio.shape[1]]))
        out.append(np.asarray(feats[0, : int(lengths[0])]))
    return out


def padded(batch: list[np.ndarray], multiple: int):
    """(feats [B, T, F], lengths [B]): the batch zero-padded to T, a multiple of `multiple`."""
    t = -(-max(f.shape[0] for f in batch) // multiple) * multiple
    x = np.zeros((len(batch), t, batch[0].shape[1]), np.float32)
    for i, f in enumerate(batch):
        x[i, : f.shape[0]] = f
    return jnp.asarray(x), jnp.array([f.shape[0] for f in batch], jnp.int32)


def batches(feats: list[np.ndarray]):
    """`padded` batches of `EVAL_BATCH` utterances of `feats`, in order (one compile per 4 s of
    padding)."""
    for i in range(0, len(feats), EVAL_BATCH):
        yield padded(feats[i : i + EVAL_BATCH], 400)


def executed_flops(model, feats: list[np.ndarray]) -> dict:
    """Summed per-utterance FLOPs under the model's hard gates (`gate_stats.executed`), with the
    per-layer fractions of frames each component runs on (`attn_on`, `ffn_on`) as lists."""
    totals = gate_stats.executed(model, batches(feats))
    for k in ("attn_on", "ffn_on"):
        totals[k] = [round(float(v), 4) for v in totals[k]]
    return totals


def stream_pass(model, feats: list[np.ndarray], *, skip: bool, streams: int = 1):
    """A callable that streams every utterance through the encoder, chunk by chunk, once.

    `streams` = 1: each utterance alone (batch 1), as an on-device recognizer runs; more: a
    server streaming that many utterances at once in lock step (the utterances sorted by length
    and taken in groups, the last group filled with empty streams). One jitted call per group
    whose `fori_loop` runs `encode_step` for exactly the group's chunks (no host round trip per
    chunk). Compiled and run once (untimed) before it is returned."""
    from flax import nnx

    model.eval()
    graphdef, state = nnx.split(model)
    n, c, d = model.feat_chunk_size, model.cfg.chunk_size, model.cfg.d_model
    max_chunks = max(-(-f.shape[0] // n) for f in feats)

    @jax.jit
    def encode(state, x, length):
        m = nnx.merge(graphdef, state)

        def body(i, carry):
            stream, out = carry
            chunk = jax.lax.dynamic_slice_in_dim(x, i * n, n, axis=1)
            lens = jnp.clip(length - i * n, 0, n).astype(jnp.int32)
            stream, y = m.encode_step(stream, chunk, lens, skip=skip)
            return stream, jax.lax.dynamic_update_slice_in_dim(out, y, i * c, axis=1)

        out = jnp.zeros((streams, max_chunks * c, d), m.encoder.dtype)
        chunks = (jnp.max(length) + n - 1) // n
        return jax.lax.fori_loop(0, chunks, body, (m.encode_init_state(streams), out))[1]

    order = list(range(len(feats)))
    if streams > 1:
        order.sort(key=lambda i: len(feats[i]))
    inputs = []
    for g in range(0, len(order), streams):
        x = np.zeros((streams, max_chunks * n, feats[0].shape[1]), np.float32)
        lengths = np.zeros((streams,), np.int32)
        for k, i in enumerate(order[g : g + streams]):
            x[k, : len(feats[i])], lengths[k] = feats[i], len(feats[i])
        inputs.append((jnp.asarray(x), jnp.asarray(lengths)))

    def run(keep: bool = False):
        """Streams every group; with `keep`, returns each utterance's valid encoder frames
        [T_i, D], in the order of `feats`."""
        outs = [jax.block_until_ready(encode(state, x, length)) for x, length in inputs]
        if not keep:
            return None
        enc = [None] * len(feats)
        for j, i in enumerate(order):
            frames = len(feats[i]) // model.cfg.subsampling_factor
            enc[i] = np.asarray(outs[j // streams][j % streams, :frames])
        return enc

    jax.block_until_ready(encode(state, *inputs[0]))
    return run


def interleaved_seconds(passes: dict, repeats: int) -> dict[str, float]:
    """Best wall seconds of each pass over `repeats` rounds, the passes taking turns within each
    round: on a shared machine whose speed drifts over minutes, drift then hits every pass alike
    instead of whichever was timed during the slow minute (ratios of back-to-back blocks of
    passes moved by up to 2x between runs, experiments/RESULTS.md)."""
    best = dict.fromkeys(passes, float("inf"))
    for _ in range(repeats):
        for name, run in passes.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def measure(
    workdir: str, baseline: str, n: int, data_dir: str = "", repeats: int = 5, streams: int = 1
) -> dict:
    """Compute fractions and streaming wall-time ratios of `workdir` against `baseline` (both
    timed in this call, best of `repeats` interleaved passes each; `streams` at once)."""
    from jaxspeech.train import evaluate

    trained = evaluate.load_trained(workdir)
    base_model = evaluate.load_trained(baseline).model
    feats = test_features(trained.config, n, data_dir)
    base, ours = executed_flops(base_model, feats), executed_flops(trained.model, feats)
    gated = trained.model.encoder.gated
    passes = {
        "baseline_stream_s": stream_pass(base_model, feats, skip=False, streams=streams),
        "stream_s": stream_pass(trained.model, feats, skip=gated, streams=streams),
    }
    if gated:
        passes["masked_stream_s"] = stream_pass(trained.model, feats, skip=False, streams=streams)
    row = {
        "utterances": len(feats),
        "streams": streams,
        "compute_gated": ours["gated"] / base["gated_full"],
        "compute_whole": ours["whole"] / base["whole_full"],
        "compute_chunks": ours["gated_chunks"] / base["gated_full"],
        "attn_on": ours["attn_on"],
        "ffn_on": ours["ffn_on"],
        **interleaved_seconds(passes, repeats),
    }
    row["stream_ratio"] = row["stream_s"] / row["baseline_stream_s"]
    return row


def _timed(f, *args, repeats: int = 5) -> float:
    jax.block_until_ready(f(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - start)
    return best


def model_overrides(items: list[str]) -> dict:
    """`--set field=value` arguments -> {field: value} (values as Python literals)."""
    fields = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected field=value, e.g. num_layers=16")
        fields[key] = ast.literal_eval(value)
    return fields


def config_model(config_path: str, **model_fields):
    """A randomly initialized model (eval mode) of `path/config.py[:arg]`, with `model_fields`
    overriding its config's model section (timings do not depend on the weights)."""
    from flax import nnx

    from jaxspeech import pyfile
    from jaxspeech.models import TransformerTransducer
    from jaxspeech.train import state as state_lib

    path, _, arg = config_path.partition(":")
    config = pyfile.load(path).get_config(arg or None)
    config.model.update(model_fields)
    vocab = config.model.vocab_size if config.model.vocab_size > 0 else 256
    cfg = state_lib.model_config(config.model, vocab_size=vocab, bf16=bool(config.train.bf16))
    model = TransformerTransducer(cfg, rngs=nnx.Rngs(0))
    model.eval()
    return model


def synthetic(config_path: str, batch: int, seconds: float, keeps: list[float]) -> list[dict]:
    """Gathered vs masked vs ungated batched encoding (see the module docstring)."""
    from flax import nnx

    model = config_model(config_path)
    cfg = model.cfg
    encoder = model.encoder
    graphdef, state = nnx.split(encoder)
    t = int(seconds * 100) // cfg.subsampling_factor
    x = jax.random.normal(jax.random.key(0), (batch, t, cfg.d_model), cfg.compute_dtype)
    lengths = jnp.full((batch,), t, jnp.int32)

    def run(state, x, attn, ffn, capacity):
        out, trace = nnx.merge(graphdef, state).forward(
            x, lengths, attn_gates=attn, ffn_gates=ffn, capacity=capacity
        )
        return out, trace.dropped

    ungated = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, lengths))
    base = _timed(ungated, state, x)
    rows = []
    for keep in keeps:
        keys = jax.random.split(jax.random.key(int(keep * 1000)), 2)
        shape = (cfg.num_layers, batch, t)
        attn, ffn = (jax.random.bernoulli(k, keep, shape).astype(jnp.float32) for k in keys)
        capacity = max(1, min(t, int(np.ceil(keep * t * 1.25))))
        masked_fn = jax.jit(lambda s, x, a, f: run(s, x, a, f, None))
        gathered_fn = jax.jit(lambda s, x, a, f, c=capacity: run(s, x, a, f, c))
        masked_out, _ = masked_fn(state, x, attn, ffn)
        gathered_out, dropped = gathered_fn(state, x, attn, ffn)
        rows.append(
            {
                "keep": keep,
                "capacity": capacity,
                "dropped": int(jnp.sum(dropped)),
                "max_abs_diff": float(jnp.max(jnp.abs(masked_out - gathered_out))),
                "ungated_ms": 1e3 * base,
                "masked_ms": 1e3 * _timed(masked_fn, state, x, attn, ffn),
                "gathered_ms": 1e3 * _timed(gathered_fn, state, x, attn, ffn),
            }
        )
        rows[-1]["gathered_ratio"] = rows[-1]["gathered_ms"] / rows[-1]["ungated_ms"]
        print(json.dumps(rows[-1]))
    print(f"{cfg.num_layers} layers, d_model {cfg.d_model}, batch {batch} x {t} frames, "
          f"{cfg.dtype}, on {jax.devices()[0].device_kind}")  # fmt: skip
    print("| keep | capacity | dropped | ungated ms | masked ms | gathered ms | gathered/ungated |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['keep']:.2f} | {r['capacity']} | {r['dropped']} | {r['ungated_ms']:.2f} "
            f"| {r['masked_ms']:.2f} | {r['gathered_ms']:.2f} | {r['gathered_ratio']:.2f} |"
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="the arbitrated (or window) run")
    parser.add_argument("--baseline", help="the ungated run to compare against")
    parser.add_argument("--utterances", type=int, default=200)
    parser.add_argument(
        "--streams", type=int, default=1, help="utterances streamed at once (a server's batch)"
    )
    parser.add_argument("--tfds_data_dir", default="")
    parser.add_argument("--synthetic", action="store_true", help="random gates, no model/data")
    parser.add_argument("--config", default="experiments/commands_arbitrator.py")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--keep", default="1,0.6,0.4,0.2")
    parser.add_argument(
        "--component_costs",
        action="store_true",
        help="time per layer of attention and FFN in streaming (--config, --streams, "
        "--utterances, --seconds): the model.attention_cost to train with",
    )
    parser.add_argument(
        "--frame_costs",
        action="store_true",
        help="streaming time with every component on for 0, 1, 2, 4, 8 frames of each chunk "
        "(--config, --streams, --utterances, --seconds): the model.chunk_price_share to train with",
    )
    parser.add_argument(
        "--set", action="append", default=[], help="model field=value (the *_costs modes)"
    )
    args = parser.parse_args(argv)
    if args.frame_costs or args.component_costs:
        from jaxspeech import pyfile

        costs = pyfile.sibling(__file__, "stream_costs")
        return costs.report(
            args.config, args.streams, args.utterances, args.seconds,
            per_frame=args.frame_costs, fields=model_overrides(args.set),
        )  # fmt: skip
    if args.synthetic:
        keeps = [float(k) for k in args.keep.split(",")]
        return synthetic(args.config, args.batch, args.seconds, keeps)
    if not (args.workdir and args.baseline):
        parser.error("--workdir and --baseline are required (or --synthetic)")
    row = measure(
        args.workdir, args.baseline, args.utterances, args.tfds_data_dir, streams=args.streams
    )
    print(json.dumps(row, indent=1))
    print(
        f"compute: {100 * row['compute_gated']:.1f}% of the baseline's gated encoder, "
        f"{100 * row['compute_whole']:.1f}% of its whole encoder, "
        f"{100 * row['compute_chunks']:.1f}% of its gated encoder priced per chunk; "
        "streaming wall time "
        f"{row['stream_s']:.2f} s vs {row['baseline_stream_s']:.2f} s "
        f"(ratio {row['stream_ratio']:.2f}; {row['streams']} streams at once) "
        f"on {jax.devices()[0].device_kind}"
    )
    return row


if __name__ == "__main__":
    main()
