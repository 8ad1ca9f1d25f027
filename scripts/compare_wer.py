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

Over seeds: `--pooled` pairs the i-th A with the i-th B (one pair per training seed, all scored
on the same split) and asks whether the method's effect, not one seed's, is within a margin:

  python scripts/compare_wer.py --pooled \
      --a runs/commands_tt_deep16 runs/commands_tt_deep16_seed1 \
      --b runs/arb_deep16_seed0 runs/arb_deep16_seed1

It prints each pair's row, then the pooled relative difference (the B runs' summed errors over the
A runs': the mean WERs' ratio) with two 95% intervals: over the test utterances only (the seeds
fixed; one resample shared by every run), and Student's t over the pairs' relative differences
(training noise included; it needs two pairs or more and is wide with few). A run is a workdir or
an errors file (`errors_<split>.jsonl`, or the same gzipped, as archived under
experiments/results/).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os

import numpy as np
from scipy import stats as scipy_stats

from jaxspeech import pyfile
from jaxspeech.train import evaluate


def utterance_errors(path: str) -> dict[str, tuple[int, int]]:
    """{utterance id: (word errors, reference words)} from an `errors_<split>.jsonl`."""
    out = {}
    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
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


def errors_of(run: str, split: str) -> dict[str, tuple[int, int]]:
    """The run's per-utterance errors on `split`, decoding it first if not done yet; `run` is
    a workdir or an errors file itself (`.jsonl` or `.jsonl.gz`)."""
    if os.path.isfile(run):
        return utterance_errors(run)
    path = os.path.join(run, f"errors_{split}.jsonl")
    if not os.path.exists(path):
        pyfile.sibling(__file__, "error_analysis").main(["--workdir", run, "--split", split])
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


def relative(errs_b, errs_a):
    """(B - A) / A of error counts; where A has none: 0 if B has none either, else +inf (so a
    resample without errors in either run does not turn the interval into NaN)."""
    errs_a, errs_b = np.asarray(errs_a, np.float64), np.asarray(errs_b, np.float64)
    safe = np.where(errs_a > 0, errs_a, 1.0)
    return np.where(errs_a > 0, errs_b / safe - 1.0, np.where(errs_b > 0, np.inf, 0.0))


def bootstrap(counts: np.ndarray, samples: int, seed: int = 0) -> dict:
    """Relative WER difference (B - A) / A on `counts` ([N, 3] from `paired`) and over
    `samples` resamples of its rows: the 95% interval and the share where B < A."""
    rng = np.random.default_rng(seed)
    n = counts.shape[0]
    rel, better = [], 0
    for start in range(0, samples, 1000):
        k = min(1000, samples - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=k)  # [k, N] resample counts
        errs_a, errs_b, _ = (weights @ counts).T
        rel.append(relative(errs_b, errs_a))  # the words are shared: WER ratio = error ratio
        better += int(np.sum(errs_b < errs_a))
    rel = np.concatenate(rel)
    total = counts.sum(axis=0)
    return {
        "utterances": n,
        "words": int(total[2]),
        "wer_a": total[0] / total[2],
        "wer_b": total[1] / total[2],
        "relative": float(relative(total[1], total[0])),
        "interval": [float(np.quantile(rel, 0.025)), float(np.quantile(rel, 0.975))],
        "b_better": better / samples,
    }


def pooled(counts: list[np.ndarray], samples: int, seed: int = 0) -> dict:
    """The relative difference of S pairs' pooled errors, sum(B) / sum(A) - 1, from `counts`
    (S arrays [N, 3] from `paired`, on the same N utterances in the same order): its 95%
    interval over `samples` utterance resamples (one resample shared by all 2S runs), and the
    Student-t 95% interval of the S per-pair relative differences (None for one pair)."""
    if any(c.shape != counts[0].shape or (c[:, 2] != counts[0][:, 2]).any() for c in counts):
        raise ValueError("the pairs were scored on different utterances: use one split")
    stack = np.stack(counts)  # [S, N, 3]
    summed = stack.sum(axis=0)  # [N, 3]: A errors and B errors summed over the pairs
    row = bootstrap(summed, samples, seed)
    per_pair = relative(stack[:, :, 1].sum(axis=1), stack[:, :, 0].sum(axis=1))
    row.update(pairs=len(counts), per_pair=[float(r) for r in per_pair], t_interval=None)
    row["words"] //= len(counts)  # summed once per pair: wer_a and wer_b are the mean WERs
    if len(counts) > 1:
        t = scipy_stats.t.ppf(0.975, len(counts) - 1)
        half = float(t * per_pair.std(ddof=1) / np.sqrt(len(counts)))
        row["t_interval"] = [float(per_pair.mean()) - half, float(per_pair.mean()) + half]
    return row


def _print_row(name: str, row: dict) -> None:
    lo, hi = row["interval"]
    print(
        f"| {name} | {100 * row['wer_a']:.2f} | {100 * row['wer_b']:.2f} "
        f"| {100 * row['relative']:+.1f}% | [{100 * lo:+.1f}%, {100 * hi:+.1f}%] "
        f"| {100 * row['b_better']:.1f}% |"
    )


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--a",
        required=True,
        nargs="+",
        help="the reference run (one; with --pooled, one per pair): a workdir or an errors file",
    )
    parser.add_argument("--b", required=True, nargs="+", help="runs compared with A")
    parser.add_argument(
        "--pooled",
        action="store_true",
        help="pair the i-th A with the i-th B (one pair per seed) and pool them",
    )
    parser.add_argument("--split", default="test")
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.pooled and len(args.a) != len(args.b):
        parser.error(f"--pooled pairs the runs: {len(args.a)} A runs but {len(args.b)} B runs")
    if not args.pooled and len(args.a) != 1:
        parser.error("several A runs need --pooled (the i-th A is paired with the i-th B)")
    a_runs = args.a if args.pooled else args.a * len(args.b)
    rows, counts, a_cache = [], [], {}
    print(f"{args.split} split, {args.samples} matched-pairs resamples")
    print("| A -> B | WER % (A) | WER % (B) | relative | 95% interval | B better in |")
    print("|---|---|---|---|---|---|")
    for a_run, b_run in zip(a_runs, args.b, strict=True):
        if a_run not in a_cache:
            a_cache[a_run] = errors_of(a_run, args.split)
        counts.append(paired(a_cache[a_run], errors_of(b_run, args.split), (a_run, b_run)))
        rows.append({"a": a_run, "b": b_run, **bootstrap(counts[-1], args.samples, args.seed)})
        _print_row(f"{a_run} -> {b_run}", rows[-1])
    if args.pooled:
        ids = [sorted(a_cache[a]) for a in args.a]
        if any(i != ids[0] for i in ids):
            raise ValueError("the pairs were scored on different utterances: use one split")
        row = {"a": args.a, "b": args.b, **pooled(counts, args.samples, args.seed)}
        rows.append(row)
        _print_row(f"pooled over {row['pairs']} pairs", row)
        if row["t_interval"] is not None:
            lo, hi = row["t_interval"]
            print(
                f"\nper pair: {', '.join(f'{100 * r:+.1f}%' for r in row['per_pair'])}; "
                f"mean {100 * np.mean(row['per_pair']):+.1f}%, Student-t 95% interval over the "
                f"pairs [{100 * lo:+.1f}%, {100 * hi:+.1f}%]"
            )
    return rows


if __name__ == "__main__":
    main()
