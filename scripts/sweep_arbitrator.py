r"""The arbitrator sweep: compute-loss weights against sliding-window attention, same fine-tuning.

  python scripts/sweep_arbitrator.py --base runs/commands_tt --out runs/arbitrator

Cells (`experiments/commands_arbitrator.py`): `none` (the baseline: the same fine-tuning of the
trained model in `--base`, no arbitrators), `arbitrator_<W>` for each compute-loss weight in
`--weights`, `window_<N>` (attention limited to N left chunks) for each N in `--windows`, and
`budget_<C>` (arbitrators with a compute budget, `budget=C`, at weight `--budget_weight`) for
each fraction in `--budgets` (none by default). Each
cell trains (unless its workdir already holds eval.json: the sweep resumes) and reports its test
WER (beam search); then, after every cell is trained, each is measured against `none` on the first
`--utterances` test utterances (`scripts/bench_arbitrator.py`): executed encoder FLOPs as a
fraction of the baseline's, and the wall time of streaming each utterance alone through the
encoder with gated-off components skipped. Run it on an otherwise idle machine: the timings are
wall-clock.

`--options` adds variant options (`experiments/commands_arbitrator.py`) to every cell, e.g.
`--options deep,chunk --base runs/commands_tt_deep`: the 8-block encoder, one gate decision per
attention chunk (`chunk` only changes the arbitrator cells).

Writes into `--out`: `results.json`, `results.md` (the table), `wer_vs_compute.png` and
`walltime_vs_compute.png`.
"""

import argparse
import json
import os

import jax
from absl import logging

from jaxspeech import pyfile
from jaxspeech.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment():
    path = os.path.join(ROOT, "experiments", "commands_arbitrator.py")
    return pyfile.load(path)


def bench():
    return pyfile.load(os.path.join(ROOT, "scripts", "bench_arbitrator.py"))


def cells(args) -> list[tuple[str, str, float]]:
    """(name, config argument, knob) for every cell; the baseline first."""
    out = [("none", "none", 0.0)]
    out += [(f"arbitrator_{w:g}", f"arbitrator,{w:g}", w) for w in args.weights]
    out += [(f"window_{n}", f"window,{n}", float(n)) for n in args.windows]
    w = args.budget_weight
    out += [(f"budget_{c:g}", f"arbitrator,{w:g},budget={c:g}", c) for c in args.budgets]
    options = [o for o in args.options.split(",") if o]
    return [(name, ",".join([arg, *options]), knob) for name, arg, knob in out]


def train_cell(arg: str, workdir: str, args) -> dict:
    eval_path = os.path.join(workdir, "eval.json")
    if not os.path.exists(eval_path):
        config = experiment().get_config(",".join(["tiny"] * args.tiny + [arg]))
        config.train.init_from = args.base
        if args.tfds_data_dir:
            config.data.tfds_data_dir = args.tfds_data_dir
        if args.steps:
            config.train.num_steps = args.steps
            config.train.eval_every = config.train.checkpoint_every = args.steps
        loop.train_and_evaluate(config, workdir)
    with open(eval_path) as f:
        return json.load(f)


def measure_cell(workdir: str, baseline: str, args) -> dict:
    path = os.path.join(workdir, f"measure_{args.utterances}.json")
    if os.path.exists(path) and not args.remeasure:
        with open(path) as f:
            return json.load(f)
    row = bench().measure(workdir, baseline, args.utterances, args.tfds_data_dir)
    with open(path, "w") as f:
        json.dump(row, f, indent=1)
    return row


def table(rows: list[dict]) -> str:
    base = rows[0]["wer"]
    lines = [
        "| cell | test WER % | rel. to none | compute, gated encoder % | compute, whole encoder % "
        "| streaming s (skipping) | ratio to none | streaming s (masked) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        masked = f"{r['masked_stream_s']:.2f}" if "masked_stream_s" in r else "-"
        lines.append(
            f"| {r['cell']} | {100 * r['wer']:.2f} | {100 * (r['wer'] / base - 1):+.1f}% "
            f"| {100 * r['compute_gated']:.1f} | {100 * r['compute_whole']:.1f} "
            f"| {r['stream_s']:.2f} | {r['stream_ratio']:.2f} | {masked} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {
        "arbitrators": [r for r in rows if r["cell"].startswith("arbitrator")],
        "arbitrators, compute budget": [r for r in rows if r["cell"].startswith("budget")],
        "sliding window": [r for r in rows if r["cell"].startswith("window")],
        "baseline (no gates)": [rows[0]],
    }
    styles = {"arbitrators": "o-", "arbitrators, compute budget": "^-",
              "sliding window": "s--", "baseline (no gates)": "k*"}  # fmt: skip
    for name, key, ylabel in (
        ("wer_vs_compute.png", "wer", "test WER (%)"),
        ("walltime_vs_compute.png", "stream_ratio", "streaming encoder wall time / baseline"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, group in groups.items():
            if not group:
                continue
            group = sorted(group, key=lambda r: r["compute_gated"])
            xs = [100 * r["compute_gated"] for r in group]
            ys = [(100 if key == "wer" else 1) * r[key] for r in group]
            ax.plot(xs, ys, styles[label], label=label)
            for r, x, y in zip(group, xs, ys, strict=True):
                ax.annotate(r["cell"].split("_")[-1], (x, y), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
        ax.set_xlabel("executed encoder compute (% of the baseline's gated encoder)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=120)
        plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="runs/commands_tt", help="the trained workdir")
    parser.add_argument("--out", default="runs/arbitrator")
    parser.add_argument("--weights", default="8,16,32,64", help="compute-loss weights")
    parser.add_argument("--windows", default="0,1,2", help="left chunks of sliding windows")
    parser.add_argument("--budgets", default="", help="compute budgets (fractions), e.g. 0.3,0.4")
    parser.add_argument("--budget_weight", type=float, default=64.0, help="the budgets' weight")
    parser.add_argument("--utterances", type=int, default=200, help="test utterances timed")
    parser.add_argument("--options", default="", help="variant options for every cell")
    parser.add_argument("--steps", type=int, default=0, help="override the fine-tuning steps")
    parser.add_argument("--tiny", action="store_true", help="the tiny model (tests)")
    parser.add_argument("--remeasure", action="store_true", help="ignore cached measurements")
    parser.add_argument("--tfds_data_dir", default="")
    args = parser.parse_args(argv)
    args.weights = [float(w) for w in args.weights.split(",") if w]
    args.windows = [int(n) for n in args.windows.split(",") if n]
    args.budgets = [float(c) for c in args.budgets.split(",") if c]
    logging.set_verbosity(logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    reports = {}
    for name, arg, _ in cells(args):
        reports[name] = train_cell(arg, os.path.join(args.out, name), args)
    baseline = os.path.join(args.out, "none")
    rows = []
    for name, _, knob in cells(args):
        row = measure_cell(os.path.join(args.out, name), baseline, args)
        rows.append({"cell": name, "knob": knob, "wer": reports[name]["wer"], **row})
        print(
            f"{name}: WER {100 * reports[name]['wer']:.2f}%, compute "
            f"{100 * row['compute_gated']:.1f}%, streaming {row['stream_ratio']:.2f}x"
        )
    device = jax.devices()[0].device_kind
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"device": device, "rows": rows}, f, indent=1)
    text = table(rows)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"Streaming timed on: {device}, {args.utterances} test utterances.\n\n{text}\n")
    plot(rows, args.out)
    print(text)
    return rows


if __name__ == "__main__":
    main()
