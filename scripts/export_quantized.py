r"""Exports a trained workdir's model as one bit-packed quantized artifact and reports its size.

  python scripts/export_quantized.py --workdir runs/squashed/tanh_2      # a QAT workdir
  python scripts/export_quantized.py --workdir runs/commands_tt --bits 8  # post-training quant.

A QAT workdir (`quant.enabled`) is exported with its own rules (bit widths, squash, scales): the
artifact holds the packed codes and per-channel scales of every quantized kernel, the float
biases, norms, embeddings and feature statistics. A float workdir needs `--bits` (plain
post-training quantization with max-abs scales). Writes `<workdir>/model.jxq` (or `--out`) and
`<workdir>/export.json`, and prints the sizes. Inference from the artifact:

  python scripts/transcribe.py --workdir runs/squashed/tanh_2 --artifact model.jxq a.wav
  python scripts/evaluate.py --workdir runs/squashed/tanh_2 --artifact model.jxq
"""

import argparse
import json
import os

from absl import logging
from flax import nnx

from jaxspeech.quant import export, qat
from jaxspeech.train import evaluate, quantize

COMPONENTS = {
    "encoder": ("subsampling/", "encoder/", "feature_norm/"),
    "predictor": ("predictor/",),
    "joint": ("joint/",),
    "ctc_head": ("ctc_head/",),  # training only; kept so the artifact holds the whole model
}


def export_workdir(workdir: str, out: str | None = None, bits: int | None = None) -> dict:
    """Writes the artifact of `workdir` and returns the report written to export.json."""
    trained = evaluate.load_trained(workdir)
    stats = nnx.to_pure_dict(evaluate.inference_state(trained.model))["feature_norm"]
    if trained.quant_rules is not None:
        if bits is not None:
            raise ValueError(f"{workdir} is a QAT workdir: its bit widths come from its config")
        rules = trained.quant_rules
        qparams = quantize.as_qat_params(trained.params)
        tree = dict(nnx.to_pure_dict(qparams.params), feature_norm=stats)
        params = qat.QATParams(tree, qparams.amplitudes)
    elif bits is None:
        raise ValueError(
            f"{workdir} holds a float model: pass --bits for post-training quantization"
        )
    else:
        rules = quantize.rules_from_config(
            quantize.default_config(enabled=True, bits=bits, squash="identity")
        )
        params = dict(nnx.to_pure_dict(trained.params), feature_norm=stats)
    out = out or os.path.join(workdir, "model.jxq")
    report = export.export_quantized(params, rules, out)
    components = export.component_nbytes(out, COMPONENTS)
    summary = {
        "artifact": os.path.abspath(out),
        "step": trained.step,
        "nbytes": report.nbytes,
        "float32_nbytes": report.float32_nbytes,
        "ratio": report.ratio,
        "kernel_ratio": report.kernel_ratio,
        "num_quantized": report.num_quantized,
        "num_float": report.num_float,
        "components": {
            name: dict(c, ratio=c["float32_nbytes"] / max(c["nbytes"], 1))
            for name, c in components.items()
            if c["float32_nbytes"]
        },
    }
    with open(os.path.join(workdir, "export.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default=None, help="artifact path (default <workdir>/model.jxq)")
    p.add_argument(
        "--bits", type=int, default=None, help="post-training quantization of a float model"
    )
    args = p.parse_args(argv)
    logging.set_verbosity(logging.WARNING)
    s = export_workdir(args.workdir, args.out, args.bits)
    print(f"{s['artifact']}: {s['nbytes']:,} bytes, {s['ratio']:.1f}x smaller than float32")
    for name, c in s["components"].items():
        print(f"  {name}: {c['nbytes']:,} bytes ({c['ratio']:.1f}x smaller than float32)")


if __name__ == "__main__":
    main()
