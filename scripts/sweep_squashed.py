r"""The squashed-weight QAT sweep: {float, plain QAT, squashed tanh, squashed CDF} x bit widths.

  python scripts/sweep_squashed.py --base runs/commands_tt --out runs/squashed

Every cell fine-tunes the trained float model in `--base` for the same number of steps with
`experiments/commands_squashed.py:<method>,<bits>` (the `float` cell: the same fine-tuning without
quantization, the baseline), evaluates on the test split and exports the packed artifact. The float
model is also quantized after training (post-training quantization, `ptq` rows) to show what QAT
buys. Cells whose workdir already holds `eval.json` are not retrained (the sweep resumes).

Writes into `--out`: `results.json`, `results.md` (the WER table with artifact sizes and the
uniformity of each model's weights), `histograms_<bits>bit.png` (one kernel's weights before
quantization, with and without squashing, over the quantizer's bins) and `uniformity.png`
(entropy of quantization-bin occupancy against its maximum, log2 of the level count).

`--scratch` trains every quantized cell from random weights with the main job's whole recipe
(`commands_squashed.py:scratch,<method>,<bits>`) instead; its float cell is then `--base` itself,
the main job trained with that same recipe (checked: the configs agree), not retrained.
"""

import argparse
import dataclasses
import json
import os
import re
import time

import jax
import numpy as np
from absl import logging

from jaxspeech import pyfile
from jaxspeech.models import TransducerConfig
from jaxspeech.quant import qat
from jaxspeech.train import evaluate, loop, quantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD_NAMES = {
    "float": "float",
    "ptq": "float + post-training quant.",
    "identity": "plain QAT",
    "tanh": "squashed tanh",
    "cdf": "squashed CDF",
}
HIST_KERNEL = r"encoder/blocks/\d+/ffn/up/kernel$"


def experiment():
    return pyfile.load(os.path.join(ROOT, "experiments", "commands_squashed.py"))


def exporter():
    return pyfile.load(os.path.join(ROOT, "scripts", "export_quantized.py"))


def cell_config(method: str, bits: int, args):
    cell = [method] if method == "float" else [method, str(bits)]
    recipe = ["tiny"] if args.tiny else ["scratch"] * args.scratch  # tiny: from scratch already
    config = experiment().get_config(",".join(recipe + cell))
    if not args.scratch:
        config.train.init_from = args.base
    if args.steps:
        config.train.num_steps = args.steps
        config.train.eval_every = config.train.checkpoint_every = args.steps
    if args.tfds_data_dir:
        config.data.tfds_data_dir = args.tfds_data_dir
    return config


def test_wer(workdir: str, config, artifact: str | None = None) -> dict:
    """Test-split WER of a workdir's checkpoint, or of an artifact exported from it."""
    trained = (
        evaluate.load_artifact(workdir, artifact) if artifact else evaluate.load_trained(workdir)
    )
    recognizer = evaluate.recognizer_for(trained.model, config)  # as the training loop decodes
    return loop.evaluate_split(recognizer, config, "test", trained.tokenizer)


def normalized_weights(w, scale) -> np.ndarray:
    """w / scale per channel: the quantizer's grid tiles [-1, 1] in these units."""
    return (np.asarray(w, np.float64) / np.asarray(scale, np.float64)).ravel()


def kernel_stats(trainable, rules, bits: int) -> tuple[float, dict[str, np.ndarray]]:
    """(mean bin-occupancy entropy / bits over the quantized kernels, {path: w / scale}) of a
    trained tree; a float tree is measured with plain max-abs quantization at `bits`."""
    if rules is None:
        rules = quantize.rules_from_config(
            quantize.default_config(enabled=True, bits=bits, squash="identity")
        )
        trainable = quantize.to_trainable(trainable, rules)
    qparams = quantize.as_qat_params(trainable)
    entropies = qat.kernel_entropies(qparams, rules)
    weights = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(qparams.params)[0]:
        path = qat.path_str(kp)
        rule = qat.match_rule(path, leaf, rules)
        if rule is not None:
            w, scale = qat.effective_kernel(leaf, qparams.amplitudes.get(path), rule)
            weights[path] = normalized_weights(w, scale)
    return float(np.mean([e / bits for e in entropies.values()])), weights


# Fields newer than some workdirs: a config without one was trained with this value.
FIELD_DEFAULTS = {
    **{f"model.{f.name}": f.default for f in dataclasses.fields(TransducerConfig)},
    "optim.theta_lr_scale": 1.0,
    "optim.arbitrator_lr_scale": 1.0,
    "train.compute_ramp": [0, 0],
}


def same_recipe(a, b) -> list[str]:
    """The config fields (dotted) where two configs differ; data locations aside; a field one
    config lacks (an older workdir) compares by its default (`FIELD_DEFAULTS`); when both are
    unquantized, the quant section and optim.theta_lr_scale (it scales squashed thetas only) are
    ignored."""
    flat_a, flat_b = (dict(_flatten(json.loads(json.dumps(c.to_dict())))) for c in (a, b))
    keys = flat_a.keys() | flat_b.keys()
    flat_a, flat_b = ({k: f.get(k, FIELD_DEFAULTS.get(k)) for k in keys} for f in (flat_a, flat_b))
    unquantized = not flat_a.get("quant.enabled") and not flat_b.get("quant.enabled")
    return sorted(
        k
        for k in keys
        if flat_a[k] != flat_b[k]
        and not k.startswith("data.tfds_data_dir")
        and not (unquantized and (k.startswith("quant.") or k == "optim.theta_lr_scale"))
    )


def _flatten(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def run_cell(method: str, bits: int, args) -> dict:
    name = "float" if method == "float" else f"{method}_{bits}"
    workdir = os.path.join(args.out, name)
    config = cell_config(method, bits, args)
    if args.scratch and method == "float":  # the main job is the float cell
        workdir = args.base
        differ = same_recipe(config, evaluate.load_config(workdir))
        if differ:
            raise SystemExit(
                f"--base {workdir} was not trained with the main job's recipe (config fields "
                f"{differ} differ from commands_squashed.py:scratch,float); retrain it with "
                "`python scripts/train.py --config experiments/commands_tt.py`"
            )
    start = time.perf_counter()
    if not os.path.exists(os.path.join(workdir, "eval.json")):
        loop.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "eval.json")) as f:
        report = json.load(f)
    row = {
        "method": method,
        "bits": None if method == "float" else bits,
        "workdir": workdir,
        "wer": report["wer"],
        "steps": report["step"],
        "seconds": time.perf_counter() - start,
    }
    if method != "float":
        trained = evaluate.load_trained(workdir)
        export = exporter().export_workdir(workdir)
        row.update(artifact_nbytes=export["nbytes"], encoder_ratio=_encoder_ratio(export))
        row["uniformity"], row["weights"] = kernel_stats(trained.params, trained.quant_rules, bits)
    return row


def _encoder_ratio(export: dict) -> float:
    return export["components"]["encoder"]["ratio"]


def run_ptq(float_row: dict, bits: int, args) -> dict:
    """Post-training quantization of the float cell at `bits` (plain max-abs, no training)."""
    workdir = float_row["workdir"]
    artifact = os.path.join(workdir, f"ptq_{bits}.jxq")
    cached = os.path.join(workdir, f"eval_ptq_{bits}.json")
    export = exporter().export_workdir(workdir, artifact, bits=bits)
    if os.path.exists(cached):  # a resumed sweep
        with open(cached) as f:
            report = json.load(f)
    else:
        report = test_wer(workdir, evaluate.load_config(workdir), artifact)
        with open(cached, "w") as f:
            json.dump(report, f)
    trained = evaluate.load_trained(workdir)
    uniformity, weights = kernel_stats(trained.params, None, bits)
    return {
        "method": "ptq",
        "bits": bits,
        "workdir": workdir,
        "wer": report["wer"],
        "steps": 0,
        "artifact_nbytes": export["nbytes"],
        "encoder_ratio": _encoder_ratio(export),
        "uniformity": uniformity,
        "weights": weights,
    }


def markdown(rows: list[dict], float_wer: float | None, float_nbytes: int | None) -> str:
    lines = [
        "| method | bits | test WER | rel. to float | artifact | encoder vs float32 | "
        "bin entropy / bits |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = "" if float_wer in (None, 0) else f"{100 * (r['wer'] / float_wer - 1):+.1f}%"
        size = r.get("artifact_nbytes", float_nbytes)
        size = "" if size is None else f"{size / 1024:.0f} KiB"
        ratio = "1.0x" if r["method"] == "float" else f"{r['encoder_ratio']:.1f}x"
        uniform = f"{r['uniformity']:.3f}" if "uniformity" in r else ""
        name, bits, wer = METHOD_NAMES[r["method"]], r["bits"] or 32, 100 * r["wer"]
        lines.append(f"| {name} | {bits} | {wer:.2f}% | {rel} | {size} | {ratio} | {uniform} |")
    return "\n".join(lines) + "\n"


def plot_histograms(rows: list[dict], bits: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [r for r in rows if r["bits"] == bits and "weights" in r]
    if not cells:
        return
    fig, axes = plt.subplots(1, len(cells), figsize=(3.2 * len(cells), 2.8))
    axes = np.atleast_1d(axes)
    edges = np.linspace(-1.0, 1.0, 2**bits + 1)
    kernel = ""
    for ax, r in zip(axes, cells, strict=True):
        kernel = next(k for k in r["weights"] if re.search(HIST_KERNEL, k))
        ax.hist(r["weights"][kernel], bins=80, range=(-1.05, 1.05), color="tab:blue", alpha=0.8)
        for e in edges if bits <= 4 else edges[[0, -1]]:  # 2^b + 1 edges: legible to 4 bits
            ax.axvline(e, color="tab:red", lw=0.8, ls="--")
        ax.set_title(f"{METHOD_NAMES[r['method']]}\nH/bits = {r['uniformity']:.3f}", fontsize=9)
        ax.set_xlabel("w / scale")
    axes[0].set_ylabel("count")
    shown = "bin edges" if bits <= 4 else f"the range of the {2**bits} bins"
    fig.suptitle(f"{kernel}: weights before {bits}-bit quantization (red: {shown})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_uniformity(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for method in ("ptq", "identity", "tanh", "cdf"):
        pts = sorted((r["bits"], r["uniformity"]) for r in rows if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=METHOD_NAMES[method])
    ax.axhline(1.0, color="gray", ls=":", lw=1)
    ax.set_xlabel("bits")
    ax.set_ylabel("bin-occupancy entropy / bits")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("Uniformity of quantized weights (1 = every level equally used)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--base", default="runs/commands_tt", help="the trained float workdir (the main job)"
    )
    p.add_argument("--out", default="runs/squashed")
    p.add_argument("--methods", default="float,identity,tanh,cdf")
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--steps", type=int, default=0, help="fine-tuning steps (0: the config's)")
    p.add_argument("--no_ptq", action="store_true", help="skip post-training quantization rows")
    p.add_argument("--tiny", action="store_true", help="the tiny config (tests)")
    p.add_argument(
        "--scratch", action="store_true", help="QAT from random weights (the main job's recipe)"
    )
    p.add_argument("--tfds_data_dir", default="")
    args = p.parse_args(argv)
    logging.set_verbosity(logging.WARNING)
    methods = [m for m in args.methods.split(",") if m]
    bits_list = [int(b) for b in args.bits.split(",") if b]
    os.makedirs(args.out, exist_ok=True)

    rows = []
    if "float" in methods:
        rows.append(run_cell("float", 0, args))
        if not args.no_ptq:
            rows += [run_ptq(rows[0], bits, args) for bits in bits_list]
    for bits in bits_list:  # the lowest widths first: the comparisons that matter most
        for method in methods:
            if method != "float":
                rows.append(run_cell(method, bits, args))
                print(f"{method} {bits}-bit: test WER {100 * rows[-1]['wer']:.2f}%", flush=True)
    rows.sort(key=lambda r: (list(METHOD_NAMES).index(r["method"]), r["bits"] or 0))

    float_row = next((r for r in rows if r["method"] == "float"), None)
    float_wer = None if float_row is None else float_row["wer"]
    float_nbytes = None
    if float_row is not None:
        trained = evaluate.load_trained(float_row["workdir"])
        float_nbytes = 4 * sum(
            int(np.prod(x.shape)) for x in jax.tree.leaves(evaluate.inference_state(trained.model))
        )
    table = markdown(rows, float_wer, float_nbytes)
    for bits in bits_list:
        plot_histograms(rows, bits, os.path.join(args.out, f"histograms_{bits}bit.png"))
    plot_uniformity(rows, os.path.join(args.out, "uniformity.png"))
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump([{k: v for k, v in r.items() if k != "weights"} for r in rows], f, indent=2)
    print(table)


if __name__ == "__main__":
    main()
