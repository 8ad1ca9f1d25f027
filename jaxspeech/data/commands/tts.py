"""espeak-ng speech synthesis through ctypes, using the library and voices in `espeakng-loader`.

espeak-ng keeps global state and is not thread-safe: use one `Espeak` per process (`engine()`
returns the process-wide instance); it speaks each utterance in a forked child so that no
state carries over between utterances (POSIX only). Output is int16 at espeak's native
22050 Hz; the corpus resamples it (together with speed perturbation) in `augment.py`.

Voices are `accent+variant` names (`en-us+m3`, `en-gb-scotland+klatt2`). The variant sets are
disjoint across splits, so validation and test voices are never heard in training:
  validation variants: `VARIANTS["validation"]`, test variants: `VARIANTS["test"]`, every accent in
  `ACCENTS` appears in every split.
"""

from __future__ import annotations

import ctypes
import os
import struct
import warnings
from typing import NamedTuple

import numpy as np

NATIVE_RATE = 22050

ACCENTS = (
    "en-us",
    "en",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-029",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-us-nyc",
)
VARIANTS = {
    "train": (
        "m1",
        "m2",
        "m3",
        "m4",
        "m5",
        "m8",
        "f1",
        "f2",
        "f3",
        "klatt",
        "klatt2",
        "klatt5",
        "klatt6",
        "Alex",
        "Alicia",
        "Andrea",
        "Annie",
        "Denis",
        "Diogo",
        "Gene",
        "Henrique",
        "Hugo",
        "Jacky",
        "Michael",
        "Mike",
        "Nguyen",
        "Reed",
        "adam",
        "anika",
        "announcer",
        "aunty",
        "belinda",
        "benjamin",
        "boris",
        "caleb",
        "david",
        "ed",
        "edward",
        "edward2",
        "grandma",
        "grandpa",
        "gustave",
        "ian",
        "iven",
        "iven2",
        "john",
        "marcelo",
        "max",
        "michel",
        "miguel",
        "pablo",
        "paul",
        "pedro",
        "rob",
        "robert",
        "sandro",
        "shelby",
        "travis",
        "victor",
        "zac",
    ),
    "validation": ("m6", "f4", "klatt4", "Andy", "steph", "norbert", "iven3", "mike2"),
    "test": ("m7", "f5", "klatt3", "Lee", "linda", "quincy", "Mario", "steph2"),
}

# espeak_AUDIO_OUTPUT, espeak_PARAMETER, flags and options from speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_RATE, _ESPEAK_PITCH, _ESPEAK_RANGE = 1, 3, 4
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_INITIALIZE_DONT_EXIT = 0x8000
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


_LIBC = ctypes.CDLL(None)


class Request(NamedTuple):
    """One utterance to speak: rate in words/min (80-450), pitch and pitch_range in 0-100 (50 is
    the voice's normal), seed for espeak's noise sources (breath, aspiration)."""

    text: str
    voice: str
    rate: int = 175
    pitch: int = 50
    pitch_range: int = 50
    seed: int = 0


class EspeakError(RuntimeError):
    """espeak-ng could not be loaded, initialized, or asked to speak."""


def voices(split: str) -> tuple[str, ...]:
    """All `accent+variant` voice ids of a split."""
    return tuple(f"{a}+{v}" for a in ACCENTS for v in VARIANTS[split])


def _locate() -> tuple[str, str]:
    """(path of libespeak-ng, directory holding espeak-ng-data), with a clear error if absent."""
    try:
        import espeakng_loader
    except ImportError as e:
        raise EspeakError(
            "the spoken-commands corpus needs the `espeakng-loader` package "
            "(pip install espeakng-loader): it ships libespeak-ng and its voices"
        ) from e
    lib_path = espeakng_loader.get_library_path()
    if not os.path.exists(lib_path):
        raise EspeakError(f"espeakng-loader is installed but libespeak-ng is missing at {lib_path}")
    try:
        data_path = espeakng_loader.get_data_path()
    except RuntimeError as e:
        raise EspeakError(f"espeakng-loader is installed but its voice data is missing: {e}") from e
    return lib_path, os.path.dirname(data_path)


class Espeak:
    """One initialized espeak-ng engine (synchronous mode) that speaks each utterance in a fork."""

    def __init__(self, lib_path: str | None = None, data_dir: str | None = None):
        if lib_path is None or data_dir is None:
            found_lib, found_data = _locate()
            lib_path, data_dir = lib_path or found_lib, data_dir or found_data
        try:
            self._lib = ctypes.CDLL(lib_path)
        except OSError as e:
            raise EspeakError(f"cannot load libespeak-ng from {lib_path}: {e}") from e
        lib = self._lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        if not hasattr(lib, "espeak_ng_SetRandSeed"):
            raise EspeakError(f"{lib_path} is too old: it lacks espeak_ng_SetRandSeed (1.51+)")
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        if not os.path.isdir(os.path.join(data_dir, "espeak-ng-data")):
            raise EspeakError(
                f"espeak-ng voice data not found: {data_dir}/espeak-ng-data is "
                "missing (reinstall espeakng-loader)"
            )
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data_dir.encode(), _INITIALIZE_DONT_EXIT
        )
        if rate != NATIVE_RATE:
            raise EspeakError(
                f"espeak_Initialize failed (returned {rate}) with library "
                f"{lib_path} and data {data_dir}/espeak-ng-data"
            )
        self._variants = set(os.listdir(os.path.join(data_dir, "espeak-ng-data", "voices", "!v")))
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # keep a reference: C holds the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, num_samples, events) -> int:
        if wav and num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (num_samples,)).copy())
        return 0  # continue synthesis

    def _check_voice(self, voice: str) -> None:
        variant = voice.partition("+")[2]
        if variant and variant not in self._variants:
            raise EspeakError(f"espeak-ng has no voice variant {variant!r} (in {voice!r})")

    def _speak_here(self, text, voice, rate, pitch, pitch_range, seed) -> np.ndarray:
        """Synthesize in this process (the forked child): its espeak state is then spent."""
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise EspeakError(f"espeak-ng has no voice {voice!r}")
        for param, value in (
            (_ESPEAK_RATE, rate),
            (_ESPEAK_PITCH, pitch),
            (_ESPEAK_RANGE, pitch_range),
        ):
            if self._lib.espeak_SetParameter(param, int(value), 0) != 0:
                raise EspeakError(f"espeak_SetParameter({param}, {value}) failed")
        self._lib.espeak_ng_SetRandSeed(seed)  # breath/aspiration noise
        _LIBC.srand(seed)  # some voicing noise uses libc rand()
        self._chunks = []
        data = text.encode("utf-8")
        err = self._lib.espeak_Synth(
            data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
        )
        if err != 0:
            raise EspeakError(f"espeak_Synth failed with code {err} for {text!r}")
        if not self._chunks:
            raise EspeakError(f"espeak produced no audio for {text!r} with voice {voice!r}")
        return np.concatenate(self._chunks)

    def synthesize_many(self, requests: list[Request]) -> list[np.ndarray]:
        """Speak each request in order: int16 samples at `NATIVE_RATE` per request.

        espeak carries state from one utterance to the next (wavegen phase, timing), even with
        fixed random seeds and re-initialization. So a batch is spoken in a forked child of this
        never-used engine: the audio of request k depends only on requests 0..k of the batch,
        bit-identically in any process and order. A fork costs a few ms, as much as speaking one
        utterance, so callers batch a fixed group of utterances per fork.
        """
        if not hasattr(os, "fork"):
            raise EspeakError("the spoken-commands synthesis needs os.fork (Linux or macOS)")
        for request in requests:
            self._check_voice(request.voice)
        read_fd, write_fd = os.pipe()
        with warnings.catch_warnings():
            # JAX warns on any fork once its backend runs threads (a process that trained or
            # tested). The child here never calls JAX, imports, or takes a lock another thread
            # could hold: it runs espeak, writes a pipe and `os._exit`s.
            warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
            pid = os.fork()
        if pid == 0:  # child: speak, send status byte + length-prefixed payloads, exit
            status, parts = 0, []
            try:
                os.close(read_fd)
                for r in requests:
                    pcm = self._speak_here(*r).tobytes()
                    parts += [struct.pack("<q", len(pcm)), pcm]
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                status, parts = 1, [f"{type(e).__name__}: {e}".encode()]
            try:
                view = memoryview(b"".join([bytes([status]), *parts]))
                while view:
                    view = view[os.write(write_fd, view) :]
            finally:
                os._exit(status)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as reader:
            message = reader.read()
        _, exit_code = os.waitpid(pid, 0)
        if not message or message[0] != 0 or exit_code != 0:
            detail = message[1:].decode(errors="replace") if message else "no output"
            raise EspeakError(f"espeak synthesis failed: {detail}")
        out, pos = [], 1
        for _ in requests:
            (size,) = struct.unpack_from("<q", message, pos)
            out.append(np.frombuffer(message, np.int16, size // 2, pos + 8).copy())
            pos += 8 + size
        return out

    def synthesize(self, text: str, voice: str, **params) -> np.ndarray:
        """Speak one utterance; `params` are the other `Request` fields."""
        return self.synthesize_many([Request(text, voice, **params)])[0]


_ENGINE: Espeak | None = None


def engine() -> Espeak:
    """The process-wide engine (created on first use)."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = Espeak()
    return _ENGINE
