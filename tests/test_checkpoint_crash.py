"""Crash safety and resharding of checkpoints.

* A process killed with SIGKILL while an asynchronous save is being written leaves nothing that a
  resume would trust: `latest_step()` is the last complete checkpoint, which restores intact.
* A checkpoint saved from 8 devices (sharded over data x fsdp x tensor) restores on 1 device and
  the other way round (each half runs in its own process, since the device count is fixed at start).
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxspeech.train import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = 64 * 2**20  # float32 elements per array of the save that gets killed (256 MiB)


def _state(value: float, n: int):
    return {"step": np.int32(value), "params": {"w": np.full((n,), value, np.float32)}}


def _writer(workdir: str) -> None:
    """Child: a complete save of step 1, then an async save of step 2 killed while it writes."""
    ckpt = checkpoint.Checkpointer(workdir, keep=3)
    ckpt.save(1, jax.device_put(_state(1.0, 1024)), model={"ok": 1})
    ckpt.wait()
    ckpt.save(
        2,
        jax.device_put(
            {
                "step": np.int32(2),
                "params": {"w": np.ones((BIG,), np.float32), "v": np.ones((BIG,), np.float32)},
            }
        ),
    )
    print("saving", flush=True)
    time.sleep(60)  # the parent kills us long before this ends


@pytest.mark.slow
def test_sigkill_during_async_save_leaves_last_complete_checkpoint(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, __file__, "writer", str(tmp_path)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "saving"
    ckpt_dir = tmp_path / "checkpoints"
    deadline = time.time() + 30
    while time.time() < deadline and not any("tmp" in p.name for p in ckpt_dir.iterdir()):
        time.sleep(0.01)
    assert any("tmp" in p.name for p in ckpt_dir.iterdir()), list(ckpt_dir.iterdir())
    proc.send_signal(signal.SIGKILL)  # mid-write: the temporary step-2 directory exists
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
    assert ckpt.latest_step() == 1
    state, _ = ckpt.restore(jax.device_put(_state(0.0, 1024)))
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.ones(1024, np.float32))
    assert int(state["step"]) == 1
    ckpt.close()


def _reshard(workdir: str, action: str) -> None:
    """Child: save a (2, 2, 2)-sharded train state, or restore one onto this process's devices."""
    from test_train_step import VOCAB, tiny_config

    from jaxspeech.train import sharding
    from jaxspeech.train import state as state_lib

    config = tiny_config()
    if jax.device_count() == 8:
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    mesh, rules = sharding.make_mesh(config.mesh), sharding.axis_rules(config.mesh)
    model_cfg = state_lib.model_config(config.model, vocab_size=VOCAB)
    tx, _ = state_lib.make_optimizer(config.optim, 10)
    ckpt = checkpoint.Checkpointer(workdir)
    if action == "save":
        _, state, _ = state_lib.create_train_state(model_cfg, tx, mesh, rules, seed=3)
        ckpt.save(7, state)
    else:
        _, abstract, _ = state_lib.abstract_train_state(model_cfg, tx, mesh, rules, seed=0)
        state, _ = ckpt.restore(abstract, 7)
    ckpt.close()
    leaves = jax.tree.leaves(jax.device_get(state["params"]))
    specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state["params"])})
    print(json.dumps({"sums": [float(np.sum(x)) for x in leaves], "specs": specs}))


def _run(workdir, action, devices):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=os.path.join(ROOT, "tests"),
    )
    out = subprocess.run(
        [sys.executable, __file__, action, str(workdir)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("save_devices,restore_devices", [(8, 1), (1, 8)])
def test_restore_on_a_different_number_of_devices(tmp_path, save_devices, restore_devices):
    saved = _run(tmp_path, "save", save_devices)
    restored = _run(tmp_path, "restore", restore_devices)
    assert restored["sums"] == saved["sums"]
    sharded = [
        s for s in (saved, restored)[restore_devices == 8]["specs"] if s != "PartitionSpec()"
    ]
    assert sharded  # the 8-device side really is sharded


if __name__ == "__main__":
    if sys.argv[1] == "writer":
        _writer(sys.argv[2])
    else:
        _reshard(sys.argv[2], sys.argv[1])
