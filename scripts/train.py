r"""Trains a transducer; rerunning the same command resumes from the latest checkpoint.

  python scripts/train.py --config experiments/commands_tt.py:tiny --workdir /tmp/commands_tiny
  python scripts/train.py --config experiments/commands_tt.py --workdir runs/commands_tt \
      --config.train.num_steps=3000

The logic lives in `jaxspeech.train.loop.train_and_evaluate`, callable from a notebook.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jaxspeech.train import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python config file[:variant].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, eval.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # TFDS / Orbax info lines would bury the progress bar
    loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
