"""Length-bucketed batch plans: which examples go into which fixed-shape batch, per epoch.

The plan is computed from per-example lengths (audio samples, label tokens) known up front, so

- the set of batch shapes is fixed and known before training (no recompilation),
- the number of batches per epoch is known and identical on every process (multi-host lockstep),
- each global batch of ``batch_size * process_count`` rows is split row-wise between processes, so
  the processes read disjoint shards that together cover the epoch,
- the iterator position is a single integer (exact checkpoint/restore).

Everything here is plain numpy; `jaxspeech.data.pipeline` wires it into grain.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

# Reasons an example is left out of every epoch (index into `Lengths.filter_reasons`).
KEPT, TOO_LONG, EMPTY, DECODE_FAILED, UNENCODABLE, TOO_SHORT = 0, 1, 2, 3, 4, 5
REASONS = ("kept", "too_long", "empty", "decode_failed", "unencodable", "too_short")
# Codes in `Lengths.label_lengths`: the record was None / the tokenizer rejected the text.
NO_RECORD, NOT_ENCODABLE = -1, -2


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Per-example `num_samples[i]` (audio) and `label_lengths[i]` (tokens).

    Both are `NO_RECORD` (-1) where the record was None; `label_lengths` is `NOT_ENCODABLE` (-2)
    where the tokenizer rejected the text (a character outside its vocabulary). `key` identifies
    the records and tokenizer they were measured on (`jaxspeech.data.pipeline.lengths_key`), so
    a cache is not read for others.
    """

    num_samples: np.ndarray
    label_lengths: np.ndarray
    key: str = ""

    def __post_init__(self):
        if self.num_samples.shape != self.label_lengths.shape or self.num_samples.ndim != 1:
            raise ValueError("num_samples and label_lengths must be 1-D arrays of equal length")

    def __len__(self) -> int:
        return int(self.num_samples.shape[0])

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp.npz"
        np.savez(tmp, num_samples=self.num_samples, label_lengths=self.label_lengths, key=self.key)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> Lengths:
        with np.load(path) as f:
            key = str(f["key"]) if "key" in f else ""
            return cls(f["num_samples"].astype(np.int64), f["label_lengths"].astype(np.int64), key)


@dataclasses.dataclass(frozen=True)
class BucketSpec:
    """Bucket `k` holds audio of `boundaries[k-1] < n <= boundaries[k]` samples.

    `batch_sizes[k]` is the per-process batch size of bucket k (the global batch is
    `batch_sizes[k] * process_count`). Its label width is the longest kept label in the bucket
    rounded up to `label_pad_multiple` (at most `max_label_length`). Audio of fewer than
    `min_samples` samples (but some) is left out as `too_short`: training sets it to what gives
    the encoder one frame, since a transducer loss over no frames has nothing to align.
    """

    boundaries: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    max_label_length: int
    label_pad_multiple: int = 8
    min_samples: int = 1

    def __post_init__(self):
        b = self.boundaries
        if not b or any(x <= 0 for x in b) or any(x >= y for x, y in zip(b, b[1:], strict=False)):
            raise ValueError(f"bucket boundaries must be positive and increasing, got {b}")
        if len(self.batch_sizes) != len(b) or any(s <= 0 for s in self.batch_sizes):
            raise ValueError(f"need one positive batch size per bucket, got {self.batch_sizes}")
        if self.max_label_length <= 0 or self.label_pad_multiple <= 0:
            raise ValueError("max_label_length and label_pad_multiple must be positive")
        if not 1 <= self.min_samples <= b[-1]:
            raise ValueError(f"min_samples must be in [1, {b[-1]}], got {self.min_samples}")

    @classmethod
    def create(
        cls,
        boundaries: Sequence[int],
        batch_size: int | Sequence[int],
        max_label_length: int,
        label_pad_multiple: int = 8,
        min_samples: int = 1,
    ) -> BucketSpec:
        sizes = [batch_size] * len(boundaries) if isinstance(batch_size, int) else batch_size
        return cls(
            tuple(int(x) for x in boundaries),
            tuple(int(x) for x in sizes),
            int(max_label_length),
            int(label_pad_multiple),
            int(min_samples),
        )


def classify(lengths: Lengths, spec: BucketSpec) -> tuple[np.ndarray, np.ndarray]:
    """Returns `(bucket_ids, reasons)`: bucket per example (-1 if filtered) and why (REASONS)."""
    n, u = lengths.num_samples, lengths.label_lengths
    reasons = np.full(len(lengths), KEPT, np.int8)
    reasons[(n > spec.boundaries[-1]) | (u > spec.max_label_length)] = TOO_LONG
    reasons[(n > 0) & (n < spec.min_samples)] = TOO_SHORT
    reasons[(n == 0) | (u == 0)] = EMPTY
    reasons[u == NOT_ENCODABLE] = UNENCODABLE
    reasons[(n == NO_RECORD) | (u == NO_RECORD)] = DECODE_FAILED
    buckets = np.searchsorted(np.asarray(spec.boundaries), n, side="left").astype(np.int64)
    buckets[reasons != KEPT] = -1
    return buckets, reasons


def label_widths(lengths: Lengths, buckets: np.ndarray, spec: BucketSpec) -> tuple[int, ...]:
    """Fixed label width `U_k` per bucket (derived from the kept labels, known up front)."""
    m = spec.label_pad_multiple
    widths = []
    for k in range(len(spec.boundaries)):
        longest = int(lengths.label_lengths[buckets == k].max(initial=1))
        widths.append(min(-(-longest // m) * m, spec.max_label_length))
    return tuple(widths)


def batches_per_bucket(
    buckets: np.ndarray, spec: BucketSpec, process_count: int, drop_remainder: bool
) -> np.ndarray:
    counts = np.bincount(buckets[buckets >= 0], minlength=len(spec.boundaries))
    global_sizes = np.asarray(spec.batch_sizes) * process_count
    return counts // global_sizes if drop_remainder else -(-counts // global_sizes)


def epoch_plan(
    buckets: np.ndarray,
    spec: BucketSpec,
    *,
    process_count: int,
    drop_remainder: bool,
    shuffle: bool,
    seed: int,
    epoch: int,
) -> list[tuple[int, np.ndarray]]:
    """The global batches of one epoch: a list of `(bucket, indices [batch_size * process_count])`.

    Indices are -1 for padding rows (only without `drop_remainder`). With `shuffle` the examples
    are permuted before bucketing and the batch order is permuted too, both from `(seed, epoch)`;
    without it batches come bucket by bucket in index order. The number of batches per bucket does
    not depend on the epoch.
    """
    rng = np.random.default_rng([seed, epoch]) if shuffle else None
    order = np.arange(buckets.shape[0])
    if rng is not None:
        order = rng.permutation(order)
    per_bucket = batches_per_bucket(buckets, spec, process_count, drop_remainder)
    plan = []
    for k, size in enumerate(spec.batch_sizes):
        gsize = size * process_count
        members = order[buckets[order] == k]
        n = int(per_bucket[k]) * gsize
        members = np.concatenate([members, np.full(max(n - members.size, 0), -1, np.int64)])[:n]
        plan.extend((k, members[j : j + gsize]) for j in range(0, n, gsize))
    if rng is not None:
        plan = [plan[j] for j in rng.permutation(len(plan))]
    return plan
