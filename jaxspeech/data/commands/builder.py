"""TFDS builder `spoken_commands`: the offline spoken-commands corpus.

Build (needs TensorFlow, e.g. `pip install jaxspeech[build]`):
    python scripts/build_corpus.py --config default --data_dir ~/tensorflow_datasets
Read (no TensorFlow needed; array_record files):
    import jaxspeech.data.commands  # registers the builder
    ds = tfds.data_source("spoken_commands/default", split="train", data_dir=...)
    example = ds[0]  # dict: id, audio (int16 [N] at 16 kHz), text, voice, snr, noise, context, ...

Each example is `render_example(split, index, seed, difficulty)`: a pure function of its arguments,
computed in worker processes (one espeak engine each) and identical however the work is scheduled.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxspeech.data.commands import augment, grammar, tts

SAMPLE_RATE = augment.SAMPLE_RATE
DEFAULT_DIFFICULTY = augment.Difficulty()
_BABBLE_POOL_SIZE = 32
_BABBLE_SALT = 0x5BD1E995


@dataclasses.dataclass
class SpokenCommandsConfig(tfds.core.BuilderConfig):
    """Sizes (utterances per split), the base seed, build workers and the difficulty knobs."""

    num_train: int = 0
    num_validation: int = 0
    num_test: int = 0
    seed: int = 0
    num_workers: int = 2
    difficulty: augment.Difficulty = DEFAULT_DIFFICULTY


CONFIGS = (
    SpokenCommandsConfig(
        name="tiny",
        description="A few hundred utterances; builds in seconds (tests, demos).",
        num_train=200,
        num_validation=50,
        num_test=50,
        num_workers=1,
    ),
    SpokenCommandsConfig(
        name="default",
        description="~10.5 h train, ~1 h validation and ~1 h test.",
        num_train=15000,
        num_validation=1400,
        num_test=1400,
        num_workers=2,
    ),
)


@functools.lru_cache(maxsize=4)
def babble_pool(split: str, seed: int, difficulty: augment.Difficulty) -> list[np.ndarray]:
    """Clean 16 kHz utterances (the split's own voices) that babble noise is made from."""
    eng = tts.engine()
    split_voices = tts.voices(split)
    pool = []
    for i in range(_BABBLE_POOL_SIZE):
        utt = grammar.make_utterance(split, i, seed ^ _BABBLE_SALT)
        rng = np.random.default_rng([seed, grammar.split_code(split), i, _BABBLE_SALT])
        raw = eng.synthesize(
            utt.text,
            split_voices[int(rng.integers(len(split_voices)))],
            rate=int(rng.integers(*difficulty.rate_wpm)),
            pitch=int(rng.integers(*difficulty.pitch)),
            seed=int(rng.integers(2**31)),
        )
        pool.append(augment.resample_with_speed(raw, tts.NATIVE_RATE, 1.0))
    return pool


def render_example(
    split: str,
    index: int,
    seed: int,
    difficulty: augment.Difficulty = DEFAULT_DIFFICULTY,
    return_clean: bool = False,
) -> dict:
    """The `index`-th example of `split` as a TFDS feature dict (deterministic).

    With `return_clean`, also returns the 16 kHz float speech before noise (key `clean`).
    """
    utt = grammar.make_utterance(split, index, seed)
    rng = np.random.default_rng([seed, grammar.split_code(split), index, 0x617564])
    split_voices = tts.voices(split)
    voice = split_voices[int(rng.integers(len(split_voices)))]
    d = difficulty
    raw = tts.engine().synthesize(
        utt.text,
        voice,
        rate=int(rng.integers(d.rate_wpm[0], d.rate_wpm[1] + 1)),
        pitch=int(rng.integers(d.pitch[0], d.pitch[1] + 1)),
        pitch_range=int(rng.integers(d.pitch_range[0], d.pitch_range[1] + 1)),
        seed=int(rng.integers(2**31)),
    )
    pool = babble_pool(split, seed, difficulty) if d.clean_fraction < 1.0 else []
    audio, clean, snr, kind = augment.perturb_and_mix(raw, tts.NATIVE_RATE, rng, d, pool)
    example = {
        "id": f"{split}-{index:07d}",
        "audio": audio,
        "text": utt.text,
        "voice": voice,
        "snr": np.float32(snr),
        "noise": kind,
        "context": list(utt.context),
        "name": utt.name,
        "template": utt.template,
    }
    if return_clean:
        example["clean"] = clean
    return example


def _render_keyed(index: int, split: str, seed: int, difficulty: augment.Difficulty):
    return index, render_example(split, index, seed, difficulty)


def render_many(
    split: str, count: int, seed: int, difficulty: augment.Difficulty, num_workers: int
):
    """Yields (index, example) for indices 0..count-1 in order, using `num_workers` processes
    (spawned, one espeak engine each; espeak is not thread-safe)."""
    job = functools.partial(_render_keyed, split=split, seed=seed, difficulty=difficulty)
    if num_workers <= 1 or count < 8 * num_workers:
        yield from map(job, range(count))
        return
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        yield from pool.imap(job, range(count), chunksize=16)


def to_record(example: dict) -> dict:
    """A TFDS example as a `jaxspeech.data` record: float32 audio in [-1, 1], str fields."""
    record = dict(example)
    record["audio"] = np.asarray(example["audio"], np.float32) / 32768.0
    for key in ("id", "text", "voice", "noise", "name", "template"):
        if isinstance(record.get(key), bytes):
            record[key] = record[key].decode()
    record["context"] = [c.decode() if isinstance(c, bytes) else c for c in example["context"]]
    record["snr"] = float(example["snr"])
    return record


class SpokenCommands(tfds.core.GeneratorBasedBuilder):
    """Synthesized voice-assistant commands (espeak-ng, many voices, noise at a range of SNRs)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = list(CONFIGS)
    DEFAULT_CONFIG_NAME = "default"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS' default lookup imports `importlib_resources`, which TFDS does not depend on.
        return epath.Path(__file__)

    def __init__(self, *, file_format=None, **kwargs):
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__.split("\n")[0] + " Validation/test voices and some names are "
            "held out from training.",
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    # Not `tfds.features.Audio`: it imports TensorFlow even to read, and stores
                    # int16 numpy input as an int64 list (up to 10 bytes/sample, slow to write).
                    "audio": tfds.features.Tensor(
                        shape=(None,),
                        dtype=np.int16,
                        encoding=tfds.features.Encoding.BYTES,
                        doc="int16 PCM samples, mono, 16 kHz (SAMPLE_RATE)",
                    ),
                    "text": tfds.features.Text(),
                    "voice": tfds.features.Text(),
                    "snr": tfds.features.Scalar(np.float32, doc="dB; +inf for clean audio"),
                    "noise": tfds.features.Text(doc="white, pink, babble or none"),
                    "context": tfds.features.Sequence(tfds.features.Text()),
                    "name": tfds.features.Text(doc="contact or device phrase spoken; '' if none"),
                    "template": tfds.features.Text(),
                }
            ),
            supervised_keys=("audio", "text"),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        return {
            split: self._generate_examples(split, getattr(cfg, f"num_{split}"))
            for split in grammar.SPLITS
        }

    def _generate_examples(self, split: str, count: int):
        cfg = self.builder_config
        yield from render_many(split, count, cfg.seed, cfg.difficulty, cfg.num_workers)


def total_hours(builder: tfds.core.DatasetBuilder, split: str) -> float:
    """Hours of audio in a prepared split (reads the array_record data, no TensorFlow)."""
    source = builder.as_data_source(split=split)
    samples = sum(len(source[i]["audio"]) for i in range(len(source)))
    return samples / augment.SAMPLE_RATE / 3600.0
