r"""Exports an arbitrator run whose gates end static as the plain model they chose.

  python scripts/export_static.py --workdir runs/arb_deep16_priced_whole_budget38_hard800_seed0
  python scripts/evaluate.py --workdir runs/arb_deep16_priced_whole_budget38_hard800_seed0_static
  python scripts/bench_arbitrator.py \
      --workdir runs/arb_deep16_priced_whole_budget38_hard800_seed0_static \
      --baseline runs/commands_tt_deep16 --utterances 200

Runs the gated model on the first `--utterances` of the `--split` (default: validation, not the
test split the exported model is then scored on), keeps each layer's attention and feed-forward
network that runs on at least `--threshold` of the valid frames, and writes `--out` (default:
the workdir with `_static` appended): config.json, tokenizer and one checkpoint of the ungated
model over the kept layers, and static_export.json (the choice, each component's on-rate and the
agreement: the share of component decisions on the split that the static choice matches; 1.0
means the exported model's outputs equal the gated model's there; `partial`: the components
on for between 1% and 99% of the frames, which the export runs or drops on all, each also
printed as a warning). `jaxspeech.train.static_export`
documents the export.
"""

from __future__ import annotations

import argparse
import json

from jaxspeech import pyfile
from jaxspeech.train import evaluate, static_export


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True, help="a trained run with arbitrators")
    parser.add_argument("--out", default="", help="the new workdir (default: WORKDIR_static)")
    parser.add_argument("--split", default="validation", help="config.data split to calibrate on")
    parser.add_argument("--utterances", type=int, default=200)
    parser.add_argument("--threshold", type=float, default=0.5, help="keep at this on-rate")
    parser.add_argument("--tfds_data_dir", default="")
    args = parser.parse_args(argv)

    trained = evaluate.load_trained(args.workdir)
    if not trained.model.encoder.gated:
        parser.error(f"{args.workdir}: the model has no gates (no arbitrator, no static gates)")
    if args.split not in trained.config.data:
        parser.error(f"--split {args.split!r}: the run's config.data has no such field")
    bench = pyfile.sibling(__file__, "bench_arbitrator")
    feats = bench.test_features(trained.config, args.utterances, args.tfds_data_dir, args.split)
    batches = list(bench.batches(feats))
    out = args.out or args.workdir.rstrip("/") + "_static"
    report = static_export.export_static(args.workdir, out, batches, args.threshold, trained)
    report.update(workdir=args.workdir, out=out, split=args.split, utterances=len(feats))
    print(json.dumps(report, indent=1))
    for p in report["partial"]:
        print(
            f"warning: layer {p['layer']}'s {p['component']} runs on {p['on']:.1%} of the frames; "
            f"the export {'runs it on all' if p['kept'] else 'drops it from all'} of them"
        )
    if report["partial"]:
        print(
            "partially gated components change the model's outputs there: evaluate the export "
            "(scripts/evaluate.py) before using it (on the spoken-commands corpus, agreement of "
            "96-98.5% cost up to +12% relative WER; >= 99.9% cost nothing measurable)"
        )
    print(
        f"kept {len(report['layers'])} of {len(report['attn'])} layers {report['layers']}; "
        f"the static choice matches {report['agreement']:.2%} of the gate decisions on "
        f"{len(feats)} {args.split} utterances; wrote {out}"
    )
    return report


if __name__ == "__main__":
    main()
