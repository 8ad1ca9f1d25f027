"""LibriSpeech: the TFDS ``librispeech`` dataset, or a local directory in the original layout.

(a) ``open_librispeech(split, data_dir)``: TFDS ``librispeech`` that the user has prepared
    (``data_dir`` may be ``gs://...``); split names ``train_clean100``, ``train_clean360``,
    ``train_other500``, ``dev_clean``, ``dev_other``, ``test_clean``, ``test_other``.
(b) The TFDS builder ``librispeech_local`` for a local directory in the original layout::

        <root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
        <root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt   ("<utt-id> TEXT" lines)

    (``<split>`` e.g. ``dev-clean``; ``<root>`` is usually the ``LibriSpeech`` folder the
    archives unpack to). ``open_librispeech_dir(root, split)`` prepares one split once into
    array_record under ``<data_dir>/<split>`` (default ``<root>/_tfds``) and then reads it like (a).
    The TFDS split is named like TFDS ``librispeech``'s (``dev-clean`` -> ``dev_clean``).

Records: ``audio`` float32 16 kHz, ``text`` (upper case, as distributed), ``id``
(``<speaker>-<chapter>-<utt>``), ``speaker_id``, ``chapter_id``. Preparing needs TensorFlow;
reading does not. Undecodable flac files are skipped with a warning while preparing.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxspeech.data.audio import SAMPLE_RATE, AudioDecodeError, load_audio
from jaxspeech.data.sources import ConcatSource, TfdsSource

__all__ = [
    "LibrispeechLocal",
    "open_librispeech",
    "open_librispeech_dir",
    "scan_split",
    "split_name",
]

log = logging.getLogger(__name__)

_LAYOUT = (
    "<root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac"
    " + <speaker>-<chapter>.trans.txt"
)


def split_name(directory: str) -> str:
    """TFDS split name of a LibriSpeech split folder: ``train-clean-100`` -> ``train_clean100``."""
    name = re.sub(r"-(\d+)$", r"\1", directory)
    return re.sub(r"\W", "_", name)


def open_librispeech(split: str, data_dir: str | os.PathLike | None = None) -> TfdsSource:
    """The prepared TFDS ``librispeech`` split as a source (never downloads)."""
    return TfdsSource("librispeech", split, data_dir)


def scan_split(split_dir: str | os.PathLike) -> list[tuple[str, str, str, int, int]]:
    """``(id, flac_path, text, speaker, chapter)`` for every transcript line of a split directory.

    Raises ``FileNotFoundError`` / ``ValueError`` saying what was expected where.
    """
    split_dir = os.fspath(split_dir)
    if not os.path.isdir(split_dir):
        parent = os.path.dirname(split_dir.rstrip("/")) or "."
        have = sorted(os.listdir(parent)) if os.path.isdir(parent) else "no such directory"
        raise FileNotFoundError(
            f"LibriSpeech split directory not found: {split_dir} (layout {_LAYOUT}; "
            f"{parent} contains: {have})"
        )
    items = []
    for speaker in sorted(os.listdir(split_dir)):
        speaker_dir = os.path.join(split_dir, speaker)
        if not os.path.isdir(speaker_dir) or not speaker.isdigit():
            continue
        for chapter in sorted(os.listdir(speaker_dir)):
            chapter_dir = os.path.join(speaker_dir, chapter)
            if not os.path.isdir(chapter_dir) or not chapter.isdigit():
                continue
            trans = os.path.join(chapter_dir, f"{speaker}-{chapter}.trans.txt")
            if not os.path.isfile(trans):
                raise FileNotFoundError(f"missing transcript {trans} (layout {_LAYOUT})")
            with open(trans, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    utt_id, _, text = line.strip().partition(" ")
                    if not utt_id.startswith(f"{speaker}-{chapter}-") or not text.strip():
                        raise ValueError(
                            f"{trans}:{lineno}: expected '{speaker}-{chapter}-<utt> TEXT', "
                            f"got {line.strip()!r}"
                        )
                    flac = os.path.join(chapter_dir, f"{utt_id}.flac")
                    if not os.path.isfile(flac):
                        raise FileNotFoundError(f"{trans}:{lineno}: audio file {flac} not found")
                    items.append((utt_id, flac, text.strip(), int(speaker), int(chapter)))
    if not items:
        raise FileNotFoundError(
            f"no utterances in {split_dir}: expected <speaker>/<chapter>/ folders with "
            f"<speaker>-<chapter>.trans.txt and .flac files (layout {_LAYOUT})"
        )
    return items


class LibrispeechLocal(tfds.core.GeneratorBasedBuilder):
    """LibriSpeech from a local directory in the original layout (prepared into array_record)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Pass DownloadConfig(manual_dir=<root>) where the split folders are laid out as {_LAYOUT}."
    )

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS' default lookup imports `importlib_resources`, which TFDS does not depend on.
        return epath.Path(__file__)

    def __init__(self, *, split_dirs: tuple[str, ...] | None = None, file_format=None, **kwargs):
        """``split_dirs``: the split folders under the manual dir to prepare (default: all)."""
        self._split_dirs = None if split_dirs is None else tuple(split_dirs)
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="LibriSpeech read from a local directory in the original layout.",
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    # A plain int16 tensor stored as bytes, not `tfds.features.Audio` (which needs
                    # TensorFlow to read and serializes int16 as an int64 list).
                    "audio": tfds.features.Tensor(
                        shape=(None,),
                        dtype=np.int16,
                        encoding=tfds.features.Encoding.BYTES,
                        doc=f"int16 PCM samples, mono, {SAMPLE_RATE} Hz",
                    ),
                    "text": tfds.features.Text(),
                    "speaker_id": tfds.features.Scalar(np.int64),
                    "chapter_id": tfds.features.Scalar(np.int64),
                }
            ),
            homepage="https://www.openslr.org/12",
        )

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        dirs = self._split_dirs
        if dirs is None:
            dirs = [d for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))]
            dirs = [d for d in dirs if not d.startswith(("_", "."))]
        return {split_name(d): self._generate_examples(os.path.join(root, d)) for d in dirs}

    def _generate_examples(self, split_dir):
        skipped = 0
        for utt_id, flac, text, speaker, chapter in scan_split(split_dir):
            try:
                audio = load_audio(flac, SAMPLE_RATE)
            except AudioDecodeError as e:
                skipped += 1
                log.warning("librispeech_local: skipping %s (%d skipped so far)", e, skipped)
                continue
            pcm = np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)
            yield (
                utt_id,
                {
                    "id": utt_id,
                    "audio": pcm,
                    "text": text,
                    "speaker_id": speaker,
                    "chapter_id": chapter,
                },
            )


def open_librispeech_dir(
    root: str | os.PathLike, split: str, *, data_dir: str | os.PathLike | None = None
) -> TfdsSource:
    """A split folder of a local LibriSpeech-layout directory as a source.

    ``split`` is the folder name (``dev-clean``) or several joined with ``+``. Each folder is
    prepared once (TFDS ``librispeech_local``) into ``<data_dir>/<folder>``, default
    ``<root>/_tfds/<folder>``; later calls only read.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"LibriSpeech root not found: {root} (layout {_LAYOUT})")
    base = os.fspath(data_dir) if data_dir is not None else os.path.join(root, "_tfds")
    sources = []
    for folder in split.split("+"):
        if not os.path.isdir(os.path.join(root, folder)):
            have = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
            raise FileNotFoundError(
                f"no split folder {folder!r} in {root} (layout {_LAYOUT}); found folders: {have}"
            )
        split_dir = os.path.join(base, folder)
        builder = LibrispeechLocal(data_dir=split_dir, split_dirs=(folder,))
        if not builder.is_prepared():
            scan_split(os.path.join(root, folder))  # fail fast with a layout message
            log.info("preparing %s/%s into %s (once)", root, folder, split_dir)
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=root)
            )
        sources.append(TfdsSource("librispeech_local", split_name(folder), split_dir))
    return sources[0] if len(sources) == 1 else ConcatSource(sources)
