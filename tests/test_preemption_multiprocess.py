"""Preemption across processes: SIGTERM reaches one of two processes (CPU, gloo collectives), and
both stop at the same step through `loop.Preemption` (JAX's preemption sync point), so that every
process writes the same checkpoint. The Python handler is not installed there: it would replace
JAX's preemption notifier."""

import os
import signal
import sys
import time

import localhost_processes  # tests/localhost_processes.py
import pytest


def _child(coordinator: str, num_processes: int, process_id: int) -> None:
    from jaxspeech.train import distributed

    distributed.initialize(coordinator, num_processes, process_id)
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
    stops = localhost_processes.run_processes(__file__, 2, timeout=300)
    assert stops[0] == stops[1] and stops[0].startswith("stop "), stops
    assert int(stops[0].split()[1]) >= 20


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
