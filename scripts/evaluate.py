r"""Evaluates a trained workdir: WER with substitutions/deletions/insertions and real-time factor.

  python scripts/evaluate.py --workdir runs/commands_tt                       # test split
  python scripts/evaluate.py --workdir runs/commands_tt --split validation --decoder beam
  python scripts/evaluate.py --workdir runs/commands_tt --manifest my_test.jsonl
  python scripts/evaluate.py --workdir runs/squashed/tanh_2 --artifact model.jxq  # in the workdir

With `--artifact` the weights come from a quantized artifact (scripts/export_quantized.py) and the
workdir gives only the config and tokenizer. Prints the report and writes it to
WORKDIR/eval_<split>_<decoder>[_artifact].json.
"""

import argparse
import json
import os
import re

from absl import logging

from jaxspeech.train import data, evaluate, loop, metrics


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--split", default="test", help="train/validation/test or a source spec")
    where.add_argument("--manifest", help="a JSON-lines manifest to evaluate instead of a split")
    p.add_argument(
        "--decoder",
        choices=evaluate.DECODERS,
        default=None,
        help="default: the config's eval.decoder",
    )
    p.add_argument("--beam_size", type=int, default=None)
    p.add_argument("--max_symbols_per_frame", type=int, default=None)
    p.add_argument("--max_utterances", type=int, default=-1)
    p.add_argument(
        "--artifact", default=None, help="quantized artifact (a path, or a file in the workdir)"
    )
    args = p.parse_args(argv)
    logging.set_verbosity(logging.WARNING)

    if args.artifact:
        trained = evaluate.load_artifact(args.workdir, evaluate.artifact_path(args))
    else:
        trained = evaluate.load_trained(args.workdir)
    config = trained.config
    decoder = args.decoder or config.eval.decoder
    recognizer = evaluate.recognizer_for(
        trained.model,
        config,
        decoder=decoder,
        beam_size=args.beam_size,
        max_symbols_per_frame=args.max_symbols_per_frame,
    )
    split = f"manifest:{args.manifest}" if args.manifest else args.split
    report = loop.evaluate_split(
        recognizer, config, split, trained.tokenizer, max_utterances=args.max_utterances
    )
    report.update(step=trained.step, split=split, decoder=decoder)
    name = re.sub(r"[^\w.-]+", "_", os.path.basename(args.manifest) if args.manifest else split)
    suffix = "_artifact" if args.artifact else ""
    out = os.path.join(args.workdir, f"eval_{name}_{decoder}{suffix}.json")
    metrics.write_json(out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "examples"}, indent=2))
    print(
        f"WER {100 * report['wer']:.2f}% (S {report['substitutions']}, D {report['deletions']}, "
        f"I {report['insertions']}, {report['num_words']} words), RTF {report['rtf']:.4f}"
        f" -> {out}"
    )
    if report["left_out"]:
        left = data.format_left_out(report["left_out"])
        print(f"not scored (records without audio or transcript to score): {left}")


if __name__ == "__main__":
    main()
