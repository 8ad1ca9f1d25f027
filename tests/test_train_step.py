"""The jitted train step on the tiny config: one real step, loss goes down on a fixed batch, and
one CPU device vs 8 simulated devices (data x fsdp x tensor = 2 x 2 x 2) give the same losses."""

import json
import os
import subprocess
import sys

import jax
import localhost_processes  # tests/localhost_processes.py
import numpy as np
import pytest

from jaxspeech import features, pyfile
from jaxspeech.train import distributed, loop, sharding
from jaxspeech.train import state as state_lib
from jaxspeech.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 30
VOCAB = 20


def tiny_config():
    return pyfile.load(os.path.join(ROOT, "experiments", "commands_tt.py")).get_config("tiny")


def fixed_batch():
    rng = np.random.default_rng(0)
    lengths = np.array([16000, 12000, 8000, 16000, 9000, 10000, 15000, 0], np.int32)
    audio = 0.1 * rng.standard_normal((8, 16000)).astype(np.float32)
    audio[np.arange(16000)[None, :] >= lengths[:, None]] = 0.0
    label_lengths = np.array([8, 5, 3, 8, 4, 6, 7, 0], np.int32)
    labels = rng.integers(1, VOCAB, (8, 8)).astype(np.int32)
    labels[np.arange(8)[None, :] >= label_lengths[:, None]] = 0
    return {
        "audio": audio,
        "audio_lengths": lengths,
        "labels": labels,
        "label_lengths": label_lengths,
    }


def run_steps(mesh_sizes=(1, 1, 1), num_steps=NUM_STEPS):
    """Trains `num_steps` steps on the fixed batch; returns (losses, grad norms, final state)."""
    config = tiny_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_sizes
    mesh, rules = sharding.make_mesh(config.mesh), sharding.axis_rules(config.mesh)
    model_cfg = state_lib.model_config(config.model, vocab_size=VOCAB)
    tx, schedule = state_lib.make_optimizer(config.optim, num_steps)
    graphdef, state, shardings = state_lib.create_train_state(model_cfg, tx, mesh, rules)
    bsharding = sharding.batch_sharding(mesh, rules)
    train_step = step_lib.make_train_step(
        graphdef,
        tx,
        schedule,
        feature_cfg=features.FeatureConfig(),
        state_shardings=shardings,
        batch_sharding=bsharding,
    )
    batch = fixed_batch()
    if jax.process_count() > 1:  # this process's rows of the global batch (its devices' shards)
        rows = len(batch["audio"]) // jax.process_count()
        start = jax.process_index() * rows
        batch = {k: v[start : start + rows] for k, v in batch.items()}
    metrics = []
    with jax.set_mesh(mesh):
        for _ in range(num_steps):
            state, m = train_step(state, sharding.shard_batch(batch, bsharding))
            metrics.append(m)
    metrics = jax.device_get(metrics)
    return (
        [float(m["loss"]) for m in metrics],
        [float(m["grad_norm"]) for m in metrics],
        state,
        shardings,
        (mesh, train_step, bsharding),
    )


@pytest.fixture(scope="module")
def one_device_run():
    return run_steps()


@pytest.mark.slow  # ~30 s on 2 busy CPU cores, nearly all of it compiling init + step
def test_train_step_runs_and_loss_decreases(one_device_run):
    losses, grad_norms, state, _, _ = one_device_run
    assert int(state["step"]) == NUM_STEPS
    assert all(np.isfinite(losses)) and all(np.isfinite(grad_norms))
    assert losses[-1] < 0.5 * losses[0], losses


def test_state_is_sharded_by_the_rules():
    config = tiny_config()
    rules = sharding.axis_rules(config.mesh)
    assert sharding.logical_to_mesh(("embed", "mlp"), rules) == jax.P("fsdp", "tensor")
    assert sharding.logical_to_mesh(("batch", "frames"), rules) == jax.P(("data", "fsdp"), None)
    assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)


@pytest.mark.slow
def test_nonfinite_loss_keeps_state_and_fails_fast(one_device_run):
    _, _, state, _, (mesh, train_step, bsharding) = one_device_run
    batch = fixed_batch()
    batch["audio"][0, 100] = np.nan
    before = jax.device_get(state["params"])
    step = int(state["step"])
    with jax.set_mesh(mesh):
        state, metrics = train_step(state, sharding.shard_batch(batch, bsharding))
    metrics = jax.device_get(metrics)
    assert metrics["finite"] == 0.0 and not np.isfinite(metrics["loss"])
    assert int(state["step"]) == step + 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), before)
    with pytest.raises(loop.NonFiniteLossError, match=f"non-finite loss at step {step + 1}"):
        loop._check_finite([(step, {"finite": 1.0}), (step + 1, metrics)], "fail")


@pytest.mark.slow
def test_one_vs_eight_devices_same_losses(one_device_run):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    out = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["num_devices"] == 8
    assert any(s != "PartitionSpec()" for s in result["param_specs"]), result["param_specs"]
    np.testing.assert_allclose(result["losses"], one_device_run[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_two_processes_same_losses_as_one(one_device_run):
    """2 processes x 4 CPU devices (gloo collectives over localhost) == 1 process x 1 device."""
    lines = localhost_processes.run_processes(__file__, 2, devices=4)
    results = [json.loads(line) for line in lines]
    assert [r["num_processes"] for r in results] == [2, 2]
    assert results[0]["num_devices"] == 8 and results[0]["local_devices"] == 4
    np.testing.assert_allclose(results[0]["losses"], one_device_run[0], rtol=1e-5, atol=1e-5)
    assert results[0]["losses"] == results[1]["losses"]


if __name__ == "__main__":  # the 8-device halves of the tests above, in their own processes
    if len(sys.argv) == 4:  # coordinator, number of processes, process id
        distributed.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    losses, _, state, shardings, _ = run_steps(mesh_sizes=(2, 2, 2))
    specs = sorted({str(s.spec) for s in jax.tree.leaves(shardings["params"])})
    print(
        json.dumps(
            {
                "num_devices": jax.device_count(),
                "local_devices": jax.local_device_count(),
                "num_processes": jax.process_count(),
                "losses": losses,
                "param_specs": specs,
            }
        )
    )
