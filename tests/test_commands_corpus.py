"""The spoken-commands corpus: tiny TFDS build, read back without TensorFlow, corpus properties."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxspeech.data.commands import augment, builder, grammar, tts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = next(c for c in builder.CONFIGS if c.name == "tiny")


def _run(args, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, **kwargs
    )


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Builds `spoken_commands/tiny` once per session with the CLI; returns the data dir."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    proc = _run(["scripts/build_corpus.py", "--config", "tiny", "--data_dir", data_dir])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "build time" in proc.stdout and " h" in proc.stdout
    return data_dir


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """{split: list of examples} read back through `tfds.data_source`."""
    import tensorflow_datasets as tfds

    out = {}
    for split in grammar.SPLITS:
        source = tfds.data_source("spoken_commands/tiny", split=split, data_dir=tiny_dir)
        out[split] = [
            builder.to_record(source[i]) | {"pcm": source[i]["audio"]} for i in range(len(source))
        ]
    return out


def test_split_sizes_and_features(tiny):
    assert {s: len(v) for s, v in tiny.items()} == {
        "train": TINY.num_train,
        "validation": TINY.num_validation,
        "test": TINY.num_test,
    }
    ex = tiny["train"][0]
    assert set(ex) >= {"id", "audio", "text", "voice", "snr", "noise", "context", "name"}
    ids = [e["id"] for s in tiny.values() for e in s]
    assert len(set(ids)) == len(ids)
    clean = [e for e in tiny["train"] if math.isinf(e["snr"])]
    assert clean and all(e["noise"] == "none" for e in clean)
    noisy = {e["noise"] for e in tiny["train"] if not math.isinf(e["snr"])}
    assert noisy == set(augment.NOISE_KINDS)


def test_reading_needs_no_tensorflow(tiny_dir):
    code = (
        "import sys, json, tensorflow_datasets as tfds, jaxspeech.data.commands\n"
        f"ds = tfds.data_source('spoken_commands/tiny', split='test', data_dir={tiny_dir!r})\n"
        "ex = ds[0]\n"
        "print(json.dumps([len(ds), str(ex['audio'].dtype), 'tensorflow' in sys.modules]))\n"
    )
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [TINY.num_test, "int16", False]


def test_audio_is_16k_int16_plausible_and_not_silent(tiny):
    for ex in tiny["train"][:40] + tiny["test"][:10]:
        pcm = ex["pcm"]
        assert pcm.dtype == np.int16 and pcm.ndim == 1
        seconds = pcm.size / builder.SAMPLE_RATE
        words = len(ex["text"].split())
        assert 0.5 < seconds < 12.0 and 0.1 < seconds / words < 1.5, (ex["text"], seconds)
        rms_dbfs = 10 * math.log10(np.mean(ex["audio"].astype(np.float64) ** 2))
        assert rms_dbfs > -45.0, (ex["id"], rms_dbfs)


def test_texts_in_alphabet(tiny):
    for split in tiny.values():
        for ex in split:
            assert ex["text"] and set(ex["text"]) <= grammar.ALPHABET, ex["text"]
            assert ex["text"] == " ".join(ex["text"].split())


def test_built_examples_equal_fresh_synthesis(tiny):
    """The build (another process) and a fresh render give identical text and audio."""
    for ex in tiny["test"][:3] + tiny["train"][:3]:
        split, index = ex["id"].rsplit("-", 1)
        again = builder.render_example(split, int(index), TINY.seed, TINY.difficulty)
        assert again["text"] == ex["text"] and again["voice"] == ex["voice"]
        np.testing.assert_array_equal(again["audio"], ex["pcm"])


def test_worker_scheduling_does_not_change_examples():
    serial = dict(builder.render_many("validation", 20, 7, builder.DEFAULT_DIFFICULTY, 1))
    pooled = dict(builder.render_many("validation", 20, 7, builder.DEFAULT_DIFFICULTY, 2))
    assert sorted(pooled) == list(range(20))
    for i in range(20):
        assert serial[i]["text"] == pooled[i]["text"]
        np.testing.assert_array_equal(serial[i]["audio"], pooled[i]["audio"])
    # Any subset, in any order: each group spoken once up to its last wanted example.
    picked = builder.render_indices("validation", [17, 3, 18, 0], 7, return_clean=True)
    assert sorted(picked) == [0, 3, 17, 18]
    for i, ex in picked.items():
        np.testing.assert_array_equal(ex["audio"], serial[i]["audio"])
        assert ex["clean"].shape == ex["audio"].shape


def test_seed_changes_the_corpus():
    a = [grammar.make_utterance("train", i, 0).text for i in range(20)]
    b = [grammar.make_utterance("train", i, 1).text for i in range(20)]
    assert a != b and a == [grammar.make_utterance("train", i, 0).text for i in range(20)]


def test_heldout_voices(tiny):
    train, val, test = (set(tts.voices(s)) for s in grammar.SPLITS)
    assert not train & val and not train & test and not val & test
    built = {s: {ex["voice"] for ex in tiny[s]} for s in grammar.SPLITS}
    assert built["train"] <= train and built["validation"] <= val and built["test"] <= test
    assert len(built["train"]) > 50  # many voices


def test_some_test_names_never_in_train(tiny):
    train_words = set()
    for ex in tiny["train"]:
        for phrase in [ex["name"], *ex["context"]]:
            train_words.update(phrase.split())
    test_names = {
        ex["name"] for ex in tiny["test"] if ex["template"].startswith(("call", "message"))
    }
    novel = {n for n in test_names if not set(n.split()) & train_words}
    assert test_names and novel, test_names
    # And by construction: training utterances never use a held-out name word.
    heldout = {grammar.person_name(np.random.default_rng(i), heldout=True) for i in range(200)}
    heldout_words = {w for n in heldout for w in n.split()}
    for i in range(1500):
        utt = grammar.make_utterance("train", i, 0)
        words = {w for phrase in [utt.name, *utt.context] for w in phrase.split()}
        assert not words & heldout_words, utt


def test_context_contains_spoken_name(tiny):
    with_name = 0
    for ex in tiny["train"] + tiny["test"]:
        assert 2 <= len(ex["context"]) <= 10
        if ex["name"]:
            with_name += 1
            assert ex["name"] in ex["context"]
            words = ex["text"].split()
            assert all(w in words for w in ex["name"].split()), (ex["name"], ex["text"])
    assert with_name > 30


@pytest.mark.parametrize("kind", augment.NOISE_KINDS)
@pytest.mark.parametrize("snr", [0.0, 7.5, 20.0])
def test_mix_at_snr(kind, snr):
    rng = np.random.default_rng(0)
    pool = builder.babble_pool("train", 0, builder.DEFAULT_DIFFICULTY)
    clean = builder.render_example("train", 3, 0, return_clean=True)["clean"]
    noise = augment.make_noise(kind, rng, clean.size, pool, builder.DEFAULT_DIFFICULTY)
    mixed = augment.mix_at_snr(clean, noise, snr)
    measured = 10 * math.log10(augment.power(clean) / augment.power(mixed - clean))
    assert abs(measured - snr) < 0.5


def test_rendered_snr_matches_label():
    """End to end: the int16 audio minus the clean speech has the labelled SNR."""
    checked = 0
    for i in range(0, 30 * builder.GROUP_SIZE, builder.GROUP_SIZE):  # group starts: one synthesis
        ex = builder.render_example("test", i, 0, return_clean=True)
        if math.isinf(ex["snr"]):
            assert ex["noise"] == "none"
            continue
        mixed = ex["audio"].astype(np.float64) / 32767.0
        scale = np.dot(mixed, ex["clean"]) / np.dot(ex["clean"], ex["clean"])  # 1 unless limited
        clean = scale * ex["clean"]
        measured = 10 * math.log10(augment.power(clean) / augment.power(mixed - clean))
        assert abs(measured - ex["snr"]) < 0.5, (i, ex["noise"], ex["snr"], measured)
        checked += 1
    assert checked >= 15


def test_number_and_clock_words():
    assert grammar.number_words(25) == "twenty five"
    assert grammar.number_words(105) == "one hundred and five"
    assert grammar.clock_words(7, 30) == "seven thirty"
    assert grammar.clock_words(6, 5) == "six oh five"
    assert grammar.clock_words(9, 0) == "nine o'clock"


def test_template_outside_alphabet_is_an_error():
    bad = (("timer_digits", "set a timer for 5 minutes", 1.0),)
    with pytest.raises(ValueError, match="timer_digits"):
        grammar.make_utterance("train", 0, 0, templates=bad)
    with pytest.raises(ValueError, match="cafe_accent"):
        grammar.make_utterance("train", 0, 0, templates=(("cafe_accent", "caf\u00e9 {city}", 1.0),))


def test_espeak_errors_say_what_is_missing(tmp_path):
    with pytest.raises(tts.EspeakError, match="cannot load libespeak-ng"):
        tts.Espeak(lib_path="/nonexistent/libespeak-ng.so", data_dir=str(tmp_path))
    lib_path, _ = tts._locate()
    with pytest.raises(tts.EspeakError, match="espeak-ng-data is missing"):
        tts.Espeak(lib_path=lib_path, data_dir=str(tmp_path))
    with pytest.raises(tts.EspeakError, match="no voice variant"):
        tts.engine().synthesize("hello", "en-us+nonexistent")


def test_speaking_in_a_jax_process_forks_without_warning():
    """The per-batch espeak fork is safe beside JAX's threads (the child never calls JAX), so
    JAX's fork warning is not shown to every process that trains and then synthesizes."""
    import warnings

    import jax.numpy as jnp

    jnp.ones(2).block_until_ready()  # JAX's backend threads running: it now warns on fork
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        audio = tts.engine().synthesize("turn on the lights", tts.voices("train")[0])
    assert audio.size > 0
    assert not [w for w in caught if "fork" in str(w.message)]
