"""Audio decoding, manifests, the local LibriSpeech builder, and the source factory."""

import json
import pickle

import numpy as np
import pytest
import soundfile as sf

from jaxspeech.data.audio import AudioDecodeError, decode_audio, load_audio, to_float32
from jaxspeech.data.manifest import ManifestSource
from jaxspeech.data.sources import (
    ConcatSource,
    SkipCorrupt,
    SourceSpec,
    SubsetSource,
    example_to_record,
    open_source,
)


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
    # soundfile raises TypeError (not a decode error) for headerless raw PCM: still this file's
    (tmp_path / "pcm.raw").write_bytes(np.zeros(1600, np.int16).tobytes())
    with pytest.raises(AudioDecodeError, match="pcm.raw: unreadable audio"):
        load_audio(tmp_path / "pcm.raw")
    with pytest.raises(AudioDecodeError, match="<bytes>: unreadable audio"):
        decode_audio(b"")
    # grain worker processes send the error pickled: it must arrive whole
    clone = pickle.loads(pickle.dumps(e.value))
    assert (clone.path, clone.reason, str(clone)) == (e.value.path, e.value.reason, str(e.value))


def test_integer_pcm_scaling():
    """Signed PCM by its full range; unsigned PCM (8-bit WAV's) centred on its midpoint first."""
    for dtype in (np.int8, np.int16, np.int32, np.uint8, np.uint16):
        info = np.iinfo(dtype)
        mid = (int(info.min) + int(info.max) + 1) // 2
        x = np.array([info.min, mid, info.max], dtype)
        got = to_float32(x, 16000)
        half = 2.0 ** (info.bits - 1)
        np.testing.assert_allclose(got, [-1.0, 0.0, (half - 1) / half], rtol=0, atol=1e-7)


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


def test_manifest_fingerprint(tmp_path):
    """Identifies the records: equal for the same lines, different for another transcript."""
    sf.write(tmp_path / "a.wav", _tone(0.1, 16000), 16000)
    lines = [{"audio_filepath": "a.wav", "text": t} for t in ("one", "two")]
    first = ManifestSource(_write_manifest(tmp_path, lines, "a.jsonl")).fingerprint()
    assert ManifestSource(_write_manifest(tmp_path, lines, "b.jsonl")).fingerprint() == first
    lines[1]["text"] = "three"
    assert ManifestSource(_write_manifest(tmp_path, lines, "c.jsonl")).fingerprint() != first
    both = ConcatSource([ManifestSource(tmp_path / n) for n in ("a.jsonl", "c.jsonl")])
    assert both.fingerprint().startswith(first + "+")
    assert open_source(f"manifest:{tmp_path / 'a.jsonl'}").fingerprint() == first  # SkipCorrupt


def test_subset_source(tmp_path):
    sf.write(tmp_path / "a.wav", _tone(0.1, 16000), 16000)
    lines = [{"audio_filepath": "a.wav", "text": f"utterance {i}"} for i in range(10)]
    full = ManifestSource(_write_manifest(tmp_path, lines))
    part = SubsetSource.evenly_spaced(full, 4)
    assert part.indices.tolist() == [0, 3, 6, 9] and len(part) == 4
    assert [part[i]["text"] for i in range(4)] == [f"utterance {i}" for i in (0, 3, 6, 9)]
    assert part.fingerprint().startswith(full.fingerprint() + "[")
    assert part.fingerprint() != SubsetSource(full, [0, 3, 6, 8]).fingerprint()
    assert len(SubsetSource.evenly_spaced(full, 50)) == 10
    with pytest.raises(IndexError):
        SubsetSource(full, [10])


def test_manifest_encoding(tmp_path):
    """UTF-8 with a byte-order mark reads; a line in another encoding is named, with the fix."""
    sf.write(tmp_path / "a.wav", _tone(0.1, 16000), 16000)
    line = json.dumps({"audio_filepath": "a.wav", "text": "café"}, ensure_ascii=False)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\n")
    assert ManifestSource(tmp_path / "bom.jsonl")[0]["text"] == "café"
    (tmp_path / "latin1.jsonl").write_bytes((line + "\n" + line + "\n").encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.jsonl:1: not UTF-8 .*save the manifest as UTF-8"):
        ManifestSource(tmp_path / "latin1.jsonl")


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


def test_example_to_record_tfds_librispeech_features():
    """TFDS `librispeech` examples: int64 PCM `speech`, bytes text/id, numpy int scalars."""
    pcm = (np.sin(np.arange(1600) / 10) * 20000).astype(np.int64)
    example = {
        "speech": pcm,
        "text": b"HELLO WORLD",
        "id": b"84-121123-0000",
        "speaker_id": np.int64(84),
        "chapter_id": np.int64(121123),
    }
    record = example_to_record(example)
    assert record["text"] == "HELLO WORLD" and record["id"] == "84-121123-0000"
    assert record["speaker_id"] == 84 and type(record["speaker_id"]) is int
    assert record["audio"].dtype == np.float32 and "speech" not in record
    np.testing.assert_allclose(record["audio"], pcm / 32768.0, atol=1e-7)
    resampled = example_to_record({"audio": pcm.astype(np.int16), "text": b"x"}, 8000)
    assert resampled["audio"].size == 3200


def test_tfds_not_prepared(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"'librispeech' is not prepared: expected it "
        rf"under {tmp_path}/librispeech",
    ):
        open_source("tfds:librispeech:dev_clean", data_dir=tmp_path)


def _write_librispeech(root, split="dev-clean"):
    """A tiny LibriSpeech-layout tree: 2 speakers x 1 chapter x 2 utterances of flac."""
    expected = {}
    for speaker, chapter in ((84, 121123), (174, 50561)):
        chapter_dir = root / split / str(speaker) / str(chapter)
        chapter_dir.mkdir(parents=True)
        lines = []
        for utt in range(2):
            utt_id = f"{speaker}-{chapter}-{utt:04d}"
            audio = _tone(0.3 + 0.1 * utt, 16000, freq=200.0 + speaker + 50 * utt)
            sf.write(chapter_dir / f"{utt_id}.flac", audio, 16000, subtype="PCM_16")
            text = f"SPEAKER {speaker} SAYS NUMBER {utt}"
            lines.append(f"{utt_id} {text}")
            expected[utt_id] = (audio, text, speaker, chapter)
        (chapter_dir / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return expected


def test_librispeech_local_dir(tmp_path):
    root = tmp_path / "LibriSpeech"
    expected = _write_librispeech(root)
    data_dir = tmp_path / "prepared"
    source = open_source(f"librispeech_dir:{root}:dev-clean", data_dir=data_dir)
    assert len(source) == 4
    got = {r["id"]: r for r in (source[i] for i in range(4))}
    assert set(got) == set(expected)
    for utt_id, (audio, text, speaker, chapter) in expected.items():
        record = got[utt_id]
        assert record["text"] == text
        assert (record["speaker_id"], record["chapter_id"]) == (speaker, chapter)
        assert record["audio"].dtype == np.float32
        np.testing.assert_allclose(record["audio"], audio, atol=1 / 32768)
    # Prepared once: the second open only reads, and the source survives pickling.
    assert (data_dir / "dev-clean" / "librispeech_local").is_dir()
    again = pickle.loads(
        pickle.dumps(open_source(f"librispeech_dir:{root}:dev-clean", data_dir=data_dir))
    )
    assert len(again) == 4 and again[0]["id"] == source[0]["id"]
    # The prepared split is a TFDS dataset like any other (slicing works).
    head = open_source("tfds:librispeech_local:dev_clean[:2]", data_dir=data_dir / "dev-clean")
    assert len(head) == 2 and head[1]["id"] == source[1]["id"]
    # Several split folders joined with '+'.
    _write_librispeech(root, "dev-other")
    both = open_source(f"librispeech_dir:{root}:dev-clean+dev-other", data_dir=data_dir)
    assert len(both) == 8
    assert (
        {both[i]["id"] for i in range(4, 8)} == {both[i]["id"] for i in range(4)} == set(expected)
    )


def test_librispeech_layout_errors(tmp_path):
    from jaxspeech.data.librispeech import scan_split, split_name

    assert split_name("train-clean-100") == "train_clean100"
    assert split_name("dev-other") == "dev_other"
    root = tmp_path / "LibriSpeech"
    _write_librispeech(root)
    with pytest.raises(
        FileNotFoundError,
        match=r"no split folder 'test-clean' in .*found "
        r"folders: \['dev-clean'\]",
    ):
        open_source(f"librispeech_dir:{root}:test-clean", data_dir=tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="LibriSpeech root not found"):
        open_source(f"librispeech_dir:{tmp_path}/nope:dev-clean")
    (root / "dev-clean" / "84" / "121123" / "84-121123.trans.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing transcript .*84-121123.trans.txt"):
        scan_split(root / "dev-clean")
    flat = tmp_path / "flat" / "dev-clean"
    flat.mkdir(parents=True)
    sf.write(flat / "1-2-0000.flac", _tone(0.1, 16000), 16000)
    with pytest.raises(FileNotFoundError, match=r"no utterances in .*<speaker>/<chapter>/"):
        open_source(f"librispeech_dir:{tmp_path / 'flat'}:dev-clean", data_dir=tmp_path / "q")
