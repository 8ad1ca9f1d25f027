"""Input pipeline: fixed shapes, filtering, exactly-once eval, determinism, restore, sharding."""

import collections
import json

import numpy as np
import pytest

from jaxspeech.data import bucketing
from jaxspeech.data.pipeline import make_pipeline, scan_lengths
from jaxspeech.data.tokenizers import CharTokenizer

BOUNDARIES = (800, 1600, 2400)
BATCH = (8, 4, 2)
MAX_LABEL = 24


TOK = CharTokenizer(list("abcd "))
CATEGORIES = ("kept", "too_long", "long_label", "empty", "empty_text", "unencodable", "none")


def make_text(rng, length):
    """Letters a-d with single inner spaces: already normalized, so `length` tokens."""
    chars = list(rng.choice(list("abcd"), length))
    for j in range(1, length - 1):
        if chars[j - 1] != " " and rng.random() < 0.2:
            chars[j] = " "
    return "".join(chars)


class MemSource:
    """In-memory records of known category: kept, too long (audio or label), empty (audio or
    text), unencodable text, None (corrupt). `flaky` indices read as None after `scanned`."""

    def __init__(self, n=150, seed=0):
        rng = np.random.default_rng(seed)
        self.records, self.categories = [], []
        for i in range(n):
            cat = CATEGORIES[0] if rng.random() < 0.6 else rng.choice(CATEGORIES[1:])
            num = int(
                rng.integers(BOUNDARIES[-1] + 1, 3000)
                if cat == "too_long"
                else 0
                if cat == "empty"
                else rng.integers(1, BOUNDARIES[-1] + 1)
            )
            text = make_text(rng, int(rng.integers(1, MAX_LABEL + 1)))
            text = {
                "long_label": make_text(rng, MAX_LABEL + 5),
                "empty_text": " ?! ",
                "unencodable": text + "x",
            }.get(cat, text)
            audio = rng.uniform(-1, 1, num).astype(np.float32)
            record = {"audio": audio, "text": text, "id": f"utt{i}", "snr": 1.0}
            self.records.append(None if cat == "none" else record)
            self.categories.append(str(cat))
        self.flaky, self.scanned = set(), False

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        if self.scanned and i in self.flaky:
            return None
        return self.records[i]


def expected_kept(src):
    kept = {f"utt{i}" for i, c in enumerate(src.categories) if c == "kept"}
    n = collections.Counter(src.categories)
    reasons = {
        "too_long": n["too_long"] + n["long_label"],
        "empty": n["empty"] + n["empty_text"],
        "unencodable": n["unencodable"],
        "decode_failed": n["none"],
    }
    return kept, reasons


def pipe(src, **kw):
    kw.setdefault("train", True)
    return make_pipeline(
        src,
        kw.pop("tokenizer", TOK),
        bucket_boundaries=BOUNDARIES,
        batch_size=BATCH,
        max_label_length=MAX_LABEL,
        process_index=kw.pop("pi", 0),
        process_count=kw.pop("pc", 1),
        **kw,
    )


def ids(batch):
    return [i for i, w in zip(batch["id"], batch["weight"], strict=True) if w > 0]


@pytest.fixture(scope="module")
def src():
    return MemSource()


def test_shapes_padding_and_labels(src):
    p = pipe(src, seed=3)
    shapes = {(s["audio"], s["labels"]) for s in p.shapes()}
    assert len(shapes) == len(BOUNDARIES)
    by_id = {r["id"]: r for r in src.records if r is not None}
    it = iter(p)
    for _ in range(2 * p.batches_per_epoch + 3):  # crosses epoch boundaries
        b = next(it)
        assert (b["audio"].shape, b["labels"].shape) in shapes
        assert b["audio"].dtype == np.float32 and b["labels"].dtype == np.int32
        assert b["audio_lengths"].dtype == np.int32 and b["label_lengths"].dtype == np.int32
        for r, uid in enumerate(b["id"]):
            rec, n, u = by_id[uid], b["audio_lengths"][r], b["label_lengths"][r]
            assert n == len(rec["audio"]) and b["text"][r] == rec["text"]
            np.testing.assert_array_equal(b["audio"][r, :n], rec["audio"])
            assert not b["audio"][r, n:].any()
            assert b["labels"][r, :u].tolist() == TOK.encode(rec["text"])
            assert not b["labels"][r, u:].any() and b["labels"][r, :u].min() >= 1
    assert it.counters["epoch"] == 2


def test_eval_exactly_once_and_filter_counts(src):
    p = pipe(src, train=False, extra_keys=("snr",))
    kept, reasons = expected_kept(src)
    seen, shapes = [], {(s["audio"], s["labels"]) for s in p.shapes()}
    batches = list(p)
    for b in batches:
        assert (b["audio"].shape, b["labels"].shape) in shapes
        pad = b["weight"] == 0
        assert not b["audio_lengths"][pad].any() and not b["label_lengths"][pad].any()
        assert not b["audio"][pad].any() and all(t == "" for t in b["text"][pad])
        assert b["snr"].tolist() == [None if p else 1.0 for p in pad]
        seen += ids(b)
    assert len(batches) == p.batches_per_epoch
    assert sorted(seen) == sorted(kept) and len(seen) == len(set(seen))
    stats = p.stats()
    assert {k: stats[k] for k in reasons} == reasons and min(reasons.values()) > 0
    assert stats["seen"] == len(src) and stats["yielded"] == len(kept)
    assert stats["dropped_remainder"] == 0 and stats["padding_rows"] > 0


def test_train_drops_remainder_and_counts(src):
    p = pipe(src, seed=0)
    kept, _ = expected_kept(src)
    epoch = [next(iter_) for iter_ in [iter(p)] for _ in range(p.batches_per_epoch)]
    seen = [i for b in epoch for i in ids(b)]
    assert len(seen) == len(set(seen)) == p.stats()["yielded"]
    assert set(seen) <= kept and len(kept) - len(seen) == p.stats()["dropped_remainder"]
    assert all(b["weight"].all() for b in epoch)


def test_deterministic_shuffle(src):
    def order(seed, n):
        it = iter(pipe(src, seed=seed))
        return [ids(next(it)) for _ in range(n)]

    n = pipe(src).batches_per_epoch
    a = order(0, 2 * n)
    assert a == order(0, 2 * n)
    assert a != order(1, 2 * n)
    assert a[:n] != a[n:]  # reshuffled each epoch
    assert set(sum(a[:n], [])) != set(sum(a[n:], []))  # different remainders dropped


@pytest.mark.parametrize("train", [True, False])
def test_exact_restore_mid_epoch(src, train):
    p = pipe(src, train=train, seed=5, num_epochs=3 if train else None)
    k = p.batches_per_epoch // 2 + (p.batches_per_epoch if train else 0)
    it = iter(p)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    rest = [ids(b) for b in it]
    restored = iter(pipe(src, train=train, seed=5, num_epochs=3 if train else None))
    restored.set_state(state)
    assert restored.counters == state["counters"]
    assert [ids(b) for b in restored] == rest and rest
    with pytest.raises(ValueError, match="different pipeline"):
        iter(pipe(src, train=train, seed=6, num_epochs=3 if train else None)).set_state(state)
    with pytest.raises(ValueError, match="different pipeline"):  # same size, other data
        other = MemSource(n=len(src), seed=9)
        iter(pipe(other, train=train, seed=5, num_epochs=3 if train else None)).set_state(state)


def simulated_allgather(src, pc):
    """What `process_allgather` returns when `pc` processes each scan their share of `src`."""
    local = []
    for p in range(pc):
        capture = lambda arr: (local.append(arr), np.stack([arr] * pc))[1]
        scan_lengths(src, TOK, process_index=p, process_count=pc, allgather=capture)
    assert len({a.shape for a in local}) == 1
    stacked = np.stack(local)
    return lambda arr: stacked


def test_sharded_scan_equals_full_scan():
    src = MemSource(n=50, seed=3)  # 50 = 3 * 17 - 1: the last process pads its share
    full = scan_lengths(src, TOK)
    for p in range(3):
        part = scan_lengths(
            src, TOK, process_index=p, process_count=3, allgather=simulated_allgather(src, 3)
        )
        np.testing.assert_array_equal(part.num_samples, full.num_samples)
        np.testing.assert_array_equal(part.label_lengths, full.label_lengths)
    assert (full.num_samples == [len(r["audio"]) if r else -1 for r in src.records]).all()


@pytest.mark.parametrize("train", [True, False])
def test_process_shards_disjoint_cover_and_lockstep(src, train):
    pc = 3
    gather = simulated_allgather(src, pc)
    pipes = [
        pipe(src, train=train, pi=i, pc=pc, seed=2, num_epochs=1, allgather=gather)
        for i in range(pc)
    ]
    assert len({q.batches_per_epoch for q in pipes}) == 1
    assert all(q.shapes() == pipes[0].shapes() for q in pipes)
    runs = [list(q) for q in pipes]
    for step in zip(*runs, strict=True):  # same shape on every process at every step
        assert len({b["audio"].shape + b["labels"].shape for b in step}) == 1
    shards = [{i for b in run for i in ids(b)} for run in runs]
    for i in range(pc):
        for j in range(i + 1, pc):
            assert not shards[i] & shards[j]
    union = set().union(*shards)
    kept, _ = expected_kept(src)
    if train:
        assert union <= kept and len(union) == pipes[0].stats()["yielded"]
    else:
        assert union == kept


def test_record_unreadable_after_scan_becomes_padding_row():
    src = MemSource(n=60, seed=1)
    kept, _ = expected_kept(src)
    flaky = sorted(int(u[3:]) for u in kept)[:2]
    src.flaky = set(flaky)
    p = pipe(src, train=False)
    src.scanned = True
    it = iter(p)
    seen = [i for b in it for i in ids(b)]
    assert sorted(seen) == sorted(kept - {f"utt{i}" for i in flaky})
    assert it.counters["decode_failed"] == 2 and it.counters["examples"] == len(seen)


def test_bucket_spec_and_plan_validation():
    with pytest.raises(ValueError):
        bucketing.BucketSpec.create([100, 50], 2, 10)
    with pytest.raises(ValueError):
        bucketing.BucketSpec.create([100, 200], [2], 10)
    spec = bucketing.BucketSpec.create([10, 20], [2, 1], 8, label_pad_multiple=4)
    lengths = bucketing.Lengths(
        np.array([5, 10, 11, 20, 21, 0, 3, -1]), np.array([1, 5, 2, 3, 1, 2, 9, -1])
    )
    buckets, reasons = bucketing.classify(lengths, spec)
    assert buckets.tolist() == [0, 0, 1, 1, -1, -1, -1, -1]
    assert reasons.tolist() == [0, 0, 0, 0, 1, 2, 1, 3]
    assert bucketing.label_widths(lengths, buckets, spec) == (8, 4)
    short = bucketing.BucketSpec.create([10, 20], [2, 1], 8, label_pad_multiple=4, min_samples=5)
    assert bucketing.classify(lengths, short)[1].tolist() == [0, 0, 0, 0, 1, 2, 5, 3]
    assert bucketing.REASONS[bucketing.TOO_SHORT] == "too_short"
    for bad in (0, 21):
        with pytest.raises(ValueError, match="min_samples"):
            bucketing.BucketSpec.create([10, 20], 2, 8, min_samples=bad)
    plan = bucketing.epoch_plan(
        buckets, spec, process_count=2, drop_remainder=False, shuffle=False, seed=0, epoch=0
    )
    assert [(k, r.tolist()) for k, r in plan] == [(0, [0, 1, -1, -1]), (1, [2, 3])]


def test_too_short_audio_is_left_out_and_counted(src):
    """Audio under `min_samples` (an encoder frame, in training) is filtered as `too_short`; a
    bound that filters nothing leaves the batch plan, and its fingerprint, as they were."""
    n = np.array([len(r["audio"]) if r else -1 for r in src.records])
    kept, _ = expected_kept(src)
    short = {f"utt{i}" for i in range(len(src)) if f"utt{i}" in kept and n[i] < 300}
    assert short
    # a record whose label is too long as well counts as too short; empty, unencodable and
    # unreadable records keep their own reasons
    cats = np.array(src.categories)
    too_short = int(np.sum(np.isin(cats, ["kept", "long_label"]) & (n > 0) & (n < 300)))
    p = pipe(src, train=False, min_samples=300)
    assert p.stats()["too_short"] == too_short and p.stats()["yielded"] == len(kept - short)
    assert {i for b in p for i in ids(b)} == kept - short
    lowest = int(n[n > 0].min())
    same, base = pipe(src, seed=2, min_samples=lowest), pipe(src, seed=2)
    assert same.stats()["too_short"] == 0 and same.fingerprint() == base.fingerprint()
    assert pipe(src, seed=2, min_samples=300).fingerprint() != base.fingerprint()


class PrintedSource(MemSource):
    """A MemSource that identifies its records, as manifest and TFDS sources do."""

    def __init__(self, n=150, seed=0):
        super().__init__(n, seed)
        self.seed, self.reads = seed, 0

    def fingerprint(self):
        return f"mem:{self.seed}"

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)


def test_lengths_cache(tmp_path, src):
    path = str(tmp_path / "lengths.npz")
    p = pipe(src, lengths_cache=path)
    cached = bucketing.Lengths.load(path)
    np.testing.assert_array_equal(cached.num_samples, p.lengths.num_samples)
    np.testing.assert_array_equal(cached.label_lengths, p.lengths.label_lengths)
    # Read back only for the records and tokenizer it was measured on.
    a, b = PrintedSource(seed=0), PrintedSource(seed=9)  # same size, other records
    path = str(tmp_path / "printed.npz")
    first = pipe(a, lengths_cache=path)
    reads = a.reads
    assert pipe(a, lengths_cache=path).fingerprint() == first.fingerprint() and a.reads == reads
    other = pipe(b, lengths_cache=path)
    assert b.reads == len(b) and other.fingerprint() != first.fingerprint()
    fresh = scan_lengths(PrintedSource(seed=9), TOK)
    np.testing.assert_array_equal(other.lengths.num_samples, fresh.num_samples)
    wider = CharTokenizer(list("abcdx "))  # "x" is now encodable
    assert pipe(b, lengths_cache=path, tokenizer=wider).stats()["unencodable"] == 0
    assert b.reads == 2 * len(b)
    # a cache from before keys (no `key` in the file) is measured again
    np.savez(path, num_samples=other.lengths.num_samples, label_lengths=other.lengths.label_lengths)
    pipe(b, lengths_cache=path)
    assert b.reads == 3 * len(b) and bucketing.Lengths.load(path).key


def test_orbax_checkpoint_round_trip(tmp_path, src):
    import grain
    import orbax.checkpoint as ocp

    p = pipe(src, seed=7)
    it = iter(p)
    for _ in range(5):
        next(it)
    handlers = {"data": grain.checkpoint.CheckpointHandler()}
    with ocp.CheckpointManager(tmp_path, item_names=("data",), item_handlers=handlers) as mngr:
        mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = [ids(next(it)) for _ in range(4)]
    restored = iter(pipe(src, seed=7))
    with ocp.CheckpointManager(tmp_path, item_names=("data",), item_handlers=handlers) as mngr:
        mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert restored.step == 5 and [ids(next(restored)) for _ in range(4)] == expected


@pytest.mark.slow  # spawns grain worker processes (5-15 s on 2 shared cores)
def test_worker_processes_same_batches_and_portable_state(src):
    it = iter(pipe(src, seed=4, num_threads=1))
    expected = [ids(next(it)) for _ in range(12)]
    with iter(pipe(src, seed=4, num_workers=2)) as mp_it:
        assert [ids(next(mp_it)) for _ in range(6)] == expected[:6]
        state = mp_it.get_state()
    with iter(pipe(src, seed=4, num_workers=1)) as resumed:
        resumed.set_state(state)
        assert [ids(next(resumed)) for _ in range(6)] == expected[6:]
