r"""Where the time of one streamed chunk goes: XLA ops of `encode_step`, per chunk, from a trace.

  python scripts/profile_stream.py --config experiments/commands_arbitrator.py:none,scratch,deep \
      --set num_layers=16 --chunks 200
  python scripts/profile_stream.py --workdir runs/arb_deep16_budget38_hard800_seed0 --skip

Streams `--chunks` chunks of `--streams` utterances through the model's `encode_step` with
`bench_arbitrator.stream_pass` (one jitted `fori_loop`), once to compile and once under
`jax.profiler`, then reads the trace's executed XLA ops (thunks) and prints, per op kind (the
HLO name without its numeric suffix), the microseconds and the count per chunk, with the
encoder's FLOPs per chunk and the rate they run at. `--config` (random weights, random features)
or `--workdir` (a trained model on its test split's features; `--skip`: gated-off components
are not executed). XLA flags (`XLA_FLAGS`) apply as usual, so a flag's effect is one rerun away.
The profiler's own cost inflates every op a little; compare kinds within one run.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_arbitrator as bench  # noqa: E402

from jaxspeech.models import flops  # noqa: E402

# Trace events that are not XLA ops: the executor, the host side, the profiler itself.
_NOT_OPS = re.compile(r"^(ThunkExecutor|\$|PjitFunction|end: )")


def op_times(trace_dir: str) -> dict[str, tuple[float, int]]:
    """{op kind: (total microseconds, count)} over the complete ("X") events of the perfetto trace
    under `trace_dir`, kinds named without their numeric suffix (`fusion.12` -> `fusion`)."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no perfetto trace (*.trace.json.gz) under {trace_dir}")
    with gzip.open(max(paths, key=os.path.getmtime)) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") != "X" or _NOT_OPS.match(e["name"]):
            continue
        kind = re.sub(r"\.\d+$", "", e["name"])
        totals[kind][0] += float(e.get("dur", 0.0))
        totals[kind][1] += 1
    return {k: (t, n) for k, (t, n) in totals.items()}


def profile(model, feats: list[np.ndarray], chunks: int, skip: bool) -> dict:
    """Per-chunk op times of streaming feats (one [chunks * n, F] array per stream) once, in
    lock step, through `bench_arbitrator.stream_pass` (compiled there, traced here)."""
    run = bench.stream_pass(model, feats, skip=skip, streams=len(feats))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        run()
        jax.profiler.stop_trace()
        times = op_times(trace_dir)
    per_chunk = {k: (t / chunks, c / chunks) for k, (t, c) in times.items()}
    return dict(sorted(per_chunk.items(), key=lambda kv: -kv[1][0]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="", help="path/config.py[:arg], random weights")
    p.add_argument("--set", action="append", default=[], help="model field=value (with --config)")
    p.add_argument("--workdir", default="", help="a trained run (instead of --config)")
    p.add_argument("--tfds_data_dir", default="")
    p.add_argument("--skip", action="store_true", help="skip gated-off components")
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--chunks", type=int, default=200)
    p.add_argument("--top", type=int, default=25, help="op kinds printed")
    args = p.parse_args(argv)
    if bool(args.config) == bool(args.workdir):
        p.error("give exactly one of --config and --workdir")
    n_feat = None
    if args.config:
        model = bench.config_model(args.config, **bench.model_overrides(args.set))
    else:
        from jaxspeech.train import evaluate

        run = evaluate.load_trained(args.workdir)
        model = run.model
        n_feat = bench.test_features(run.config, args.streams, args.tfds_data_dir)
    cfg, n = model.cfg, model.feat_chunk_size
    frames = args.chunks * n
    x = np.zeros((args.streams, frames, cfg.num_mels), np.float32)
    if n_feat is None:
        x[:] = np.random.default_rng(0).normal(size=x.shape)
    else:  # the test utterances, repeated to fill the chunks
        for i, f in enumerate(n_feat):
            x[i] = np.resize(f, (frames, f.shape[1]))
    per_chunk = profile(model, list(x), args.chunks, args.skip)
    total = sum(t for t, _ in per_chunk.values())
    t = args.chunks * cfg.chunk_size
    enc = flops.encoder_flops(cfg, jnp.full((args.streams,), t), t)
    full = float(jnp.sum(enc["whole_full"])) / args.chunks
    print(
        f"{args.streams} stream(s), {args.chunks} chunks, on {jax.devices()[0].platform}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    print(
        f"ops: {total:.0f} us per chunk ({total / cfg.num_layers:.0f} us per layer); "
        f"whole ungated encoder {full / 1e6:.2f} MFLOP per chunk: "
        f"{full / total / 1e3:.2f} GFLOP/s"
    )
    print(f"{'us/chunk':>9} {'share':>6} {'n/chunk':>8}  op kind")
    for kind, (t, c) in list(per_chunk.items())[: args.top]:
        print(f"{t:9.1f} {t / total:6.1%} {c:8.1f}  {kind}")
    return per_chunk


if __name__ == "__main__":
    main()
