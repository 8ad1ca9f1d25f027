"""Audio decoding, manifests, the local LibriSpeech builder, and the source factory."""

import json
import pickle

import numpy as np
import pytest
import soundfile as sf

from jaxspeech.data.audio import AudioDecodeError, decode_audio, load_audio
from jaxspeech.data.manifest import ManifestSource
from jaxspeech.data.sources import ConcatSource, SkipCorrupt, SourceSpec, open_source


def _tone(seconds, rate, freq=440.0, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def test_load_audio_resamples_and_downmixes(tmp_path):
    stereo = _tone(0.5, 8000, channels=2)
    stereo[:, 1] *= 0.0  # mono = mean of channels = half the left channel
    sf.write(tmp_path / "a.wav", stereo, 8000, subtype="PCM_16")
    audio = load_audio(tmp_path / "a.wav")
    assert audio.dtype == np.float32 and audio.ndim == 1 and audio.size == 8000
    ref = 0.25 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)
    np.testing.assert_allclose(audio[200:-200], ref[200:-200], atol=2e-3)

    sf.write(tmp_path / "b.flac", _tone(0.25, 16000), 16000)
    flac = load_audio(tmp_path / "b.flac")
    assert flac.size == 4000
    np.testing.assert_allclose(flac, _tone(0.25, 16000), atol=1 / 32768)
    np.testing.assert_array_equal(decode_audio((tmp_path / "b.flac").read_bytes()), flac)


def test_audio_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"fLaC" + b"\x00garbage" * 20)
    with pytest.raises(AudioDecodeError, match="bad.flac: unreadable audio") as e:
        load_audio(bad)
    assert e.value.path == str(bad)
    with pytest.raises(AudioDecodeError, match="gone.wav: file not found"):
        load_audio(tmp_path / "gone.wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0), 16000)
    with pytest.raises(AudioDecodeError, match="empty.wav: no samples"):
        load_audio(tmp_path / "empty.wav")


def _write_manifest(tmp_path, lines, name="m.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_manifest_source(tmp_path):
    (tmp_path / "clips").mkdir()
    sf.write(tmp_path / "clips" / "a.flac", _tone(0.5, 16000), 16000)
    sf.write(tmp_path / "b.wav", _tone(1.0, 22050), 22050)
    path = _write_manifest(
        tmp_path,
        [
            {"audio_filepath": "clips/a.flac", "text": "Hello there", "duration": 0.5},
            "",
            {"audio_filepath": str(tmp_path / "b.wav"), "text": "two", "id": "b", "spk": 3},
        ],
    )
    source = ManifestSource(path)
    assert len(source) == 2 and source.durations == [0.5, None]
    a, b = source[0], source[1]
    assert a["id"] == "clips/a.flac" and a["text"] == "Hello there" and a["audio"].size == 8000
    assert b["id"] == "b" and b["spk"] == 3 and b["audio"].size == 16000
    assert b["audio"].dtype == np.float32


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"m.jsonl:2: not valid JSON"),
        ('["a"]', r"m.jsonl:2: expected a JSON object"),
        ({"text": "x"}, r"m.jsonl:2: missing field 'audio_filepath'"),
        ({"audio_filepath": "a.wav"}, r"m.jsonl:2: missing field 'text'"),
        ({"audio_filepath": "a.wav", "text": 5}, r"m.jsonl:2: field 'text' must be a string"),
        ({"audio_filepath": "a.wav", "text": "x", "duration": "1s"}, r"m.jsonl:2: field 'dur"),
    ],
)
def test_manifest_validation(tmp_path, line, message):
    sf.write(tmp_path / "a.wav", _tone(0.1, 16000), 16000)
    path = _write_manifest(tmp_path, [{"audio_filepath": "a.wav", "text": "ok"}, line])
    with pytest.raises(ValueError, match=message):
        ManifestSource(path)


def test_manifest_missing_audio(tmp_path):
    sf.write(tmp_path / "a.wav", _tone(0.1, 16000), 16000)
    lines = [{"audio_filepath": "a.wav", "text": "ok"}]
    lines += [{"audio_filepath": f"gone{i}.wav", "text": "x"} for i in range(7)]
    path = _write_manifest(tmp_path, lines)
    with pytest.raises(
        FileNotFoundError,
        match=r"7 of 8 audio files missing: .*gone0.wav "
        r"\(line 2\).*and 2 more",
    ):
        ManifestSource(path)
    source = ManifestSource(path, on_missing="skip")
    assert len(source) == 1 and source.num_missing == 7 and source[0]["text"] == "ok"
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        ManifestSource(tmp_path / "nope.jsonl")


def test_corrupt_audio_is_skipped_and_counted(tmp_path):
    sf.write(tmp_path / "a.wav", _tone(0.1, 16000), 16000)
    (tmp_path / "bad.flac").write_bytes(b"not audio at all")
    path = _write_manifest(
        tmp_path,
        [{"audio_filepath": n, "text": "x"} for n in ("a.wav", "bad.flac", "a.wav")],
    )
    source = open_source(f"manifest:{path}")
    assert isinstance(source, SkipCorrupt) and len(source) == 3
    records = [source[i] for i in range(3)]
    assert records[1] is None and records[0]["audio"].size == 1600
    assert source.num_skipped == 1 and source.skipped == [str(tmp_path / "bad.flac")]
    assert source.durations == [None] * 3  # attributes of the wrapped source pass through
    raw = open_source(f"manifest:{path}", skip_corrupt=False)
    with pytest.raises(AudioDecodeError, match="bad.flac"):
        raw[1]
    clone = pickle.loads(pickle.dumps(source))
    assert len(clone) == 3 and clone.num_skipped == 0


def test_source_spec_parse():
    assert SourceSpec.parse("tfds:spoken_commands/tiny:train[:10%]") == SourceSpec(
        "tfds", "spoken_commands/tiny", "train[:10%]"
    )
    spec = SourceSpec.parse("librispeech_dir:/data/c:/LibriSpeech:dev-clean")
    assert (spec.location, spec.split) == ("/data/c:/LibriSpeech", "dev-clean")
    assert SourceSpec.parse("manifest:/a/b:c.jsonl").location == "/a/b:c.jsonl"
    assert str(spec) == "librispeech_dir:/data/c:/LibriSpeech:dev-clean"
    for bad in ("nope:x", "tfds:librispeech", "manifest:", "dev_clean"):
        with pytest.raises(ValueError, match="bad source spec"):
            SourceSpec.parse(bad)


def test_concat_source():
    both = ConcatSource([[1, 2], [], [3]])
    assert len(both) == 3 and [both[i] for i in range(3)] == [1, 2, 3]
    with pytest.raises(IndexError):
        both[3]


def test_tfds_not_prepared(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"'librispeech' is not prepared: expected it "
        rf"under {tmp_path}/librispeech",
    ):
        open_source("tfds:librispeech:dev_clean", data_dir=tmp_path)
