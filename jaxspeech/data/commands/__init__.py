"""jaxspeech.data.commands: the offline spoken-commands corpus (espeak-ng, synthesized locally).

Importing this package registers the TFDS builder `spoken_commands` (configs `tiny`, `default`).

    import tensorflow_datasets as tfds
    import jaxspeech.data.commands
    tfds.builder("spoken_commands/tiny", data_dir=d).download_and_prepare()
    ds = tfds.data_source("spoken_commands/tiny", split="train", data_dir=d)

Neither call imports TensorFlow (array_record files; TFDS 4.9.10 writes them without TF). Older
TFDS versions may need it to build: `pip install -e .[build]`.

Modules: `grammar` (utterance text and context lists), `tts` (espeak-ng via ctypes, voices),
`augment` (difficulty knobs, speed perturbation, noise at an SNR), `builder` (the TFDS builder).
"""

from jaxspeech.data.commands.augment import Difficulty
from jaxspeech.data.commands.builder import (
    CONFIGS,
    SpokenCommands,
    SpokenCommandsConfig,
    render_example,
    to_record,
)

__all__ = [
    "CONFIGS",
    "Difficulty",
    "SpokenCommands",
    "SpokenCommandsConfig",
    "render_example",
    "to_record",
]
