"""The trainer's data section: sources, tokenizer, pipelines and feature statistics.

`config.data.train` / `.validation` / `.test` are source specs of `jaxspeech.data.sources`:
`tfds:<name>[/<config>]:<split>`, `librispeech_dir:<root>:<split>` or `manifest:<path.jsonl>`.
The spoken-commands corpus (`tfds:spoken_commands/<config>:...`) is built on first use.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np

from jaxspeech import features
from jaxspeech.data import bucketing, sources, tokenizers
from jaxspeech.data import pipeline as pipeline_lib

SAMPLE_RATE = 16000
SPLITS = ("train", "validation", "test")


def _tfds_data_dir(data_cfg) -> str | None:
    return data_cfg.tfds_data_dir or None


def prepare_corpus(spec: str, data_dir: str | None) -> None:
    """Builds the spoken-commands corpus named by a `tfds:spoken_commands/...` spec if needed."""
    parsed = sources.SourceSpec.parse(spec)
    if parsed.kind != "tfds" or not parsed.location.startswith("spoken_commands"):
        return
    import tensorflow_datasets as tfds

    import jaxspeech.data.commands  # noqa: F401  (registers the builder)

    builder = tfds.builder(parsed.location, data_dir=data_dir)
    if not builder.is_prepared():
        print(f"building {parsed.location} in {builder.data_dir} (once)", flush=True)
        builder.download_and_prepare()


def source_spec(data_cfg, split: str) -> str:
    """The spec for `split` (train/validation/test), or `split` itself when it is a spec or a
    manifest path."""
    if split in SPLITS:
        return data_cfg[split]
    if split.endswith(".jsonl") and not split.startswith("manifest:"):
        return f"manifest:{split}"
    if ":" in split:
        return split
    raise ValueError(f"unknown split {split!r}: use one of {SPLITS}, a source spec or a .jsonl")


def get_source(data_cfg, split: str):
    spec = source_spec(data_cfg, split)
    prepare_corpus(spec, _tfds_data_dir(data_cfg))
    return sources.open_source(spec, data_dir=_tfds_data_dir(data_cfg))


def _texts(source) -> Iterable[str]:
    if hasattr(source, "texts"):
        yield from source.texts()
        return
    for i in range(len(source)):
        record = source[i]
        if record is not None:
            yield record["text"]


def build_tokenizer(data_cfg, workdir: str):
    """The workdir's tokenizer, or a new one built from the training transcripts and saved there."""
    directory = os.path.join(workdir, "tokenizer")
    if os.path.exists(directory):
        return tokenizers.load_tokenizer(directory)
    texts = _texts(get_source(data_cfg, "train"))
    if data_cfg.tokenizer == "char":
        tokenizer = tokenizers.CharTokenizer.from_transcripts(texts)
    elif data_cfg.tokenizer == "sentencepiece":
        if data_cfg.vocab_size <= 1:
            raise ValueError("data.tokenizer='sentencepiece' needs data.vocab_size > 1")
        tokenizer = tokenizers.SentencePieceTokenizer.train(texts, data_cfg.vocab_size)
    else:
        raise ValueError(
            f"data.tokenizer must be 'char' or 'sentencepiece', got {data_cfg.tokenizer!r}"
        )
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(directory)
    return tokenizer


def _boundaries(data_cfg) -> list[int]:
    seconds = {float(s) for s in data_cfg.bucket_seconds} | {float(data_cfg.max_duration)}
    seconds = sorted(seconds)
    seconds = [s for s in seconds if s <= data_cfg.max_duration]
    return [int(round(s * SAMPLE_RATE)) for s in seconds]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def left_out(pipeline: pipeline_lib.Pipeline) -> dict[str, int]:
    """How many records of its source a pipeline leaves out of every epoch (and so of a WER), by
    reason (`jaxspeech.data.bucketing.REASONS`; the reasons that occur)."""
    stats = pipeline.stats()
    return {r: stats[r] for r in bucketing.REASONS if r != "kept" and stats[r]}


def format_left_out(counts: dict[str, int]) -> str:
    """`left_out` counts in words: "too_long 3, empty 1" ("none" for none)."""
    return ", ".join(f"{r} {n}" for r, n in counts.items()) or "none"


def lengths_cache(cache_dir: str | None, split: str) -> str | None:
    """Where the per-record lengths of `split` are cached (the first scan reads every record)."""
    if cache_dir is None:
        return None
    os.makedirs(cache_dir, exist_ok=True)
    return os.path.join(cache_dir, "lengths_" + re.sub(r"[^\w.-]+", "_", split)[-100:] + ".npz")


def train_pipeline(
    data_cfg,
    tokenizer,
    *,
    seed: int,
    batch_divisor: int = 1,
    source=None,
    cache_dir: str | None = None,
    min_samples: int = 1,
) -> pipeline_lib.Pipeline:
    """Shuffled, repeated, bucketed training batches (batch size rounded up to the mesh's
    batch-sharding divisor); audio shorter than `min_samples` is left out (`too_short`)."""
    source = get_source(data_cfg, "train") if source is None else source
    return pipeline_lib.make_pipeline(
        source,
        tokenizer,
        bucket_boundaries=_boundaries(data_cfg),
        batch_size=_round_up(data_cfg.batch_size, batch_divisor),
        max_label_length=data_cfg.max_label_length,
        train=True,
        min_samples=min_samples,
        seed=seed,
        num_workers=data_cfg.num_workers,
        lengths_cache=lengths_cache(cache_dir, source_spec(data_cfg, "train")),
    )


def eval_pipeline(
    data_cfg,
    split: str,
    tokenizer,
    *,
    source=None,
    cache_dir: str | None = None,
    max_utterances: int = -1,
) -> pipeline_lib.Pipeline:
    """One ordered pass over `split` (train/validation/test, a source spec or a .jsonl path), or
    with `max_utterances` > 0 over that many of its records spread evenly over it (the batches
    come in length order, so the first N utterances they hold would be the shortest).

    Unlike training, nothing is filtered for length: the last bucket and the label width grow to
    the split's longest utterance, so the WER covers every (non-empty) utterance."""
    source = get_source(data_cfg, split) if source is None else source
    name = source_spec(data_cfg, split)
    if 0 < max_utterances < len(source):
        source = sources.SubsetSource.evenly_spaced(source, max_utterances)
        name += f"@{max_utterances}"
    lengths = pipeline_lib.scan_lengths(
        source, tokenizer, cache_path=lengths_cache(cache_dir, name)
    )
    longest = _round_up(max(int(lengths.num_samples.max(initial=1)), 1), SAMPLE_RATE)
    bounds = [b for b in _boundaries(data_cfg) if b < longest] + [longest]
    max_label = max(
        int(data_cfg.max_label_length),
        _round_up(max(int(lengths.label_lengths.max(initial=1)), 1), 8),
    )
    return pipeline_lib.make_pipeline(
        source,
        tokenizer,
        bucket_boundaries=bounds,
        batch_size=data_cfg.eval_batch_size,
        max_label_length=max_label,
        train=False,
        lengths=lengths,
    )


def feature_statistics(
    source,
    num_utterances: int,
    feature_cfg: features.FeatureConfig,
    *,
    batch_size: int = 16,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Global log-mel mean/std [F] from a random subset of `num_utterances` training records."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(source))[: max(int(num_utterances), 1)]
    waves = [r["audio"] for r in (source[int(i)] for i in order) if r is not None]
    waves = [np.asarray(w, np.float32) for w in waves if len(w) > 0]
    if not waves:
        raise ValueError("no training audio to compute feature statistics from")
    width = _round_up(max(len(w) for w in waves), SAMPLE_RATE)  # one shape: one compile
    stats = features.FeatureStats()
    for start in range(0, len(waves), batch_size):
        chunk = waves[start : start + batch_size]
        audio = np.zeros((batch_size, width), np.float32)
        lengths = np.zeros((batch_size,), np.int32)
        for row, w in enumerate(chunk):
            audio[row, : len(w)], lengths[row] = w, len(w)
        stats.update(*features.log_mel(jnp.asarray(audio), jnp.asarray(lengths), feature_cfg))
    return stats.result()
