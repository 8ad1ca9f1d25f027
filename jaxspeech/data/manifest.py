"""JSON-lines manifests as a random-access source.

One JSON object per line (blank lines are ignored)::

    {"audio_filepath": "clips/a.flac", "text": "hello world", "duration": 1.52}

- ``audio_filepath`` (str, required): absolute, or relative to the manifest's directory.
- ``text`` (str, required): the transcript (normalized later by the tokenizer).
- ``duration`` (number, optional, seconds): kept for length bucketing (`ManifestSource.durations`).
- ``id`` (str, optional): the record id; defaults to ``audio_filepath`` as written.
- any other keys are passed through as record extras.

The manifest is validated when opened: a line that is not a JSON object, or a missing / mistyped
field, raises ``ValueError`` naming ``file:line`` and the field. Audio files that do not exist
are found at open time too and, by policy ``on_missing``, either raise ``FileNotFoundError``
(``'error'``, the default) or are dropped with a warning (``'skip'``); both report the count and
the first few paths. Audio is decoded lazily in ``__getitem__`` (`jaxspeech.data.audio`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

from jaxspeech.data.audio import SAMPLE_RATE, load_audio

__all__ = ["ManifestSource", "read_manifest"]

log = logging.getLogger(__name__)
_SHOW = 5  # how many missing paths an error or warning lists


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Parses and validates a manifest; returns its entries with ``audio_filepath`` resolved and
    ``line`` (1-based) added."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    entries = []
    with open(path, "rb") as f:  # decoded line by line, so an encoding error names its line
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:  # UTF-8, with or without a byte-order mark
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                    "save the manifest as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
            for field in ("audio_filepath", "text"):
                if field not in entry:
                    raise ValueError(f"{where}: missing field {field!r}")
                if not isinstance(entry[field], str):
                    raise ValueError(f"{where}: field {field!r} must be a string")
            duration = entry.get("duration")
            if duration is not None and (
                isinstance(duration, bool) or not isinstance(duration, int | float)
            ):
                raise ValueError(f"{where}: field 'duration' must be a number (seconds)")
            entry.setdefault("id", entry["audio_filepath"])
            entry["audio_filepath"] = os.path.join(
                base, os.path.expanduser(entry["audio_filepath"])
            )
            entry["line"] = lineno
            entries.append(entry)
    if not entries:
        raise ValueError(f"{path}: the manifest has no entries")
    return entries


class ManifestSource:
    """Random-access source over a JSON-lines manifest.

    ``source[i]`` is ``{"audio": float32 [N] 16 kHz mono, "text": str, "id": str, **extras}``
    where extras are ``duration`` (if given) and any other keys of the line. Decoding errors raise
    `jaxspeech.data.audio.AudioDecodeError` (wrap with `SkipCorrupt` to skip and count them).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        on_missing: str = "error",
        sample_rate: int = SAMPLE_RATE,
    ):
        if on_missing not in ("error", "skip"):
            raise ValueError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
        self.path = os.fspath(path)
        self.sample_rate = sample_rate
        entries = read_manifest(self.path)
        missing = [e for e in entries if not os.path.isfile(e["audio_filepath"])]
        if missing:
            names = ", ".join(f"{e['audio_filepath']} (line {e['line']})" for e in missing[:_SHOW])
            more = f" and {len(missing) - _SHOW} more" if len(missing) > _SHOW else ""
            msg = (
                f"{self.path}: {len(missing)} of {len(entries)} audio files missing: {names}{more}"
            )
            if on_missing == "error":
                raise FileNotFoundError(msg + " (use on_missing='skip' to drop them)")
            log.warning("%s; skipping them", msg)
            gone = {id(e) for e in missing}
            entries = [e for e in entries if id(e) not in gone]
            if not entries:
                raise FileNotFoundError(f"{self.path}: every audio file is missing")
        self.num_missing = len(missing)
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def fingerprint(self) -> str:
        """Identifies the records (audio paths and transcripts, in order; not the audio bytes):
        caches of their lengths are keyed by it."""
        items = [(e["audio_filepath"], e["text"]) for e in self._entries]
        return "manifest:" + hashlib.sha1(json.dumps(items).encode()).hexdigest()[:16]

    @property
    def durations(self) -> list[float | None]:
        """Per-record durations from the manifest (``None`` where absent), for bucketing."""
        return [e.get("duration") for e in self._entries]

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self._entries[index]
        record = {k: v for k, v in entry.items() if k not in ("audio_filepath", "line")}
        record["audio"] = load_audio(entry["audio_filepath"], self.sample_rate)
        record["path"] = entry["audio_filepath"]
        return record

    def __repr__(self) -> str:
        return f"ManifestSource({self.path!r}, {len(self)} records)"
