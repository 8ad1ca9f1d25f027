r"""Trains a transducer; rerunning the same command resumes from the latest checkpoint.

  python scripts/train.py --config experiments/commands_tt.py:tiny --workdir /tmp/commands_tiny
  python scripts/train.py --config experiments/commands_tt.py --workdir runs/commands_tt \
      --config.train.num_steps=3000

Multi-host (one process per host, the same command on every host): `--distributed` on TPU VM
slices, SLURM or Open MPI (JAX reads the environment), or `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` (see jaxspeech/train/distributed.py and TPU_SETUP.md).
On SIGTERM (a preempted VM) it writes a checkpoint, prints where, and exits 0; rerun to resume.

The logic lives in `jaxspeech.train.loop.train_and_evaluate`, callable from a notebook.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jaxspeech.train import distributed, loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python config file[:variant].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, eval.json.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-process run; coordinator and ids from the environment."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0..N-1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # TFDS / Orbax info lines would bury the progress bar
    distributed.initialize(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_DISTRIBUTED.value
    )
    report = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if report.get("preempted"):
        print(f"stopped at step {report['step']} on SIGTERM; rerun the same command to resume")


if __name__ == "__main__":
    app.run(main)
