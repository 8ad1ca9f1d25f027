r"""Where a trained model's errors are: WER broken down by the split's metadata.

  python scripts/error_analysis.py --workdir runs/commands_tt               # test split
  python scripts/error_analysis.py --workdir runs/commands_tt --split validation

Decodes the split, joins each hypothesis with its record's metadata (the spoken-commands corpus
has `voice`, `noise`, `snr` and `template`; other sources may have none) and prints the WER of
every group: voice variant and accent, noise kind, SNR band, template, and contact names vs other
words in call/message requests. Writes `errors_<split>.jsonl` (one utterance per line: id, ref,
hyp, metadata) and `error_analysis_<split>.json` (the tables) into the workdir.
"""

import argparse
import collections
import json
import math
import os

import jiwer
from absl import logging

from jaxspeech.train import data as data_lib
from jaxspeech.train import evaluate

FIELDS = ("voice", "noise", "snr", "template", "name")


def snr_band(snr: float) -> str:
    if math.isinf(snr):
        return "clean"
    return ">= 20 dB" if snr >= 20 else ("10-20 dB" if snr >= 10 else "< 10 dB")


def groups_of(meta: dict) -> dict[str, str]:
    """The groups one utterance belongs to, by dimension."""
    out = {}
    if "voice" in meta:
        accent, _, variant = str(meta["voice"]).partition("+")
        out.update(accent=accent, variant=variant or "-")
    if "noise" in meta:
        out["noise"] = str(meta["noise"])
    if "snr" in meta:
        out["snr"] = snr_band(float(meta["snr"]))
    if "template" in meta:
        out["template"] = str(meta["template"])
    return out


def name_word_errors(ref: str, hyp: str, name: str) -> tuple[int, int, int, int]:
    """(name-word errors, name words, other-word errors, other words) from one alignment: a
    reference word is wrong if substituted or deleted."""
    names = set(name.split())
    out = jiwer.process_words(ref, hyp)
    wrong = [False] * len(ref.split())
    for chunk in out.alignments[0]:
        if chunk.type in ("substitute", "delete"):
            for i in range(chunk.ref_start_idx, chunk.ref_end_idx):
                wrong[i] = True
    counts = [0, 0, 0, 0]
    for word, bad in zip(ref.split(), wrong, strict=True):
        k = 0 if word in names else 2
        counts[k] += bad
        counts[k + 1] += 1
    return tuple(counts)


def is_contact(u: dict) -> bool:
    """Whether the utterance's `name` is a person (call/message templates), not a device."""
    return str(u.get("template", "")).startswith(("call", "message"))


def analyse(utterances: list[dict]) -> dict:
    """{dimension: {group: {"wer", "num_utterances", "num_words"}}} plus name-word error rates."""
    by = collections.defaultdict(lambda: collections.defaultdict(list))
    for u in utterances:
        for dim, group in groups_of(u).items():
            by[dim][group].append(u)
    tables = {}
    for dim, groups in sorted(by.items()):
        rows = {}
        for group, us in groups.items():
            stats = evaluate.wer_stats([u["ref"] for u in us], [u["hyp"] for u in us])
            rows[group] = {
                "wer": stats["wer"],
                "num_utterances": len(us),
                "num_words": stats["num_words"],
            }
        tables[dim] = dict(sorted(rows.items(), key=lambda kv: -kv[1]["wer"]))
    named = [u for u in utterances if u.get("name") and is_contact(u)]
    if named:
        totals = [0, 0, 0, 0]
        for u in named:
            for i, c in enumerate(name_word_errors(u["ref"], u["hyp"], u["name"])):
                totals[i] += c
        tables["words"] = {
            "contact-name words": {
                "error_rate": totals[0] / max(totals[1], 1),
                "num_words": totals[1],
            },
            "other words (same utterances)": {
                "error_rate": totals[2] / max(totals[3], 1),
                "num_words": totals[3],
            },
        }
    return tables


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--max_utterances", type=int, default=-1)
    p.add_argument("--decoder", choices=evaluate.DECODERS, default=None, help="default: config's")
    args = p.parse_args(argv)
    logging.set_verbosity(logging.WARNING)

    trained = evaluate.load_trained(args.workdir)
    config = trained.config
    recognizer = evaluate.recognizer_for(trained.model, config, decoder=args.decoder)
    source = data_lib.get_source(config.data, args.split)
    pipeline = data_lib.eval_pipeline(
        config.data,
        args.split,
        trained.tokenizer,
        source=source,
        max_utterances=args.max_utterances,
    )
    report = evaluate.evaluate(
        recognizer,
        iter(pipeline),
        trained.tokenizer,
        max_utterances=args.max_utterances,
        keep_utterances=True,
    )
    meta = {}
    for i in range(len(source)):
        record = source[i]
        meta[str(record.get("id", i))] = {k: record[k] for k in FIELDS if k in record}
    utterances = [dict(u, **meta.get(u["id"], {})) for u in report["utterances"]]
    tables = analyse(utterances)

    with open(os.path.join(args.workdir, f"errors_{args.split}.jsonl"), "w") as f:
        for u in utterances:
            f.write(json.dumps(u, default=float) + "\n")
    out = os.path.join(args.workdir, f"error_analysis_{args.split}.json")
    with open(out, "w") as f:
        json.dump({"wer": report["wer"], "step": trained.step, "tables": tables}, f, indent=2)
    print(f"{args.split} WER {100 * report['wer']:.2f}% on {len(utterances)} utterances")
    for dim, rows in tables.items():
        print(f"\n{dim}:")
        for group, row in rows.items():
            rate = row.get("wer", row.get("error_rate"))
            print(f"  {group:32s} {100 * rate:6.2f}%  ({row['num_words']} words)")
    print(f"\n-> {out}")


if __name__ == "__main__":
    main()
