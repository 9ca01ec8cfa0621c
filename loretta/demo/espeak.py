"""Offline speech synthesis with the espeak-ng library that the `espeakng-loader` wheel bundles.

The wheel ships ``libespeak-ng.so`` and its ``espeak-ng-data`` folder (phonemes, dictionaries for
~100 languages, ~100 voice variants) and nothing else: no binary, no Python API beyond
``get_library_path()`` / ``get_data_path()``. We drive the C API through ctypes in synchronous
mode, where ``espeak_Synth`` returns only after the whole utterance was handed to our callback.

Determinism: espeak-ng keeps the phase of its pitch "flutter" in a static variable that survives
between utterances (even across ``espeak_Terminate``/``espeak_Initialize``), so the same text,
voice and parameters give different samples depending on what the process synthesised before.
That would make a dataset depend on how clips were spread over worker processes. We therefore
point espeak at a private data folder whose voice variants are the wheel's with ``flutter 0``
appended (every other entry is a symlink to the wheel's data), and seed espeak's noise generator
before every clip: a clip is then a pure function of its arguments.
"""

from __future__ import annotations

import atexit
import ctypes
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from loretta.errors import DataError

INSTALL_HINT = "install it with `pip install espeakng-loader` (a wheel bundling libespeak-ng)"

# espeak_AUDIO_OUTPUT and espeak_PARAMETER values from speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_RATE, _PITCH, _RANGE = 1, 3, 4
_EE_OK = 0

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


def espeak_paths() -> tuple[Path, Path]:
    """(library, data folder) shipped by the espeakng-loader wheel; a DataError if absent."""
    try:
        import espeakng_loader
    except ImportError:
        raise DataError(
            f"speech synthesis needs the espeakng-loader package: {INSTALL_HINT}"
        ) from None
    lib, data = Path(espeakng_loader.get_library_path()), Path(espeakng_loader.get_data_path())
    if not lib.is_file() or not (data / "phondata").is_file():
        raise DataError(
            f"espeakng-loader is installed but its library {lib} or data {data}/phondata is "
            f"missing; reinstall it (`pip install --force-reinstall espeakng-loader`)"
        )
    return lib, data


def _private_data_dir(wheel_data: Path) -> Path:
    """A data folder identical to the wheel's except that every voice variant has flutter 0."""
    root = Path(tempfile.mkdtemp(prefix="loretta-espeak-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    data = root / "espeak-ng-data"
    variants = data / "voices" / "!v"
    variants.mkdir(parents=True)
    for entry in wheel_data.iterdir():
        if entry.name == "voices":
            continue
        try:
            (data / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
        except OSError:  # no symlinks on this file system: copy (about 20 MB)
            if entry.is_dir():
                shutil.copytree(entry, data / entry.name)
            else:
                shutil.copy2(entry, data / entry.name)
    for src in (wheel_data / "voices" / "!v").iterdir():
        if src.is_file():
            # a later keyword overrides an earlier one in espeak's voice files
            text = src.read_text(encoding="utf-8", errors="replace")
            (variants / src.name).write_text(text.rstrip("\n") + "\nflutter 0\n", encoding="utf-8")
    return data


class Espeak:
    """The process's espeak-ng engine (the C library is a singleton): use `engine()`."""

    def __init__(self) -> None:
        lib_path, wheel_data = espeak_paths()
        self.data = _private_data_dir(wheel_data)
        self.variants = sorted(p.name for p in (self.data / "voices" / "!v").iterdir())
        lib = ctypes.CDLL(str(lib_path))
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        # the documented argument is the folder that *contains* espeak-ng-data
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data.parent).encode(), 0
        )
        if rate <= 0:
            raise DataError(f"espeak-ng failed to initialise with data folder {self.data}")
        self.sample_rate = int(rate)
        self._lib = lib
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._on_audio)  # keep a reference: C holds a pointer
        lib.espeak_SetSynthCallback(self._callback)
        self._lock = threading.Lock()  # one utterance at a time: the library has global state

    def _on_audio(self, wav: Any, n: int, _events: Any) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue synthesis

    def synth(
        self,
        text: str,
        voice: str,
        rate: int = 175,
        pitch: int = 50,
        pitch_range: int = 50,
        seed: int = 0,
    ) -> np.ndarray:
        """int16 samples at `sample_rate` of `text` read by `voice` (e.g. "en-us+m3").

        rate: words per minute (80..450); pitch and pitch_range: 0..100 (espeak's defaults 50).
        """
        with self._lock:
            status = self._lib.espeak_SetVoiceByName(voice.encode())
            if status != _EE_OK:
                raise DataError(
                    f"espeak-ng has no voice {voice!r} (status {status}); use a language code of "
                    f"espeak-ng-data/lang, optionally '+variant' with a variant of {self.variants[:8]}..."
                )
            for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range)):
                self._lib.espeak_SetParameter(param, int(value), 0)
            self._lib.espeak_ng_SetRandSeed(seed)
            self._chunks = []
            data = text.encode() + b"\0"
            status = self._lib.espeak_Synth(data, len(data), 0, 0, 0, 0, None, None)
            if status != _EE_OK:
                raise DataError(
                    f"espeak-ng failed to synthesise {text!r} with {voice!r} ({status})"
                )
            chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)


_ENGINE: Espeak | None = None


def engine() -> Espeak:
    """This process's espeak-ng engine, created on first use."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = Espeak()
    return _ENGINE
