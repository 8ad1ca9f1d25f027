"""The benchmark scripts run end to end on small shapes (their figures are in
experiments/RESULTS.md; here only that they run and print what they promise)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_bench_rnnt_quick():
    out = run("scripts/bench_rnnt.py", "--quick", "--reps", "1", "--no-bf16")
    for text in ("rnnt_loss/membound", "rnnt_loss/naive", "fused/materialized", "ratio 1/"):
        assert text in out, out
    out = run("scripts/bench_rnnt.py", "--shape", "2,24,6,16,8", "--reps", "1")
    assert "fused joint+loss gradient step" in out, out


def test_bench_decode_tiny():
    out = run(
        "scripts/bench_decode.py",
        "--config",
        "experiments/commands_tt.py:tiny",
        "--batch_size",
        "2",
        "--seconds",
        "1",
        "--reps",
        "1",
    )
    report = json.loads(out[out.index("{") :])
    assert set(report["ms"]) == {"encoder", "greedy", "beam", "stream_step_b2", "stream_step_b1"}
    assert all(v > 0 for v in report["rtf"].values())
