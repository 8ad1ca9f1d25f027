r"""Is a run's WER really different from another's? A matched-pairs bootstrap over utterances.

  python scripts/compare_wer.py --a runs/commands_tt_deep \
      --b runs/arb_deep_scratch_frame_32 runs/static_deep_10011000_11101001

Every run is scored on the same utterances of the split (`errors_<split>.jsonl` in its workdir,
written first by `scripts/error_analysis.py` when absent: one decode of the split). Per utterance,
the word errors (substitutions, deletions, insertions) and reference words; then the utterances
are resampled with replacement (`--samples` times, the same resample for both runs: the
matched-pairs bootstrap of Bisani & Ney, ICASSP 2004), and each resample gives B's WER relative to
A's. Printed per B: its WER, the relative difference, the central 95% interval of the resampled
differences, and the share of resamples in which B has the lower WER. An interval that contains a
relative difference says the split cannot tell it from none; its width is the smallest relative
difference one test split can resolve (seed-to-seed variation of training comes on top).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from jaxspeech import pyfile
from jaxspeech.train import evaluate


def utterance_errors(path: str) -> dict[str, tuple[int, int]]:
    """{utterance id: (word errors, reference words)} from an `errors_<split>.jsonl`."""
    out = {}
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            u = json.loads(line)
            if "id" not in u or "ref" not in u or "hyp" not in u:
                raise ValueError(
                    f"{path}:{line_number}: needs the fields id, ref and hyp (written by "
                    "scripts/error_analysis.py); delete the file to have it decoded again"
                )
            stats = evaluate.wer_stats([u["ref"]], [u["hyp"]])  # the project's WER, per utterance
            errors = stats["substitutions"] + stats["deletions"] + stats["insertions"]
            out[u["id"]] = (errors, stats["num_words"])
    return out


def errors_of(workdir: str, split: str) -> dict[str, tuple[int, int]]:
    """The run's per-utterance errors on `split`, decoding it first if not done yet."""
    path = os.path.join(workdir, f"errors_{split}.jsonl")
    if not os.path.exists(path):
        pyfile.sibling(__file__, "error_analysis").main(["--workdir", workdir, "--split", split])
    return utterance_errors(path)


def paired(a: dict, b: dict, names: tuple[str, str]) -> np.ndarray:
    """[utterances, 3]: A's errors, B's errors, reference words, per utterance id (both runs
    must have the same ids: else they were scored on different utterances)."""
    if a.keys() != b.keys():
        only = sorted(a.keys() ^ b.keys())
        raise ValueError(
            f"{names[0]} and {names[1]} were scored on different utterances ({len(only)} ids in "
            f"one only, e.g. {only[:3]}); decode both on the whole split (delete the partial "
            "errors_<split>.jsonl)"
        )
    ids = sorted(a)
    if any(a[i][1] != b[i][1] for i in ids):
        raise ValueError(f"{names[0]} and {names[1]} have different references for some ids")
    return np.array([(a[i][0], b[i][0], a[i][1]) for i in ids], np.int64)


def bootstrap(counts: np.ndarray, samples: int, seed: int = 0) -> dict:
    """Relative WER difference (B - A) / A on `counts` ([N, 3] from `paired`) and over
    `samples` resamples of its rows: the 95% interval and the share where B < A."""
    rng = np.random.default_rng(seed)
    n = counts.shape[0]
    rel, better = [], 0
    for start in range(0, samples, 1000):
        k = min(1000, samples - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=k)  # [k, N] resample counts
        errs_a, errs_b, words = (weights @ counts).T
        wer_a, wer_b = errs_a / words, errs_b / words
        rel.append(wer_b / wer_a - 1.0)
        better += int(np.sum(wer_b < wer_a))
    rel = np.concatenate(rel)
    total = counts.sum(axis=0)
    return {
        "utterances": n,
        "words": int(total[2]),
        "wer_a": total[0] / total[2],
        "wer_b": total[1] / total[2],
        "relative": total[1] / total[0] - 1.0,
        "interval": [float(np.quantile(rel, 0.025)), float(np.quantile(rel, 0.975))],
        "b_better": better / samples,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="the reference run's workdir")
    parser.add_argument("--b", required=True, nargs="+", help="workdirs compared with A")
    parser.add_argument("--split", default="test")
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    a = errors_of(args.a, args.split)
    rows = []
    print(f"A = {args.a}; {args.split} split, {args.samples} matched-pairs resamples")
    print("| B | WER % (A) | WER % (B) | relative | 95% interval | B better in |")
    print("|---|---|---|---|---|---|")
    for b_dir in args.b:
        counts = paired(a, errors_of(b_dir, args.split), (args.a, b_dir))
        row = {"a": args.a, "b": b_dir, **bootstrap(counts, args.samples, args.seed)}
        rows.append(row)
        lo, hi = row["interval"]
        print(
            f"| {b_dir} | {100 * row['wer_a']:.2f} | {100 * row['wer_b']:.2f} "
            f"| {100 * row['relative']:+.1f}% | [{100 * lo:+.1f}%, {100 * hi:+.1f}%] "
            f"| {100 * row['b_better']:.1f}% |"
        )
    return rows


if __name__ == "__main__":
    main()
