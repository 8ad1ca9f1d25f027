r"""Where the arbitrators spend compute: their hard gates against what the audio holds.

  python scripts/gate_analysis.py --workdir runs/arb_deep_scratch_chunk_32_seed1 --utterances 400

The compute-cost amortized Transformer is meant to "think harder" where the audio is hard. For
the first `--utterances` of the run's test split this joins the gates inference uses (hard, eval
mode, per encoder frame) with two things the corpus knows about its audio:

- **speech vs non-speech frames.** The spoken-commands corpus is synthesized deterministically,
  so each utterance's clean speech is re-synthesized (and its noisy mix checked against the
  stored audio, sample for sample). An encoder frame is speech when any 10 ms hop it covers is
  within `SPEECH_DB` of the utterance's loudest hop of clean speech; silence pads and pauses
  between words are non-speech, whatever noise lies over them. Other corpora skip this table.
- **the utterance's metadata**: SNR band and noise kind (the `snr` and `noise` fields).

Prints, and writes into `--out` (default: the workdir) as `gate_analysis.json` and
`gate_analysis.md`: per layer and component, the share of speech and of non-speech frames it runs
on; the executed compute per utterance (gated encoder, % of all gates on) by SNR band and noise
kind, with its rank correlations with the SNR and with the utterance's non-speech share; and
`gates.png`, the gates of the cheapest and the dearest utterance over their log-mel features.
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import numpy as np

from jaxspeech import pyfile
from jaxspeech.train import gate_stats
from jaxspeech.train.static_export import STATIC_SLACK

# A hop of clean speech quieter than its utterance's loudest by more than this is not speech.
SPEECH_DB = 35.0


def speech_hops(clean: np.ndarray, hop: int) -> np.ndarray:
    """bool [len(clean) // hop]: hops of clean speech within `SPEECH_DB` of the loudest."""
    n = clean.size // hop
    energy = np.mean(np.square(clean[: n * hop].reshape(n, hop), dtype=np.float64), axis=1)
    db = 10.0 * np.log10(energy + 1e-20)
    return db > db.max() - SPEECH_DB


def speech_frames(hops: np.ndarray, factor: int, num_frames: int) -> np.ndarray:
    """bool [num_frames]: encoder frame t (feature frames t*factor ... t*factor+factor-1, one
    hop each) is speech when any of its hops is."""
    padded = np.zeros(num_frames * factor, bool)
    m = min(hops.size, padded.size)
    padded[:m] = hops[:m]
    return padded.reshape(num_frames, factor).any(axis=1)


# Frame classes: where a frame lies relative to the utterance's speech.
CLASSES = ("speech", "leading silence", "pauses", "trailing silence")


def frame_classes(speech: np.ndarray) -> np.ndarray:
    """int [T] indices into `CLASSES`: speech frames, non-speech before the first speech frame,
    between speech frames, after the last."""
    out = np.full(speech.shape, 2)
    where = np.flatnonzero(speech)
    if where.size == 0:
        return np.ones(speech.shape, int)
    out[: where[0]] = 1
    out[where[-1] + 1 :] = 3
    out[speech] = 0
    return out


def clean_speech(spec: str, records: list[dict]) -> list[np.ndarray] | None:
    """The clean speech of each spoken-commands record (re-synthesized), or None for another
    corpus. Raises if a re-synthesized mix differs from the stored audio."""
    from jaxspeech.data import sources

    parsed = sources.SourceSpec.parse(spec)
    name, _, config_name = parsed.location.partition("/")
    if parsed.kind != "tfds" or name != "spoken_commands":
        return None
    from jaxspeech.data.commands import builder

    config = {c.name: c for c in builder.CONFIGS}[
        config_name or builder.SpokenCommands.DEFAULT_CONFIG_NAME
    ]
    ids = [r["id"].rsplit("-", 1) for r in records]
    split = ids[0][0]
    rendered = builder.render_indices(
        split, [int(i) for _, i in ids], config.seed, config.difficulty, return_clean=True
    )
    out = []
    for record, (_, index) in zip(records, ids, strict=True):
        example = rendered[int(index)]
        stored = np.round(np.asarray(record["audio"]) * 32768.0).astype(np.int16)
        if not np.array_equal(stored, example["audio"]):
            raise ValueError(
                f"{record['id']}: the re-synthesized audio differs from the stored {spec} record "
                "(was the corpus built with another espeak-ng or jaxspeech version?); rebuild it "
                "with scripts/build_corpus.py or analyse without speech labels (--no_speech)"
            )
        out.append(example["clean"])
    return out


def rank_correlation(a, b) -> float:
    """Spearman's rho (average ranks for ties; inf ranks as the largest)."""
    from scipy import stats

    if np.ptp(np.asarray(a, np.float64)) == 0 or np.ptp(np.asarray(b, np.float64)) == 0:
        return float("nan")  # a constant has no rank order
    return float(stats.spearmanr(np.asarray(a, np.float64), np.asarray(b, np.float64))[0])


def analyse(model, feats, records, clean, factor: int, hop: int) -> tuple[dict, list]:
    """Per-component on-rates by frame class (`CLASSES`) and per-utterance compute."""
    bench = pyfile.sibling(__file__, "bench_arbitrator")
    num_layers, k = model.cfg.num_layers, len(CLASSES)
    # [layer, class]; the last column: the utterance's first attention chunk, whatever it holds.
    on = {c: np.zeros((num_layers, k + 1)) for c in ("attention", "ffn")}
    frames = np.zeros(k + 1)
    utts, gates = [], []
    total_on, total_frames = np.zeros(2 * num_layers), 0  # every component, every frame
    b0 = 0
    for counts, attn, ffn, enc_lengths in gate_stats.traces(model, bench.batches(feats)):
        for b, t in enumerate(enc_lengths):
            i = b0 + b
            a, f = attn[:, b, :t], ffn[:, b, :t]
            gates.append((a, f))
            compute = float(counts["gated"][b] / counts["gated_full"][b])
            utt = {"id": records[i]["id"], "compute": compute, "frames": int(t)}
            utt.update({key: records[i][key] for key in ("snr", "noise") if key in records[i]})
            if clean is not None:
                classes = frame_classes(speech_frames(speech_hops(clean[i], hop), factor, int(t)))
                utt["non_speech"] = float(np.mean(classes != 0))
                both = np.concatenate([a, f], axis=0)  # [2L, T]: every gated component
                for key, frames_of in (
                    ("speech_on", classes == 0),
                    ("non_speech_on", classes != 0),
                ):
                    if frames_of.any():
                        utt[key] = float(both[:, frames_of].mean())
                for c in range(k):
                    on["attention"][:, c] += a[:, classes == c].sum(axis=1)
                    on["ffn"][:, c] += f[:, classes == c].sum(axis=1)
                    frames[c] += np.sum(classes == c)
            first = min(int(t), model.cfg.chunk_size)  # the first attention chunk, any class
            on["attention"][:, k] += a[:, :first].sum(axis=1)
            on["ffn"][:, k] += f[:, :first].sum(axis=1)
            frames[k] += first
            total_on += np.concatenate([a, f], axis=0).sum(axis=1)
            total_frames += int(t)
            utts.append(utt)
        b0 += len(enc_lengths)
    report: dict = {"utterances": utts}
    overall = total_on / max(total_frames, 1)  # [2L]: attention layers, then FFN layers
    dynamic = (overall > STATIC_SLACK) & (overall < 1 - STATIC_SLACK)
    report["off"] = {  # component-frames off, as a share of all (unweighted by FLOPs)
        "all": float(np.mean(1 - overall)),
        "static": float(np.sum((1 - overall)[~dynamic]) / overall.size),
        "input_dependent": float(np.sum((1 - overall)[dynamic]) / overall.size),
    }
    columns = (CLASSES if clean is not None else ()) + ("first chunk",)
    if clean is not None:
        report["frame_share"] = dict(
            zip(CLASSES, (frames[:k] / frames[:k].sum()).tolist(), strict=True)
        )
    index = [CLASSES.index(c) if c in CLASSES else k for c in columns]
    report["on_rate"] = {
        comp: {
            c: (v[:, j] / max(frames[j], 1)).tolist() for c, j in zip(columns, index, strict=True)
        }
        for comp, v in on.items()
    }
    snr_band = pyfile.sibling(__file__, "error_analysis").snr_band  # the bands its WER tables use
    groups = collections.defaultdict(list)
    for u in utts:
        if "snr" in u:
            groups["snr " + snr_band(u["snr"])].append(u)
        if "noise" in u:
            groups["noise " + u["noise"]].append(u)
    report["compute_by_group"] = {}
    for g, members in sorted(groups.items()):
        c = [u["compute"] for u in members]
        row = {"utterances": len(c), "mean": float(np.mean(c)), "min": min(c), "max": max(c)}
        for key in ("speech_on", "non_speech_on"):  # mean over the group's utterances
            v = [u[key] for u in members if key in u]
            if v:
                row[key] = float(np.mean(v))
        report["compute_by_group"][g] = row
    computes = [u["compute"] for u in utts]
    if all("snr" in u for u in utts):
        report["rho_compute_snr"] = rank_correlation(computes, [u["snr"] for u in utts])
    if clean is not None:
        report["rho_compute_non_speech"] = rank_correlation(
            computes, [u["non_speech"] for u in utts]
        )
    return report, gates


def markdown(report: dict) -> str:
    lines = []
    rates = report["on_rate"]
    columns = list(rates["attention"])
    if "frame_share" in report:
        share = report["frame_share"]
        lines += [
            f"Encoder frames of {len(report['utterances'])} utterances: "
            + ", ".join(f"{c} {100 * share[c]:.1f}%" for c in CLASSES)
            + ".",
            "",
        ]
    off = report["off"]
    lines += [
        f"Component-frames switched off: {100 * off['all']:.1f}% of all; "
        f"{100 * off['static']:.1f} points in components on (or off) on all but "
        f"{100 * STATIC_SLACK:.0f}% of the frames (static pruning), "
        f"{100 * off['input_dependent']:.1f} in input-dependent ones.",
        "",
        "Share of the frames of each kind a component runs on (first chunk: the utterance's "
        "first attention chunk, whatever it holds):",
        "",
        "| component | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for comp, label in (("attention", "attention"), ("ffn", "FFN")):
        for layer in range(len(rates[comp][columns[0]])):
            cells = [f"{rates[comp][c][layer]:.3f}" for c in columns]
            lines.append(f"| {label} {layer} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [
        "Executed compute per utterance (gated encoder, % of all gates on) and the share of "
        "components on, averaged over the group's utterances, on speech and non-speech frames:",
        "",
        "| utterances | count | compute % mean | min | max | on, speech % | on, non-speech % |",
        "|---|---|---|---|---|---|---|",
    ]
    for g, v in report["compute_by_group"].items():
        on = [f"{100 * v[k]:.1f}" if k in v else "-" for k in ("speech_on", "non_speech_on")]
        lines.append(
            f"| {g} | {v['utterances']} | {100 * v['mean']:.1f} | {100 * v['min']:.1f} | "
            f"{100 * v['max']:.1f} | " + " | ".join(on) + " |"
        )
    for key, what in (("rho_compute_snr", "SNR"), ("rho_compute_non_speech", "non-speech share")):
        if key in report:
            lines.append(
                f"\nRank correlation of an utterance's compute with its {what}: {report[key]:+.3f}"
            )
    return "\n".join(lines) + "\n"


def plot(path: str, report: dict, gates, feats, clean, factor: int, hop: int) -> None:
    """The gates of the cheapest and the dearest utterance (and which frames are speech) under
    their log-mel features."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    computes = [u["compute"] for u in report["utterances"]]
    picks = [int(np.argmin(computes)), int(np.argmax(computes))]
    fig, axes = plt.subplots(2, len(picks), figsize=(6 * len(picks), 6), squeeze=False)
    for col, i in enumerate(picks):
        a, f = gates[i]
        u = report["utterances"][i]
        seconds = feats[i].shape[0] * hop / 16000.0
        axes[0, col].imshow(feats[i].T, origin="lower", aspect="auto", extent=(0, seconds, 0, 1))
        axes[0, col].set_yticks([])
        axes[0, col].set_title(f"{u['id']}: {100 * u['compute']:.1f}% compute")
        layers = a.shape[0]
        rows = [a, f]
        labels = [f"attn {k}" for k in range(layers)] + [f"ffn {k}" for k in range(layers)]
        if clean is not None:  # a first row: the speech frames
            rows.insert(0, speech_frames(speech_hops(clean[i], hop), factor, a.shape[1])[None])
            labels.insert(0, "speech")
        raster = np.concatenate(rows, axis=0).astype(np.float32)
        t_end = raster.shape[1] * factor * hop / 16000.0
        axes[1, col].imshow(
            raster,
            aspect="auto",
            cmap="gray_r",
            vmin=0,
            vmax=1,
            extent=(0, t_end, raster.shape[0], 0),
            interpolation="nearest",
        )
        axes[1, col].set_yticks(np.arange(len(labels)) + 0.5, labels, fontsize=7)
        axes[1, col].set_xlabel("seconds (dark: speech / component on)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a run with arbitrators (or static gates)")
    parser.add_argument("--utterances", type=int, default=400)
    parser.add_argument("--tfds_data_dir", default="")
    parser.add_argument("--out", default="", help="where the report goes (default: the workdir)")
    parser.add_argument("--no_speech", action="store_true", help="skip the speech labels")
    args = parser.parse_args(argv)

    from jaxspeech import features
    from jaxspeech.data import sources
    from jaxspeech.train import evaluate

    trained = evaluate.load_trained(args.workdir)
    if not trained.model.encoder.gated:
        parser.error(f"{args.workdir}: the model has no gates (no arbitrator, no static gates)")
    spec = trained.config.data.test
    feats = pyfile.sibling(__file__, "bench_arbitrator").test_features(
        trained.config, args.utterances, args.tfds_data_dir
    )
    source = sources.open_source(spec, data_dir=args.tfds_data_dir or None)
    records = [source[i] for i in range(len(feats))]
    clean = None if args.no_speech else clean_speech(spec, records)
    factor, hop = trained.model.cfg.subsampling_factor, features.FeatureConfig().hop_length
    report, gates = analyse(trained.model, feats, records, clean, factor, hop)
    out = args.out or args.workdir
    os.makedirs(out, exist_ok=True)
    text = markdown(report)
    print(text)
    with open(os.path.join(out, "gate_analysis.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "gate_analysis.md"), "w") as f:
        f.write(text)
    plot(os.path.join(out, "gates.png"), report, gates, feats, clean, factor, hop)
    return report


if __name__ == "__main__":
    main()
