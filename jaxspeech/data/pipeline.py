"""grain input pipeline: random-access records -> fixed-shape, length-bucketed batches.

    pipe = make_pipeline(source, tokenizer, bucket_boundaries=[4 * 16000, 8 * 16000],
                         batch_size=16, max_label_length=128, train=True, seed=0)
    pipe.shapes()                 # every batch shape this pipeline can produce (pre-compile/assert)
    it = iter(pipe)
    batch = next(it)              # dict of numpy arrays (see `Pipeline`)
    state = it.get_state()        # JSON-serializable; `it.set_state(state)` resumes exactly

A source is any object with `__len__` and `__getitem__(i) -> record | None` (records: dict with
`audio` float32 16 kHz mono, `text` str, `id` str). Lengths are scanned once up front
(`scan_lengths`, cacheable), so the batch plan, its shapes, and the number of batches per epoch
are known before the first batch and are identical on every process (see `bucketing`).

Train mode: shuffled from `(seed, epoch)`, repeated (`num_epochs=None`: forever); the partial
batch of each bucket is dropped (different examples each epoch) unless `drop_remainder=False`.
Eval mode: one pass in index order; partial batches are padded with dummy rows (`audio_lengths`
and `label_lengths` 0, `weight` 0), so every kept example is seen exactly once.
"""

from __future__ import annotations

import collections
import hashlib
import json
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np
from absl import flags

from jaxspeech.data import bucketing
from jaxspeech.data.bucketing import BucketSpec, Lengths

STATE_VERSION = 1


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


def encode_or_none(tokenizer: Tokenizer, text: str) -> list[int] | None:
    """`tokenizer.encode(text)`, or None where the tokenizer rejects it (`ValueError`)."""
    try:
        return tokenizer.encode(text)
    except ValueError:
        return None


def label_length(tokenizer: Tokenizer, text: str) -> int:
    """Token count; 0 for a text that is empty (the tokenizers raise on those), or
    `bucketing.NOT_ENCODABLE` for one with characters outside the vocabulary."""
    ids = encode_or_none(tokenizer, text)
    if ids is not None:
        return len(ids)
    return bucketing.NOT_ENCODABLE if any(c.isalnum() for c in text) else 0


def lengths_key(source, tokenizer: Tokenizer) -> str:
    """What record lengths depend on: the source's `fingerprint()` (manifest, TFDS and
    concatenated sources have one; for a source without, its record count stands in) and the
    tokenizer's (for one without, its class name)."""

    def of(obj):
        fingerprint = getattr(obj, "fingerprint", None)
        return fingerprint() if fingerprint is not None else None

    return json.dumps(
        [of(source) or f"{len(source)} records", of(tokenizer) or type(tokenizer).__name__]
    )


def scan_lengths(
    source,
    tokenizer: Tokenizer,
    *,
    num_threads: int = 2,
    cache_path: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
    allgather: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Lengths:
    """Reads every record once: audio samples and label tokens per index (see `Lengths`).

    With `process_count > 1` each process reads the records `i % process_count == process_index`
    and `allgather` (default: `jax.experimental.multihost_utils.process_allgather`, stacking a
    [m, 2] array from every process into [P, m, 2]) assembles the whole table on every process.

    A cache at `cache_path` is read only if it was measured on the same records and tokenizer
    (`lengths_key`); otherwise the records are read again and the cache rewritten.
    """
    key = lengths_key(source, tokenizer)
    if cache_path is not None:
        try:
            cached = Lengths.load(cache_path)
            if len(cached) == len(source) and cached.key == key:
                return cached
        except (OSError, ValueError, KeyError):
            pass

    def measure(i):
        if i >= len(source):  # padding so every process gathers the same shape
            return (bucketing.NO_RECORD, bucketing.NO_RECORD)
        record = source[i]  # not `MapDataset.source`: grain drops None records silently
        if record is None:
            return (bucketing.NO_RECORD, bucketing.NO_RECORD)
        return (int(np.shape(record["audio"])[0]), label_length(tokenizer, record["text"]))

    n, pc = len(source), process_count
    per_process = -(-n // pc)
    ds = grain.MapDataset.range(process_index, per_process * pc, pc).map(measure)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=64))
    arr = np.asarray(list(it), np.int64).reshape(per_process, 2)
    if pc > 1:
        if allgather is None:
            from jax.experimental import multihost_utils

            allgather = multihost_utils.process_allgather
        arr = np.asarray(allgather(arr)).reshape(pc, per_process, 2)
        arr = arr.transpose(1, 0, 2).reshape(-1, 2)[:n]  # row i came from process i % pc
    lengths = Lengths(arr[:, 0].copy(), arr[:, 1].copy(), key)
    if cache_path is not None and process_index == 0:
        lengths.save(cache_path)
    return lengths


class Pipeline:
    """Bucketed batches over a random-access source (build with `make_pipeline`).

    Batches: `audio [B,N] float32`, `audio_lengths [B] int32`, `labels [B,U] int32` (0-padded),
    `label_lengths [B] int32`, `weight [B] float32` (1 real row, 0 padding row), `text [B]` and
    `id [B]` (numpy object arrays; '' for padding rows; `text` as in the record, not normalized),
    and one object array per `extra_keys` entry (None for padding rows). `(B, N, U)` is one of
    `shapes()`.

    Args: `train` (shuffle + repeat + drop partial batches) or eval (one ordered, padded pass);
    `seed` (with the epoch, decides the order); `num_epochs` (train default None = forever; eval
    1); `drop_remainder` (train only; False pads partial batches with weight-0 rows);
    `process_index` / `process_count` (default: jax's); `num_threads` / `prefetch` (grain read
    threads and batches buffered); `num_workers` (grain worker processes, 0 = none);
    `lengths` (precomputed `Lengths`, skips the scan) or `lengths_cache` (an .npz path);
    `allgather` (see `scan_lengths`; for tests).
    """

    def __init__(
        self,
        source,
        tokenizer: Tokenizer,
        spec: BucketSpec,
        *,
        train: bool,
        seed: int = 0,
        num_epochs: int | None = None,
        drop_remainder: bool | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        num_threads: int = 2,
        prefetch: int = 4,
        num_workers: int = 0,
        lengths: Lengths | None = None,
        lengths_cache: str | None = None,
        extra_keys: Sequence[str] = (),
        allgather: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        self.source, self.tokenizer, self.spec = source, tokenizer, spec
        self.train, self.seed = train, int(seed)
        self.num_epochs = num_epochs if train else (1 if num_epochs is None else num_epochs)
        self.drop_remainder = (train if drop_remainder is None else drop_remainder) and train
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")
        self.num_threads, self.prefetch, self.num_workers = num_threads, prefetch, num_workers
        self.extra_keys = tuple(extra_keys)
        if lengths is None:
            lengths = scan_lengths(
                source,
                tokenizer,
                num_threads=num_threads,
                cache_path=lengths_cache,
                process_index=self.process_index,
                process_count=self.process_count,
                allgather=allgather,
            )
        if len(lengths) != len(source):
            raise ValueError(f"{len(lengths)} lengths for a source of {len(source)} records")
        self.lengths = lengths
        digest = hashlib.sha1(lengths.num_samples.astype(np.int64).tobytes())
        digest.update(lengths.label_lengths.astype(np.int64).tobytes())
        self._lengths_digest = digest.hexdigest()
        self.buckets, self.reasons = bucketing.classify(lengths, spec)
        self.label_widths = bucketing.label_widths(lengths, self.buckets, spec)
        self._per_bucket = bucketing.batches_per_bucket(
            self.buckets, spec, self.process_count, self.drop_remainder
        )
        self.batches_per_epoch = int(self._per_bucket.sum())
        if self.batches_per_epoch == 0:
            raise ValueError(f"no batch can be formed: {self.stats()}")
        self._plans: collections.OrderedDict[int, list] = collections.OrderedDict()
        self._lock = threading.Lock()

    # ---- what the trainer needs to know up front ----
    def shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """Every batch shape this pipeline can yield, one per bucket that yields batches."""
        return [
            {"audio": (b, n), "labels": (b, u)}
            for k, (b, n, u) in enumerate(
                zip(self.spec.batch_sizes, self.spec.boundaries, self.label_widths, strict=True)
            )
            if self._per_bucket[k] > 0
        ]

    def stats(self) -> dict[str, int]:
        """Per-epoch counts over the whole source (all processes together)."""
        counts = np.bincount(self.reasons, minlength=len(bucketing.REASONS))
        gsizes = np.asarray(self.spec.batch_sizes) * self.process_count
        rows = int((self._per_bucket * gsizes).sum())
        kept = int(counts[bucketing.KEPT])
        return {
            "seen": len(self.lengths),
            "yielded": min(rows, kept),  # real rows per epoch
            **{r: int(counts[i]) for i, r in enumerate(bucketing.REASONS) if i != bucketing.KEPT},
            "dropped_remainder": max(kept - rows, 0),
            "padding_rows": max(rows - kept, 0),
            "batches_per_epoch": self.batches_per_epoch,
        }

    def fingerprint(self) -> str:
        """Identifies the batch plan; an iterator state only restores into the same plan."""
        key = json.dumps(
            [
                self._lengths_digest,
                self.spec.boundaries,
                self.spec.batch_sizes,
                self.label_widths,
                self.train,
                self.seed,
                self.num_epochs,
                self.drop_remainder,
                self.process_index,
                self.process_count,
                self.batches_per_epoch,
            ]
            # only where it filters anything: plans from before `min_samples` keep their print
            + ([self.spec.min_samples] if np.any(self.reasons == bucketing.TOO_SHORT) else [])
        )
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    # ---- batch construction ----
    def _plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        with self._lock:
            plan = self._plans.get(epoch)
            if plan is None:
                plan = bucketing.epoch_plan(
                    self.buckets,
                    self.spec,
                    process_count=self.process_count,
                    drop_remainder=self.drop_remainder,
                    shuffle=self.train,
                    seed=self.seed,
                    epoch=epoch,
                )
                self._plans[epoch] = plan
                while len(self._plans) > 2:
                    self._plans.popitem(last=False)
            return plan

    def _make_batch(self, step: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        epoch, j = divmod(step, self.batches_per_epoch)
        k, rows = self._plan(epoch)[j]
        b, n, u = self.spec.batch_sizes[k], self.spec.boundaries[k], self.label_widths[k]
        rows = rows[self.process_index * b : (self.process_index + 1) * b]
        batch = {
            "audio": np.zeros((b, n), np.float32),
            "audio_lengths": np.zeros((b,), np.int32),
            "labels": np.zeros((b, u), np.int32),
            "label_lengths": np.zeros((b,), np.int32),
            "weight": np.zeros((b,), np.float32),
            "text": np.full((b,), "", object),
            "id": np.full((b,), "", object),
            **{key: np.full((b,), None, object) for key in self.extra_keys},
        }
        failed = 0
        for r, i in enumerate(rows):
            if i < 0:
                continue
            record = self.source[int(i)]
            ids = None if record is None else encode_or_none(self.tokenizer, record["text"])
            if ids is None or not 0 < len(record["audio"]) <= n or not 0 < len(ids) <= u:
                failed += 1  # unreadable now, or differs from the scan: leave a padding row
                continue
            audio = np.asarray(record["audio"], np.float32)
            batch["audio"][r, : audio.shape[0]] = audio
            batch["audio_lengths"][r] = audio.shape[0]
            batch["labels"][r, : len(ids)] = ids
            batch["label_lengths"][r] = len(ids)
            batch["weight"][r] = 1.0
            batch["text"][r] = record["text"]
            batch["id"][r] = str(record.get("id", i))
            for key in self.extra_keys:
                batch[key][r] = record.get(key)
        return batch, {"epoch": epoch, "examples": int(batch["weight"].sum()), "failed": failed}

    def dataset(self, start: int = 0) -> grain.IterDataset:
        """The grain dataset of `(batch, info)` pairs for global steps `start, start + 1, ...`."""
        stop = sys.maxsize if self.num_epochs is None else self.num_epochs * self.batches_per_epoch
        ds = grain.MapDataset.range(min(start, stop), stop).map(self._make_batch)
        read = grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=self.prefetch)
        it_ds = ds.to_iter_dataset(read)
        if self.num_workers > 0:
            if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
                flags.FLAGS.mark_as_parsed()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
        return it_ds

    def __iter__(self) -> PipelineIterator:
        return PipelineIterator(self)

    def __getstate__(self):  # picklable for grain worker processes
        state = dict(self.__dict__)
        state.pop("_lock")
        state["_plans"] = collections.OrderedDict()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class PipelineIterator(grain.DatasetIterator):
    """Checkpointable batch iterator over a `Pipeline`.

    `get_state()` is a small JSON-serializable dict `{"version", "fingerprint", "step",
    "counters"}`: `step` is the number of global batches consumed, which determines everything
    that follows (the plan is a pure function of the step), so `set_state` resumes exactly, even
    with a different `num_threads` / `num_workers`. It works with grain's Orbax handler
    (`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`) or as plain JSON.
    """

    def __init__(self, pipeline: Pipeline, start: int = 0):
        super().__init__()
        self.pipeline = pipeline
        self.step = start
        self.counters = {"batches": 0, "examples": 0, "decode_failed": 0, "epoch": 0}
        self._it = iter(pipeline.dataset(start))

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        batch, info = next(self._it)
        self.step += 1
        c = self.counters
        c["batches"] += 1
        c["examples"] += info["examples"]
        c["decode_failed"] += info["failed"]
        c["epoch"] = info["epoch"]
        return batch

    def get_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "fingerprint": self.pipeline.fingerprint(),
            "step": self.step,
            "counters": dict(self.counters),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported pipeline state version {state.get('version')}")
        if state["fingerprint"] != self.pipeline.fingerprint():
            raise ValueError("iterator state belongs to a different pipeline configuration")
        self._it.close()
        self.step = int(state["step"])
        self.counters = dict(state["counters"])
        self._it = iter(self.pipeline.dataset(self.step))

    def start_prefetch(self) -> None:
        self._it.start_prefetch()

    def close(self) -> None:
        """Stops grain's prefetch threads / worker processes."""
        if getattr(self, "_it", None) is not None:
            self._it.close()
        super().close()

    def __enter__(self) -> PipelineIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_pipeline(
    source,
    tokenizer: Tokenizer,
    *,
    bucket_boundaries: Sequence[int],
    batch_size: int | Sequence[int],
    max_label_length: int,
    train: bool,
    label_pad_multiple: int = 8,
    min_samples: int = 1,
    **kwargs,
) -> Pipeline:
    """Builds a `Pipeline`. `bucket_boundaries`: max audio samples per bucket (increasing; the last
    is the maximum duration, longer utterances are filtered); `batch_size`: per-process batch size,
    one for all buckets or one per bucket; `min_samples`: shorter audio is filtered (`too_short`).
    Other keyword arguments: see `Pipeline`."""
    spec = BucketSpec.create(
        bucket_boundaries, batch_size, max_label_length, label_pad_multiple, min_samples
    )
    return Pipeline(source, tokenizer, spec, train=train, **kwargs)
