"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from flags or the environment.

One process per host (TPU VM worker, GPU node), every process running the same command:

  * TPU VM slices, SLURM, Open MPI: `initialize(auto=True)`; JAX finds the coordinator, the
    process count and this process's id from the environment;
  * anything else (several GPU boxes, processes on one machine): give them explicitly, or set
    `JAXSPEECH_COORDINATOR` (host:port of process 0), `JAXSPEECH_NUM_PROCESSES` and
    `JAXSPEECH_PROCESS_ID`.

On CPU the collectives between processes go over gloo (TCP), so a multi-process run works on one
machine with no accelerator (tests/test_train_step.py runs 2 processes x 4 CPU devices).
After start-up each process sees every device in `jax.devices()` and its own in
`jax.local_devices()`; the input pipeline reads the shard `jax.process_index()` of
`jax.process_count()` and metrics are written by process 0.
"""

from __future__ import annotations

import os

import jax

ENV = ("JAXSPEECH_COORDINATOR", "JAXSPEECH_NUM_PROCESSES", "JAXSPEECH_PROCESS_ID")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Starts JAX's distributed runtime if asked to; returns whether it did.

    Explicit arguments win over `JAXSPEECH_*` variables; with neither and `auto=False` this is a
    single-process run and nothing happens. Call it before anything touches a JAX device.
    """
    env = [os.environ.get(k) for k in ENV]
    coordinator_address = coordinator_address or env[0]
    if num_processes is None and env[1]:
        num_processes = int(env[1])
    if process_id is None and env[2]:
        process_id = int(env[2])
    explicit = (coordinator_address, num_processes, process_id)
    if not auto and all(v is None for v in explicit):
        return False
    if not auto and any(v is None for v in explicit):
        raise ValueError(
            "multi-process start-up needs all of coordinator address, number of processes and "
            f"process id (flags or {', '.join(ENV)}); got {explicit}"
        )
    # Collectives between the CPU devices of different processes (used only by the CPU backend).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
