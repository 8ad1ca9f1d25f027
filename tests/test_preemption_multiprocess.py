"""Preemption across processes: SIGTERM reaches one of two processes (CPU, gloo collectives), and
both stop at the same step through `loop.Preemption` (JAX's preemption sync point), so that every
process writes the same checkpoint. The Python handler is not installed there: it would replace
JAX's preemption notifier."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(coordinator: str, process_id: int) -> None:
    from jaxspeech.train import distributed

    distributed.initialize(coordinator, 2, process_id)
    import jax
    from jax.experimental import multihost_utils

    from jaxspeech.train.loop import Preemption

    with Preemption() as preemption:
        for step in range(1, 1000):
            if step == 20 and jax.process_index() == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # only this process is "preempted"
            multihost_utils.sync_global_devices(f"step {step}")  # a collective, as a train step
            if preemption.should_stop(step):
                print(f"stop {step}", flush=True)
                return
            time.sleep(0.01)
    print("never stopped", flush=True)


@pytest.mark.slow
def test_sigterm_on_one_process_stops_both_at_the_same_step():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, f"localhost:{port}", str(i)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    stops = [out.strip().splitlines()[-1] for out, _ in outs]
    assert stops[0] == stops[1] and stops[0].startswith("stop "), stops
    assert int(stops[0].split()[1]) >= 20


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]))
