"""TFDS builder `spoken_commands`: the offline spoken-commands corpus.

Build (array_record files; TFDS 4.9.10 writes them without importing TensorFlow, older TFDS may
need `pip install -e .[build]`):
    python scripts/build_corpus.py --config default --data_dir ~/tensorflow_datasets
Read (no TensorFlow):
    import jaxspeech.data.commands  # registers the builder
    ds = tfds.data_source("spoken_commands/default", split="train", data_dir=...)
    example = ds[0]  # dict: id, audio (int16 [N] at 16 kHz), text, voice, snr, noise, context, ...

Each example is `render_example(split, index, seed, difficulty)`: a pure function of its arguments,
computed in worker processes (one espeak engine each) and identical however the work is scheduled.
Sizes, seed and difficulty are `SpokenCommandsConfig` fields; pass your own config object to
`tfds.builder("spoken_commands", config=SpokenCommandsConfig(name=..., ...))` for other sizes.
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
# Utterances spoken in one espeak fork (see `tts.Espeak.synthesize_many`): example i's audio
# depends on the examples of its group before it, a fixed unit whatever the scheduling.
GROUP_SIZE = 16
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
        description="~10.7 h train (17000 utterances), ~1 h validation and ~1 h test.",
        num_train=17000,
        num_validation=1600,
        num_test=1600,
        num_workers=2,
    ),
)


def _request(rng: np.random.Generator, text: str, voice: str, d: augment.Difficulty):
    return tts.Request(
        text,
        voice,
        rate=int(rng.integers(d.rate_wpm[0], d.rate_wpm[1] + 1)),
        pitch=int(rng.integers(d.pitch[0], d.pitch[1] + 1)),
        pitch_range=int(rng.integers(d.pitch_range[0], d.pitch_range[1] + 1)),
        seed=int(rng.integers(2**31)),
    )


@functools.lru_cache(maxsize=4)
def babble_pool(split: str, seed: int, difficulty: augment.Difficulty) -> list[np.ndarray]:
    """Clean 16 kHz utterances (the split's own voices) that babble noise is made from."""
    split_voices = tts.voices(split)
    requests = []
    for i in range(_BABBLE_POOL_SIZE):
        rng = np.random.default_rng([seed, grammar.split_code(split), i, _BABBLE_SALT])
        voice = split_voices[int(rng.integers(len(split_voices)))]
        text = grammar.make_utterance(split, i, seed ^ _BABBLE_SALT).text
        requests.append(_request(rng, text, voice, difficulty))
    raws = tts.engine().synthesize_many(requests)
    return [augment.resample_with_speed(raw, tts.NATIVE_RATE, 1.0) for raw in raws]


def _plan(split: str, index: int, seed: int, d: augment.Difficulty):
    """(utterance, espeak request, generator for the augmentation) of one example."""
    utt = grammar.make_utterance(split, index, seed)
    rng = np.random.default_rng([seed, grammar.split_code(split), index, 0x617564])
    split_voices = tts.voices(split)
    voice = split_voices[int(rng.integers(len(split_voices)))]
    return utt, _request(rng, utt.text, voice, d), rng


def _render_group(
    split: str, indices: range, seed: int, d: augment.Difficulty, return_clean: bool = False
) -> list[tuple[int, dict]]:
    """Examples `indices` (within one group), spoken in one espeak fork."""
    plans = [_plan(split, i, seed, d) for i in indices]
    raws = tts.engine().synthesize_many([request for _, request, _ in plans])
    pool = babble_pool(split, seed, d) if d.clean_fraction < 1.0 else []
    out = []
    for index, (utt, request, rng), raw in zip(indices, plans, raws, strict=True):
        audio, clean, snr, kind = augment.perturb_and_mix(raw, tts.NATIVE_RATE, rng, d, pool)
        example = {
            "id": f"{split}-{index:07d}",
            "audio": audio,
            "text": utt.text,
            "voice": request.voice,
            "snr": np.float32(snr),
            "noise": kind,
            "context": list(utt.context),
            "name": utt.name,
            "template": utt.template,
        }
        if return_clean:
            example["clean"] = clean
        out.append((index, example))
    return out


def render_example(
    split: str,
    index: int,
    seed: int,
    difficulty: augment.Difficulty = DEFAULT_DIFFICULTY,
    return_clean: bool = False,
) -> dict:
    """The `index`-th example of `split` as a TFDS feature dict (deterministic).

    Speaks the utterances of its group before it too (see `GROUP_SIZE`). With `return_clean`,
    also returns the 16 kHz float speech before noise (key `clean`).
    """
    start = index - index % GROUP_SIZE
    return _render_group(split, range(start, index + 1), seed, difficulty, return_clean)[-1][1]


def render_indices(
    split: str,
    indices,
    seed: int,
    difficulty: augment.Difficulty = DEFAULT_DIFFICULTY,
    return_clean: bool = False,
) -> dict[int, dict]:
    """Examples `indices` of `split` (any order, any subset), each as `render_example` returns
    it: every group is spoken once, from its start to its last wanted index."""
    wanted = {int(i) for i in indices}
    last: dict[int, int] = {}
    for i in sorted(wanted):
        last[i // GROUP_SIZE] = i
    out = {}
    for group, stop in last.items():
        start = group * GROUP_SIZE
        rendered = _render_group(split, range(start, stop + 1), seed, difficulty, return_clean)
        out.update((i, example) for i, example in rendered if i in wanted)
    return out


def _render_group_job(group: int, split: str, count: int, seed: int, d: augment.Difficulty):
    indices = range(group * GROUP_SIZE, min((group + 1) * GROUP_SIZE, count))
    return _render_group(split, indices, seed, d)


def render_many(
    split: str, count: int, seed: int, difficulty: augment.Difficulty, num_workers: int
):
    """Yields (index, example) for indices 0..count-1 in order, using `num_workers` processes
    (spawned, one espeak engine each; espeak is not thread-safe). The output does not depend on
    `num_workers` or scheduling: groups of `GROUP_SIZE` consecutive examples are fixed units."""
    job = functools.partial(_render_group_job, split=split, count=count, seed=seed, d=difficulty)
    groups = range(-(-count // GROUP_SIZE))
    if num_workers <= 1 or len(groups) < 2:
        results = map(job, groups)
        for group in results:
            yield from group
        return
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        for group in pool.imap(job, groups):
            yield from group


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

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Calibrated difficulty: narrower rate/pitch/speed, SNR 10-35 dB, 30% clean, "
        "fewer held-out and generated names, fewer call/message/play-song requests.",
    }
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
