r"""Input-pipeline throughput, in hours of audio per second, beside what a train step consumes.

  python scripts/bench_pipeline.py                                   # synthetic in-memory source
  python scripts/bench_pipeline.py --tfds_data_dir ~/tensorflow_datasets \
      --tfds_name spoken_commands/default --split train --step_audio_seconds_per_second 300

The synthetic source holds LibriSpeech-like utterances (1-15 s, ~14 characters per second) in
memory, so it measures the pipeline itself (bucketing, padding, collation, threads), not audio
decoding; the TFDS run includes reading and converting the stored audio. The pipeline keeps up
when its audio hours per second exceed what the train step consumes
(`--step_audio_seconds_per_second`: seconds of audio the train step processes per wall second).
"""

import time

import numpy as np
from absl import app, flags

from jaxspeech.data.pipeline import make_pipeline
from jaxspeech.data.tokenizers import CharTokenizer

SR = 16000
_N = flags.DEFINE_integer("num_utterances", 2000, "Synthetic utterances.")
_BATCHES = flags.DEFINE_integer("batches", 200, "Batches to time (after 5 warm-up batches).")
_BOUNDARIES = flags.DEFINE_list("boundaries_s", ["4", "8", "12", "16"], "Bucket edges, seconds.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Per-process batch size (all buckets).")
_MAX_LABEL = flags.DEFINE_integer("max_label_length", 256, "Longer transcripts are filtered.")
_THREADS = flags.DEFINE_integer("num_threads", 2, "grain read threads.")
_WORKERS = flags.DEFINE_integer("num_workers", 0, "grain worker processes (0: none).")
_STEP = flags.DEFINE_float(
    "step_audio_seconds_per_second", None, "Audio seconds a train step consumes per second."
)
_TFDS_DIR = flags.DEFINE_string("tfds_data_dir", None, "Also benchmark a prepared TFDS corpus.")
_TFDS_NAME = flags.DEFINE_string("tfds_name", "spoken_commands/default", "TFDS name[/config].")
_SPLIT = flags.DEFINE_string("split", "train", "TFDS split.")


class SyntheticSource:
    def __init__(self, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.lengths = rng.integers(1 * SR, 15 * SR, n)
        words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
        self.texts = [
            " ".join(rng.choice(words, max(1, int(n_ / SR * 14 / 6)))) for n_ in self.lengths
        ]
        self.noise = rng.uniform(-0.5, 0.5, 16 * SR).astype(np.float32)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return {"audio": self.noise[: self.lengths[i]].copy(), "text": self.texts[i], "id": str(i)}


class TfdsRecords:
    """`tfds.data_source` mapped to records (`jaxspeech.data.sources.example_to_record`)."""

    def __init__(self, data_source):
        self.data_source = data_source

    def __len__(self):
        return len(self.data_source)

    def __getitem__(self, i):
        from jaxspeech.data.sources import example_to_record

        return example_to_record(self.data_source[int(i)])


def open_tfds(name: str, split: str, data_dir: str):
    import tensorflow_datasets as tfds

    import jaxspeech.data.commands  # noqa: F401  (registers `spoken_commands`)

    try:
        return TfdsRecords(tfds.data_source(name, split=split, data_dir=data_dir))
    except Exception as e:  # noqa: BLE001  (any missing-dataset error: report and skip)
        print(f"[tfds] skipped {name}:{split} in {data_dir}: {type(e).__name__}: {e}")
        return None


def bench(name: str, source, tokenizer) -> None:
    t0 = time.perf_counter()
    pipe = make_pipeline(
        source,
        tokenizer,
        bucket_boundaries=[int(float(s) * SR) for s in _BOUNDARIES.value],
        batch_size=_BATCH.value,
        max_label_length=_MAX_LABEL.value,
        train=True,
        num_threads=_THREADS.value,
        num_workers=_WORKERS.value,
        process_index=0,
        process_count=1,
    )
    scan_s = time.perf_counter() - t0
    stats = pipe.stats()
    with iter(pipe) as it:
        for _ in range(5):
            next(it)
        real = padded = 0
        t0 = time.perf_counter()
        for _ in range(_BATCHES.value):
            batch = next(it)
            real += int(batch["audio_lengths"].sum())
            padded += batch["audio"].size
        wall = time.perf_counter() - t0
    hours = real / SR / 3600
    print(f"[{name}] {len(source)} records, length scan {scan_s:.1f} s; stats {stats}")
    print(f"[{name}] shapes {[s['audio'] for s in pipe.shapes()]}")
    print(
        f"[{name}] {_BATCHES.value} batches in {wall:.2f} s: {hours / wall:.3f} audio h/s "
        f"({real / SR / wall:.0f} audio s/s, {_BATCHES.value / wall:.1f} batches/s), "
        f"padding efficiency {real / max(padded, 1):.2f}"
    )
    if _STEP.value:
        ratio = real / SR / wall / _STEP.value
        verdict = "keeps up" if ratio >= 1 else "is the BOTTLENECK"
        print(
            f"[{name}] train step consumes {_STEP.value:.0f} audio s/s "
            f"({_STEP.value / 3600:.3f} h/s): pipeline {verdict} ({ratio:.1f}x)"
        )


def main(argv):
    del argv
    print(f"threads={_THREADS.value} workers={_WORKERS.value}; shared machine: figures are noisy")
    synthetic = SyntheticSource(_N.value)
    bench("synthetic", synthetic, CharTokenizer.from_transcripts(synthetic.texts))
    if _TFDS_DIR.value:
        source = open_tfds(_TFDS_NAME.value, _SPLIT.value, _TFDS_DIR.value)
        if source is not None:
            texts = [source[i]["text"] for i in range(min(len(source), 2000))]
            tokenizer = CharTokenizer.from_transcripts(texts)
            bench(f"tfds {_TFDS_NAME.value}:{_SPLIT.value}", source, tokenizer)


if __name__ == "__main__":
    app.run(main)
