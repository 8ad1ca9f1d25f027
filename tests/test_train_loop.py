"""`train_and_evaluate` end to end on the tiny spoken-commands corpus: workdir contents,
checkpoint save/restore with automatic resume (4 + 4 steps == 8 uninterrupted steps), and the
bad-input errors raised before any training time is spent."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from jaxspeech import pyfile
from jaxspeech.train import checkpoint, loop, metrics

# One worker builds the module fixtures (the resumed run) once: `--dist loadgroup`.
pytestmark = pytest.mark.xdist_group("train_loop")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(tfds_dir, **train):
    config = pyfile.load(os.path.join(ROOT, "experiments", "commands_tt.py")).get_config("tiny")
    config.data.tfds_data_dir = str(tfds_dir)
    # Constant LR after warm-up: a run's first 4 steps do not depend on its num_steps.
    config.optim.schedule = "constant"
    config.train.update(dict(log_every=1, eval_every=100, checkpoint_every=4, **train))
    return config


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    # Compiled programs are shared between the runs of this module (same shapes, new jit objects).
    cache = tmp_path_factory.mktemp("jax_cache")
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield tmp_path_factory.mktemp("tfds")
    jax.config.update("jax_compilation_cache_dir", None)


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def resumed_run(tfds_dir, tmp_path_factory):
    """8 steps uninterrupted, and 4 steps then a rerun of the same command to 8."""
    straight = tmp_path_factory.mktemp("straight")
    loop.train_and_evaluate(tiny_config(tfds_dir, num_steps=8), str(straight))
    resumed = tmp_path_factory.mktemp("resumed")
    first = loop.train_and_evaluate(tiny_config(tfds_dir, num_steps=4), str(resumed))
    second = loop.train_and_evaluate(tiny_config(tfds_dir, num_steps=8), str(resumed))
    return straight, resumed, first, second


@pytest.mark.slow
def test_workdir_contents(resumed_run):
    straight, _, _, _ = resumed_run
    names = set(os.listdir(straight))
    assert {
        "config.json",
        "metrics.jsonl",
        "eval.json",
        "tokenizer",
        "tensorboard",
        "checkpoints",
    } <= names
    assert os.listdir(os.path.join(straight, "tensorboard"))
    with open(os.path.join(straight, "metrics.jsonl")) as f:
        row = json.loads(f.readline())
    for key in ("step", "loss", "learning_rate", "grad_norm", "steps_per_sec", "audio_sec_per_sec"):
        assert key in row
    with open(os.path.join(straight, "eval.json")) as f:
        report = json.load(f)
    for key in ("wer", "substitutions", "deletions", "insertions", "num_words", "rtf"):
        assert key in report
    assert report["num_utterances"] > 0 and report["step"] == 8
    with open(os.path.join(straight, "config.json")) as f:
        assert json.load(f)["train"]["num_steps"] == 8


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(resumed_run):
    straight, resumed, first, second = resumed_run
    assert first["step"] == 4 and second["step"] == 8
    assert checkpoint.Checkpointer(str(resumed)).latest_step() == 8
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(1, 9))  # the rerun continued at step 5
    for step in range(1, 9):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-5), step


@pytest.mark.slow
def test_sigterm_checkpoints_then_resume_is_bit_exact(resumed_run, tfds_dir, tmp_path, monkeypatch):
    """A real SIGTERM after step 3: checkpoint at 3, clean return; the rerun's losses equal the
    uninterrupted run's exactly (same data order, same RNG streams)."""
    straight = resumed_run[0]
    work = tmp_path / "preempted"
    write = metrics.MetricWriter.write_scalars

    def write_then_terminate(self, step, scalars, prefix=""):
        write(self, step, scalars, prefix=prefix)
        if step == 3 and not prefix:
            os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(metrics.MetricWriter, "write_scalars", write_then_terminate)
    first = loop.train_and_evaluate(tiny_config(tfds_dir, num_steps=8), str(work))
    monkeypatch.undo()
    assert first == {"preempted": True, "step": 3}
    assert checkpoint.Checkpointer(str(work)).latest_step() == 3
    assert not os.path.exists(work / "eval.json")
    assert signal.getsignal(signal.SIGTERM) == handler  # restored
    second = loop.train_and_evaluate(tiny_config(tfds_dir, num_steps=8), str(work))
    assert second["step"] == 8
    a, b = losses(straight), losses(work)
    assert sorted(b) == list(range(1, 9))
    assert [b[s] for s in range(1, 9)] == [a[s] for s in range(1, 9)]


def test_distills_from_a_teacher_workdir(resumed_run, tfds_dir, tmp_path):
    """`train.teacher`: the 8-step run teaches a fresh student; every step reports a finite,
    positive lattice distillation term."""
    straight = resumed_run[0]
    config = tiny_config(tfds_dir, num_steps=2, teacher=str(straight), teacher_weight=0.01)
    student = tmp_path / "student"
    loop.train_and_evaluate(config, str(student))
    with open(student / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    kd = [r["teacher_kd"] for r in rows if "teacher_kd" in r]
    assert len(kd) == 2 and all(0 < v < float("inf") for v in kd)


def test_warm_start_tokenizer_and_resume_without_the_source(resumed_run, tfds_dir, tmp_path):
    """`train.init_from` into a workdir whose tokenizer differs is refused (its output layer
    would predict other labels); a resumed warm-started run no longer needs `init_from`."""
    from jaxspeech.data import tokenizers

    straight = resumed_run[0]
    chars = tokenizers.load_tokenizer(straight / "tokenizer").chars
    other = tmp_path / "other"
    tokenizers.CharTokenizer(chars[::-1]).save(other / "tokenizer")  # same size, other order
    with pytest.raises(ValueError, match="another tokenizer than this workdir"):
        loop.train_and_evaluate(tiny_config(tfds_dir, init_from=str(straight)), str(other))
    work = tmp_path / "warm"
    loop.train_and_evaluate(tiny_config(tfds_dir, num_steps=4, init_from=str(straight)), str(work))
    gone = tiny_config(tfds_dir, num_steps=5, init_from=str(tmp_path / "deleted"))
    assert loop.train_and_evaluate(gone, str(work))["step"] == 5


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("keep_checkpoints", 0, "keep_checkpoints must be a positive int"),
        ("eval_every", 0, "eval_every must be a positive number of steps"),
        ("log_every", -1, "log_every must be a positive number of steps"),
    ],
)
def test_train_fields_are_checked_before_training(tfds_dir, tmp_path, field, value, match):
    config = tiny_config(tfds_dir)
    config.train[field] = value
    with pytest.raises(ValueError, match=match):
        loop.train_and_evaluate(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "metrics.jsonl")


def test_resume_with_another_batch_plan_is_refused_naming_the_fields(resumed_run, tfds_dir):
    """Another data.batch_size on resume: refused, naming the fields and the config.json to
    resume with, which still holds the checkpoint's values."""
    resumed = resumed_run[1]
    before = (resumed / "config.json").read_text()
    config = tiny_config(tfds_dir, num_steps=10)
    config.data.batch_size = config.data.batch_size + 1
    with pytest.raises(ValueError, match=r"data.batch_size.*config.json"):
        loop.train_and_evaluate(config, str(resumed))
    assert (resumed / "config.json").read_text() == before


def test_resume_notes_a_changed_learning_rate(tfds_dir, tmp_path, capsys):
    """More steps on resume stretch a cosine schedule: the log says how the rate jumps."""
    config = tiny_config(tfds_dir, num_steps=4)
    config.optim.schedule = "cosine"
    loop.train_and_evaluate(config, str(tmp_path / "w"))
    capsys.readouterr()
    config.train.num_steps = 6
    loop.train_and_evaluate(config, str(tmp_path / "w"))
    assert "learning rate at step 4 changes from" in capsys.readouterr().out
    _, schedule = loop.state_lib.make_optimizer(config.optim, 6)
    assert loop._schedule_change(str(tmp_path / "w"), config, 5, schedule) is None  # same run
    assert loop._schedule_change(str(tmp_path / "nowhere"), config, 5, schedule) is None


def test_config_typos_fail_before_training(tfds_dir, tmp_path):
    for field, value, match in (
        ("decoder", "beem", r"eval.decoder must be one of \('greedy', 'beam'\), got 'beem'"),
        ("eval_split", "valdiation", "unknown split 'valdiation'"),
    ):
        config = tiny_config(tfds_dir)
        (config.eval if field == "decoder" else config.data)[field] = value
        with pytest.raises(ValueError, match=match):
            loop.train_and_evaluate(config, str(tmp_path / field))
        assert not os.listdir(tmp_path / field / "checkpoints")  # no step was saved


def test_periodic_validation_takes_utterances_across_the_split(resumed_run, tfds_dir):
    """`data.num_eval_utterances` records spread evenly over the split, not the first batches
    (which the length buckets fill with the shortest utterances)."""
    from jaxspeech.data import sources, tokenizers

    straight = resumed_run[0]
    config = tiny_config(tfds_dir)
    tok = tokenizers.load_tokenizer(straight / "tokenizer")
    full = loop.eval_pipeline(config, "validation", tok)
    part = loop.eval_pipeline(config, "validation", tok, max_utterances=10)
    assert isinstance(part.source, sources.SubsetSource) and len(part.source) == 10
    n = len(full.source)
    assert part.source.indices.tolist() == np.linspace(0, n - 1, 10).round().astype(int).tolist()
    np.testing.assert_array_equal(
        part.lengths.num_samples, full.lengths.num_samples[part.source.indices]
    )
    shortest = np.sort(full.lengths.num_samples)[:10]
    assert part.lengths.num_samples.mean() > shortest.mean()


def test_nonfinite_policies():
    finite = {"finite": 1.0, "loss": 2.0, "grad_norm": 1.0}
    bad = {"finite": 0.0, "loss": float("nan"), "grad_norm": float("nan")}
    history = [(1, finite), (2, bad), (3, bad)]
    assert loop._check_finite(history, "skip") == 2
    assert loop._check_finite(history[:1], "fail") == 0
    ids = {2: ["spk1-utt7", "spk2-utt9", ""]}
    match = "step 2.*spk1-utt7, spk2-utt9 .*nonfinite=skip"
    with pytest.raises(loop.NonFiniteLossError, match=match):
        loop._check_finite(history, "fail", ids)
    with pytest.raises(ValueError, match="unknown train.nonfinite policy 'ignore'"):
        loop._check_finite([], "ignore")


@pytest.mark.slow
def test_incompatible_checkpoint_is_refused(resumed_run, tfds_dir):
    straight = resumed_run[0]
    config = tiny_config(tfds_dir, num_steps=8)
    config.model.d_model = 64
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="d_model: checkpoint 32"):
        loop.train_and_evaluate(config, str(straight))


def test_manifest_with_missing_files(tmp_path, tfds_dir):
    manifest = tmp_path / "train.jsonl"
    manifest.write_text(json.dumps({"audio_filepath": "nowhere/a.wav", "text": "hi"}) + "\n")
    config = tiny_config(tfds_dir)
    config.data.train = f"manifest:{manifest}"
    with pytest.raises(FileNotFoundError, match="nowhere/a.wav"):
        loop.train_and_evaluate(config, str(tmp_path / "work"))
    assert not os.path.exists(tmp_path / "work" / "checkpoints")


def test_workdir_not_writable(tmp_path, tfds_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="cannot write to workdir"):
        loop.train_and_evaluate(tiny_config(tfds_dir), str(blocker / "work"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_workdir_read_only(tmp_path, tfds_dir):
    readonly = tmp_path / "ro"
    readonly.mkdir(mode=0o500)
    with pytest.raises(PermissionError, match="cannot write to workdir"):
        loop.train_and_evaluate(tiny_config(tfds_dir), str(readonly))
