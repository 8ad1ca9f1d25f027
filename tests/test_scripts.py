"""The command-line entry points on a tiny trained workdir: scripts/train.py (subprocess, the real
CLI), then scripts/evaluate.py on a manifest of wav files and scripts/transcribe.py on the files."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from jaxspeech import pyfile
from jaxspeech.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One worker builds the module fixtures (a tiny trained workdir, a QAT run) once (loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("scripts")]


def script(name, folder="scripts"):
    """The module `<folder>/<name>.py` of the repository (scripts and experiment configs)."""
    return pyfile.load(os.path.join(ROOT, folder, f"{name}.py"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tfds_dir = tmp_path_factory.mktemp("tfds")
    workdir = tmp_path_factory.mktemp("run") / "work"
    out = subprocess.run(
        [
            sys.executable,
            "scripts/train.py",
            "--config",
            "experiments/commands_tt.py:tiny",
            "--workdir",
            str(workdir),
            f"--config.data.tfds_data_dir={tfds_dir}",
            "--config.train.num_steps=4",
            "--config.train.eval_every=4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "test WER" in out.stdout + out.stderr
    return workdir, tfds_dir


@pytest.fixture(scope="module")
def wav_manifest(trained, tmp_path_factory):
    _, tfds_dir = trained
    source = sources.open_source("tfds:spoken_commands/tiny:test", data_dir=str(tfds_dir))
    folder = tmp_path_factory.mktemp("wavs")
    lines, paths = [], []
    for i in range(3):
        record = source[i]
        path = folder / f"utt{i}.wav"
        sf.write(path, np.asarray(record["audio"], np.float32), 16000)
        paths.append(str(path))
        lines.append(json.dumps({"audio_filepath": path.name, "text": record["text"]}))
    manifest = folder / "test.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, paths


def test_train_script_wrote_the_workdir(trained):
    workdir, _ = trained
    with open(workdir / "eval.json") as f:
        report = json.load(f)
    assert report["step"] == 4 and report["num_utterances"] == 50 and report["left_out"] == {}
    assert 0.0 <= report["rtf"] and report["wer"] >= 0.0


def test_evaluate_script_on_a_manifest(trained, wav_manifest, capsys):
    workdir, _ = trained
    manifest, _ = wav_manifest
    script("evaluate").main(["--workdir", str(workdir), "--manifest", str(manifest)])
    printed = capsys.readouterr().out
    assert "WER" in printed and "RTF" in printed
    with open(workdir / "eval_test.jsonl_greedy.json") as f:
        report = json.load(f)
    assert report["num_utterances"] == 3
    assert {"substitutions", "deletions", "insertions", "rtf"} <= set(report)


def test_evaluate_reports_what_the_wer_leaves_out(trained, wav_manifest, capsys):
    """A manifest with an unreadable file and an empty transcript: the WER covers the rest, and
    eval.json and the printout count what it left out."""
    workdir, _ = trained
    manifest, _ = wav_manifest
    (manifest.parent / "bad.wav").write_bytes(b"RIFF not really")
    lines = manifest.read_text().splitlines() + [
        json.dumps({"audio_filepath": "bad.wav", "text": "turn on the lights"}),
        json.dumps({"audio_filepath": "utt0.wav", "text": " ?! "}),
    ]
    worse = manifest.parent / "worse.jsonl"
    worse.write_text("\n".join(lines) + "\n")
    script("evaluate").main(["--workdir", str(workdir), "--manifest", str(worse)])
    printed = capsys.readouterr().out
    assert "transcript to score): empty 1, decode_failed 1" in printed
    with open(workdir / "eval_worse.jsonl_greedy.json") as f:
        report = json.load(f)
    assert report["num_utterances"] == 3
    assert report["left_out"] == {"empty": 1, "decode_failed": 1}


def test_transcribe_script(trained, wav_manifest, capsys):
    workdir, _ = trained
    _, paths = wav_manifest
    script("transcribe").main(["--workdir", str(workdir), *paths])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == paths


def test_transcribe_missing_file(trained, tmp_path):
    workdir, _ = trained
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        script("transcribe").main(["--workdir", str(workdir), str(tmp_path / "nope.wav")])


def test_tpu_launch_dry_run():
    script = os.path.join(ROOT, "scripts", "tpu_launch.sh")
    env = dict(os.environ, DRY_RUN="1", PROJECT="proj")
    args = ["train", "my-tpu", "us-east5-a", "experiments/librispeech_tt.py", "gs://b/run"]
    out = subprocess.run(
        ["bash", script, *args, "--config.train.num_steps=5"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("gcloud compute tpus tpu-vm ssh my-tpu --zone us-east5-a --worker=all")
    assert "--project proj" in out
    for word in ("train.py", "--distributed", "gs://b/run", "--config.train.num_steps=5", "nohup"):
        assert word in out.replace("\\", ""), word
    bad = subprocess.run(["bash", script, "deploy", "t", "z"], capture_output=True, text=True)
    assert bad.returncode == 2 and "tpu_launch.sh setup" in bad.stderr


@pytest.fixture(scope="module")
def squashed(trained, tmp_path_factory):
    """experiments/commands_squashed.py:tiny,tanh,2 warm-started from the float `trained` run."""
    from jaxspeech.train import loop

    float_dir, tfds_dir = trained
    config = script("commands_squashed", "experiments").get_config("tiny,tanh,2")
    config.data.tfds_data_dir = str(tfds_dir)
    config.train.init_from = str(float_dir)
    config.train.num_steps = config.train.eval_every = config.train.checkpoint_every = 4
    workdir = tmp_path_factory.mktemp("qat") / "work"
    loop.train_and_evaluate(config, str(workdir))
    return workdir, config


def test_qat_run_warm_starts_from_the_float_model(trained, squashed):
    from jaxspeech.train import evaluate

    float_dir, _ = trained
    workdir, _ = squashed
    assert (workdir / "tokenizer").is_dir()  # copied from the float run
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    assert rows and all(r["quant_regularizer"] > 0 for r in rows)
    fp, qat = evaluate.load_trained(str(float_dir)), evaluate.load_trained(str(workdir))
    w_float = np.asarray(fp.model.encoder.blocks[0].ffn.up.kernel[...])
    w_qat = np.asarray(qat.model.encoder.blocks[0].ffn.up.kernel[...])
    # 2-bit: at most 4 levels per output channel, and close to the float weights it started from
    assert max(np.unique(w_qat[:, j]).size for j in range(w_qat.shape[1])) <= 4
    assert np.corrcoef(w_float.ravel(), w_qat.ravel())[0, 1] > 0.8
    np.testing.assert_array_equal(fp.model.feature_norm.mean[...], qat.model.feature_norm.mean[...])


def test_export_then_artifact_inference_is_exact(squashed, wav_manifest, capsys):
    from jaxspeech.train import evaluate

    workdir, _ = squashed
    _, paths = wav_manifest
    script("export_quantized").main(["--workdir", str(workdir)])
    assert "smaller than float32" in capsys.readouterr().out
    with open(workdir / "export.json") as f:
        report = json.load(f)
    assert report["num_quantized"] >= 10 and report["components"]["encoder"]["ratio"] > 4
    # the artifact's weights are the QAT model's effective weights, bit for bit
    qat = evaluate.load_trained(str(workdir))
    art = evaluate.load_artifact(str(workdir), str(workdir / "model.jxq"))
    got = jax_leaves(evaluate.inference_state(art.model))
    want = jax_leaves(evaluate.inference_state(qat.model))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    # and the transcripts from the artifact are those of the checkpoint
    script("transcribe").main(["--workdir", str(workdir), *paths])
    from_checkpoint = capsys.readouterr().out
    script("transcribe").main(["--workdir", str(workdir), "--artifact", "model.jxq", *paths])
    assert capsys.readouterr().out == from_checkpoint


def jax_leaves(state):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_float_config_refuses_a_qat_checkpoint_and_ptq_export(trained, squashed):
    from jaxspeech.train import checkpoint, loop

    float_dir, _ = trained
    workdir, config = squashed
    float_config = config.copy_and_resolve_references()
    float_config.quant.enabled = False
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="quant"):
        loop.train_and_evaluate(float_config, str(workdir))
    with pytest.raises(ValueError, match="--bits"):
        script("export_quantized").export_workdir(str(float_dir))
    summary = script("export_quantized").export_workdir(
        str(float_dir), str(float_dir / "ptq8.jxq"), bits=8
    )
    assert summary["components"]["encoder"]["ratio"] > 2.5


def test_error_analysis_script(trained, capsys):
    workdir, _ = trained
    script("error_analysis").main(["--workdir", str(workdir), "--max_utterances", "20"])
    assert "variant:" in capsys.readouterr().out
    with open(workdir / "error_analysis_test.json") as f:
        tables = json.load(f)["tables"]
    assert {"accent", "variant", "noise", "snr", "template"} <= set(tables)
    assert sum(row["num_utterances"] for row in tables["variant"].values()) == 20
    with open(workdir / "errors_test.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 20 and {"id", "ref", "hyp", "voice", "snr"} <= set(rows[0])


def test_name_word_errors():
    analysis = script("error_analysis")
    # "jon" substitutes "john", "smith" is deleted, "call" is right; one inserted word is ignored
    assert analysis.name_word_errors("call john smith", "call jon uh", "john smith") == (2, 2, 0, 1)
    assert analysis.snr_band(float("inf")) == "clean" and analysis.snr_band(9.9) == "< 10 dB"


def test_sweep_squashed_tables_and_figures(trained, squashed, tmp_path, capsys):
    import shutil

    float_dir, tfds_dir = trained
    out = tmp_path / "sweep"
    # Both cells are already trained (the fixtures): the sweep only exports, runs post-training
    # quantization of the float model, measures and plots.
    shutil.copytree(float_dir, out / "float")
    shutil.copytree(squashed[0], out / "tanh_2")
    args = ["--tiny", "--base", str(float_dir), "--out", str(out), "--methods", "float,tanh"]
    script("sweep_squashed").main([*args, "--bits", "2", "--tfds_data_dir", str(tfds_dir)])
    assert "squashed tanh" in capsys.readouterr().out
    with open(out / "results.json") as f:
        rows = {r["method"]: r for r in json.load(f)}
    assert set(rows) == {"float", "ptq", "tanh"} and rows["tanh"]["bits"] == 2
    assert 0 < rows["ptq"]["uniformity"] <= 1 and 0 < rows["tanh"]["uniformity"] <= 1
    assert rows["tanh"]["artifact_nbytes"] == os.path.getsize(out / "tanh_2" / "model.jxq")
    for png in ("histograms_2bit.png", "uniformity.png"):
        with open(out / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| squashed tanh | 2 |" in (out / "results.md").read_text()


@pytest.fixture(scope="module")
def arbitrated(trained, tmp_path_factory):
    """experiments/commands_arbitrator.py:tiny,arbitrator,2 warm-started from the `trained` run
    (which has no arbitrator: its parameters are copied, the arbitrator's are new)."""
    from jaxspeech.train import loop

    float_dir, tfds_dir = trained
    config = script("commands_arbitrator", "experiments").get_config("tiny,arbitrator,2")
    config.data.tfds_data_dir = str(tfds_dir)
    config.train.init_from = str(float_dir)
    config.train.num_steps = config.train.eval_every = config.train.checkpoint_every = 4
    workdir = tmp_path_factory.mktemp("arb") / "work"
    loop.train_and_evaluate(config, str(workdir))
    return workdir


def test_arbitrator_run_warm_starts_and_reports_compute(trained, arbitrated):
    from jaxspeech.train import evaluate

    with open(arbitrated / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    assert rows and all(0 < r["compute"] <= 1.1 for r in rows)
    base, arb = evaluate.load_trained(str(trained[0])), evaluate.load_trained(str(arbitrated))
    np.testing.assert_array_equal(base.model.feature_norm.std[...], arb.model.feature_norm.std[...])
    w0 = np.asarray(base.model.encoder.blocks[0].ffn.up.kernel[...])
    w1 = np.asarray(arb.model.encoder.blocks[0].ffn.up.kernel[...])
    assert np.corrcoef(w0.ravel(), w1.ravel())[0, 1] > 0.9  # fine-tuned from, not re-initialized
    assert arb.model.encoder.arbitrator is not None and base.model.encoder.arbitrator is None


def test_sweep_arbitrator_cells_take_variant_options():
    sweep = script("sweep_arbitrator")
    args = sweep.argparse.Namespace(
        weights=[16.0], windows=[1], budgets=[0.4], budget_weight=64.0, options="deep,chunk"
    )
    assert sweep.cells(args) == [
        ("none", "none,deep,chunk", 0.0),
        ("arbitrator_16", "arbitrator,16,deep,chunk", 16.0),
        ("window_1", "window,1,deep,chunk", 1.0),
        ("budget_0.4", "arbitrator,64,budget=0.4,deep,chunk", 0.4),
    ]
    configs = [sweep.experiment().get_config(arg) for _, arg, _ in sweep.cells(args)]
    assert [c.model.num_layers for c in configs] == [8, 8, 8, 8]
    assert [c.model.gate_per_chunk for c in configs] == [False, True, False, True]
    assert [c.model.compute_target for c in configs] == [0.0, 0.0, 0.0, 0.4]


def test_streaming_timings_interleave_the_passes():
    """Baseline and gated passes take turns in every round, so a machine slowing down mid-way
    slows both; each pass reports its best round."""
    import time

    order, slow = [], {"base": [0.03, 0.0, 0.0], "gated": [0.0, 0.02, 0.0]}

    def timed(name):
        def run():
            time.sleep(slow[name][sum(n == name for n in order)])
            order.append(name)

        return run

    best = script("bench_arbitrator").interleaved_seconds(
        {"base": timed("base"), "gated": timed("gated")}, repeats=3
    )
    assert order == ["base", "gated"] * 3
    assert set(best) == {"base", "gated"} and max(best.values()) < 0.02


def test_sweep_arbitrator_tables_and_figures(trained, arbitrated, tmp_path, capsys):
    import shutil

    float_dir, tfds_dir = trained
    out = tmp_path / "sweep"
    # Both cells are trained (the fixtures): the sweep measures compute and streaming wall time.
    shutil.copytree(float_dir, out / "none")
    shutil.copytree(arbitrated, out / "arbitrator_2")
    args = ["--tiny", "--base", str(float_dir), "--out", str(out), "--weights", "2"]
    args += ["--windows", "", "--utterances", "3", "--tfds_data_dir", str(tfds_dir)]
    rows = script("sweep_arbitrator").main(args)
    assert [r["cell"] for r in rows] == ["none", "arbitrator_2"]
    assert rows[0]["compute_gated"] == pytest.approx(1.0)
    assert 0 < rows[1]["compute_gated"] < 1.2 and rows[1]["stream_s"] > 0
    assert "| arbitrator_2 |" in (out / "results.md").read_text()
    for png in ("wer_vs_compute.png", "walltime_vs_compute.png"):
        with open(out / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "arbitrator_2: WER" in capsys.readouterr().out


def test_bench_arbitrator_streams_utterances_in_lock_step(trained, arbitrated):
    """`--streams 2` on 3 utterances (two groups, the last with an empty stream): skipping over
    the pooled frames of both streams gives each utterance the encoder output it gets alone, and
    the bench times every pass."""
    from jaxspeech.train import evaluate

    float_dir, tfds_dir = trained
    bench = script("bench_arbitrator")
    run = evaluate.load_trained(str(arbitrated))
    feats = bench.test_features(run.config, 3, str(tfds_dir))
    alone = bench.stream_pass(run.model, feats, skip=False)(keep=True)
    pooled = bench.stream_pass(run.model, feats, skip=True, streams=2)(keep=True)
    assert len({len(f) for f in feats}) > 1  # the groups mix lengths
    for a, b in zip(alone, pooled, strict=True):
        assert a.shape[0] > 0
        np.testing.assert_allclose(b, a, atol=1e-4)
    row = bench.measure(str(arbitrated), str(float_dir), 3, str(tfds_dir), repeats=1, streams=2)
    assert row["streams"] == 2
    assert min(row["stream_s"], row["masked_stream_s"], row["baseline_stream_s"]) > 0
    # priced per chunk, partly-on chunks count whole: never below the per-frame count (above 1
    # by at most the arbitrator's own cost, as `compute_gated` can be)
    assert row["compute_gated"] <= row["compute_chunks"] < 1.2


def test_export_static_writes_a_plain_workdir(trained, arbitrated, tmp_path):
    """`scripts/export_static.py` on the arbitrated run: the exported workdir loads as a plain
    model (no arbitrator) over the kept layers, and its encoder output equals the gated model's
    run with the static gates it reports; the bench takes it as an ungated model."""
    from jaxspeech.train import evaluate, static_export

    _, tfds_dir = trained
    out = tmp_path / "static"
    args = ["--workdir", str(arbitrated), "--out", str(out), "--utterances", "4"]
    report = script("export_static").main(
        args + ["--threshold", "0.3", "--tfds_data_dir", str(tfds_dir)]
    )
    gated, plain = evaluate.load_trained(str(arbitrated)), evaluate.load_trained(str(out))
    assert plain.step == gated.step and plain.model.encoder.arbitrator is None
    assert plain.model.cfg.num_layers == len(report["layers"]) > 0
    assert (out / "static_export.json").exists() and 0 < report["agreement"] <= 1
    rates = {("attention", i): r for i, r in enumerate(report["attn_on"])}
    rates.update({("ffn", i): r for i, r in enumerate(report["ffn_on"])})
    partial = {(p["component"], p["layer"]): p["on"] for p in report["partial"]}
    assert partial == {k: r for k, r in rates.items() if 0.01 < r < 0.99}
    choice = static_export.StaticChoice(
        tuple(report["attn"]), tuple(report["ffn"]), (), (), report["agreement"]
    )
    feats = script("bench_arbitrator").test_features(gated.config, 2, str(tfds_dir))
    x, lengths = script("bench_arbitrator").padded(feats, 16)
    for m in (gated.model, plain.model):
        m.eval()
    got, enc_lengths, _ = plain.model.encode_with_trace(x, lengths)
    gates = static_export.static_gates(choice, enc_lengths, got.shape[1])
    want, _, _ = gated.model.encode_with_trace(x, lengths, attn_gates=gates[0], ffn_gates=gates[1])
    valid = (np.arange(got.shape[1])[None] < np.asarray(enc_lengths)[:, None])[..., None]
    np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=1e-5)
    with pytest.raises(FileExistsError, match="new --out"):
        script("export_static").main(args + ["--tfds_data_dir", str(tfds_dir)])


def test_bench_arbitrator_component_costs():
    """Attention and feed-forward timed apart (static pruning of a random model); the FLOP
    ratio against a count by hand of the chunked context."""
    from jaxspeech.models.attention import chunk_mask

    bench = script("stream_costs")
    config = "experiments/commands_arbitrator.py:none,tiny"
    out = bench.component_costs(config, streams=2, utterances=2, seconds=1.0, repeats=1)
    assert set(out["seconds"]) == {"all", "attention", "ffn", "none"}
    assert min(out["seconds"].values()) > 0
    cfg = bench.config_model(config).cfg
    n = 100 // cfg.subsampling_factor
    pairs = int(chunk_mask(n, cfg.chunk_size, cfg.left_chunks, cfg.lookahead_chunks).sum())
    attention = 8 * cfg.d_model**2 * n + 4 * cfg.d_model * pairs
    assert out["flop_ratio"] == pytest.approx(attention / (4 * cfg.d_model * cfg.mlp_dim * n))
    assert out["attention_cost"] == pytest.approx(out["time_ratio"] / out["flop_ratio"])


def test_bench_arbitrator_frame_costs():
    """Gates on k frames of each chunk: the pattern is applied (k = 4 and 8 give different
    encodings), skipping equals the masked computation for it, and the per-chunk share is
    fitted from the timed passes."""
    bench = script("stream_costs")
    config = "experiments/commands_arbitrator.py:arbitrator,tiny"
    model = bench.config_model(config, arbitrator="acoustic")
    feats = [np.random.default_rng(1).normal(size=(90, model.cfg.num_mels)).astype(np.float32)]
    enc = {
        (k, skip): bench.frame_pattern_pass(model, feats, k, skip=skip)(keep=True)[0]
        for k in (4, 8)
        for skip in (True, False)
    }
    np.testing.assert_allclose(enc[4, True], enc[4, False], atol=1e-5)
    assert np.abs(enc[4, True] - enc[8, True]).max() > 1e-3
    out = bench.frame_costs(config, streams=1, utterances=1, seconds=1.0, repeats=1)
    assert set(out["seconds"]) == {"ungated", "0", "1", "2", "4", "8"}
    assert min(out["seconds"].values()) > 0 and np.isfinite(out["chunk_share"])


def _errors_file(path, hyps, refs):
    with open(path, "w") as f:
        for i, (ref, hyp) in enumerate(zip(refs, hyps, strict=True)):
            f.write(json.dumps({"id": f"u{i}", "ref": ref, "hyp": hyp}) + "\n")


def test_compare_wer_matched_pairs_bootstrap(tmp_path, trained, capsys):
    cw = script("compare_wer")
    rng = np.random.default_rng(0)
    refs = [" ".join(rng.choice(["on", "off", "lights", "kitchen"], 5)) for _ in range(200)]
    worse = [r.replace("on", "of", 1) if i % 3 == 0 else r for i, r in enumerate(refs)]
    _errors_file(tmp_path / "a.jsonl", worse, refs)
    _errors_file(tmp_path / "b.jsonl", refs, refs)  # B: perfect where A errs
    a, b = (cw.utterance_errors(str(tmp_path / f"{k}.jsonl")) for k in "ab")
    errors_a = sum(e for e, _ in a.values())
    assert errors_a == sum(w != r for w, r in zip(worse, refs, strict=True)) > 0
    row = cw.bootstrap(cw.paired(a, b, ("a", "b")), samples=500)
    assert row["words"] == 1000 and row["wer_a"] == errors_a / 1000 and row["wer_b"] == 0
    assert row["relative"] == -1 and row["interval"] == [-1, -1] and row["b_better"] == 1
    same = cw.bootstrap(cw.paired(a, a, ("a", "a")), samples=500)
    assert same["relative"] == 0 and same["interval"] == [0, 0] and same["b_better"] == 0
    # Half of A's errors fixed at random: the interval holds the truth and narrows as 1/sqrt(N).
    half = [w if (i % 6 == 0) else r for i, (w, r) in enumerate(zip(worse, refs, strict=True))]
    _errors_file(tmp_path / "c.jsonl", half, refs)
    c = cw.utterance_errors(str(tmp_path / "c.jsonl"))
    row = cw.bootstrap(cw.paired(a, c, ("a", "c")), samples=2000)
    lo, hi = row["interval"]
    assert lo < row["relative"] < hi < 0
    big = lambda d: {f"{k}_{r}": v for k, v in d.items() for r in range(4)}  # noqa: E731
    wide = cw.bootstrap(cw.paired(big(a), big(c), ("a", "c")), samples=2000)["interval"]
    assert 0.35 < (wide[1] - wide[0]) / (hi - lo) < 0.65
    with pytest.raises(ValueError, match="different utterances"):
        cw.paired(a, {**c, "extra": (0, 1)}, ("a", "c"))
    # On a real run: decodes the split once (error_analysis), then compares it with itself.
    rows = cw.main(["--a", str(trained[0]), "--b", str(trained[0]), "--samples", "100"])
    assert rows[0]["relative"] == 0 and rows[0]["utterances"] > 0
    assert "| 95% interval |" in capsys.readouterr().out


def test_compare_wer_with_few_errors(tmp_path):
    """Resamples where neither run errs count as no difference, not NaN: the interval of a
    low-WER comparison stays finite."""
    cw = script("compare_wer")
    assert cw.relative(0, 0) == 0 and cw.relative(1, 0) == np.inf and cw.relative(3, 4) == -0.25
    refs = ["turn on the lights"] * 200
    _errors_file(
        tmp_path / "a.jsonl",
        ["turn on the light" if i < 3 else r for i, r in enumerate(refs)],
        refs,
    )
    _errors_file(
        tmp_path / "b.jsonl",
        ["turn of the lights" if i < 2 else r for i, r in enumerate(refs)],
        refs,
    )
    a, b = (cw.utterance_errors(str(tmp_path / f"{k}.jsonl")) for k in "ab")
    row = cw.bootstrap(cw.paired(a, b, ("a", "b")), samples=2000)
    lo, hi = row["interval"]
    assert row["relative"] == pytest.approx(-1 / 3) and np.isfinite(lo) and lo <= row["relative"]


def test_compare_wer_pooled_over_seeds(tmp_path, capsys):
    cw = script("compare_wer")
    rng = np.random.default_rng(1)
    refs = [" ".join(rng.choice(["on", "off", "lights", "kitchen"], 4)) for _ in range(120)]

    def run(name, every):  # errs on every `every`-th utterance; gzipped like the archives
        with gzip.open(tmp_path / f"{name}.jsonl.gz", "wt") as f:
            for i, ref in enumerate(refs):
                hyp = "on" if i % every == 0 else ref
                f.write(json.dumps({"id": f"u{i}", "ref": ref, "hyp": hyp}) + "\n")
        return str(tmp_path / f"{name}.jsonl.gz")

    pairs = [(run("a0", 3), run("b0", 4)), (run("a1", 5), run("b1", 4))]  # B better, then worse
    counts = [cw.paired(*(cw.errors_of(r, "test") for r in p), p) for p in pairs]
    one = cw.pooled(counts[:1], samples=300)
    alone = cw.bootstrap(counts[0], samples=300)
    assert one["relative"] == alone["relative"] and one["interval"] == alone["interval"]
    assert one["t_interval"] is None and one["per_pair"] == [alone["relative"]]
    both = cw.pooled(counts, samples=300)
    errs = [c.sum(axis=0) for c in counts]
    assert both["relative"] == pytest.approx(
        (errs[0][1] + errs[1][1]) / (errs[0][0] + errs[1][0]) - 1
    )
    assert both["wer_a"] == pytest.approx((errs[0][0] + errs[1][0]) / 2 / errs[0][2])
    r = [e[1] / e[0] - 1 for e in errs]
    assert r[0] < 0 < r[1] and both["per_pair"] == pytest.approx(r)
    half = 12.7062 * abs(r[0] - r[1]) / 2  # t(0.975, 1 df) * sd / sqrt(2), sd = |r0 - r1| / sqrt(2)
    assert both["t_interval"] == pytest.approx([np.mean(r) - half, np.mean(r) + half], rel=1e-4)
    lo, hi = both["interval"]
    assert lo < both["relative"] < hi and hi - lo < both["t_interval"][1] - both["t_interval"][0]
    with pytest.raises(ValueError, match="different utterances"):
        cw.pooled([counts[0], counts[1][:-1]], samples=10)
    (a0, b0), (a1, b1) = pairs
    rows = cw.main(["--pooled", "--a", a0, a1, "--b", b0, b1, "--samples", "300"])
    assert len(rows) == 3 and rows[-1]["relative"] == both["relative"]
    assert "Student-t 95% interval over the pairs" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cw.main(["--pooled", "--a", a0, "--b", b0, b1])


def test_gate_analysis_frame_classes():
    ga = script("gate_analysis")
    hops = np.array([0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0], bool)
    speech = ga.speech_frames(hops, 2, 7)  # the last frame is beyond the audio
    np.testing.assert_array_equal(speech, [0, 1, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(ga.frame_classes(speech), [1, 0, 0, 2, 0, 3, 3])
    clean = np.concatenate([np.zeros(320), np.ones(160), 1e-3 * np.ones(160)])
    np.testing.assert_array_equal(ga.speech_hops(clean, 160), [0, 0, 1, 0])  # -60 dB: not speech
    clean[480:] = 0.03  # -30 dB: speech
    np.testing.assert_array_equal(ga.speech_hops(clean, 160), [0, 0, 1, 1])


def test_gate_analysis_script(arbitrated, trained, tmp_path, capsys):
    ga = script("gate_analysis")
    _, tfds_dir = trained
    out = tmp_path / "ga"
    report = ga.main(
        [
            "--workdir",
            str(arbitrated),
            "--utterances",
            "6",
            "--tfds_data_dir",
            str(tfds_dir),
            "--out",
            str(out),
        ]
    )
    share = report["frame_share"]
    assert sum(share.values()) == pytest.approx(1.0) and share["speech"] > 0.5
    # The per-class on-rates, weighted by the classes' shares, are the bench's per-layer rates.
    from jaxspeech.train import evaluate

    bench = script("bench_arbitrator")
    run = evaluate.load_trained(str(arbitrated))
    feats = bench.test_features(run.config, 6, str(tfds_dir))
    totals = bench.executed_flops(run.model, feats)
    for comp, key in (("attention", "attn_on"), ("ffn", "ffn_on")):
        rates = np.array([report["on_rate"][comp][c] for c in ga.CLASSES])  # [class, layer]
        weights = np.array([share[c] for c in ga.CLASSES])
        np.testing.assert_allclose(weights @ rates, totals[key], atol=1e-3)
    off = report["off"]
    assert off["all"] == pytest.approx(off["static"] + off["input_dependent"])
    assert off["all"] == pytest.approx(1 - np.mean(totals["attn_on"] + totals["ffn_on"]), abs=1e-3)
    assert len(report["utterances"]) == 6 and all(
        0 < u["compute"] <= 1 for u in report["utterances"]
    )
    assert "| attention 0 |" in (out / "gate_analysis.md").read_text()
    with open(out / "gates.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # A record whose audio is not what the corpus synthesizes is refused, by id.
    source = sources.open_source("tfds:spoken_commands/tiny:test", data_dir=str(tfds_dir))
    record = dict(source[0])
    record["audio"] = np.asarray(record["audio"]) * 0.5
    with pytest.raises(ValueError, match=record["id"]):
        ga.clean_speech("tfds:spoken_commands/tiny:test", [record])


def test_profile_stream_op_times():
    """One traced streaming pass of a tiny random model: its XLA ops are read back per chunk,
    the matmuls among them (one per projection and layer at least)."""
    per_chunk = script("profile_stream").main(
        ["--config", "experiments/commands_arbitrator.py:none,tiny", "--chunks", "3", "--top", "3"]
    )
    assert per_chunk and all(t >= 0 and c > 0 for t, c in per_chunk.values())
    assert sum(c for _, c in per_chunk.values()) >= 6
