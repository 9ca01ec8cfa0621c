"""Offline speech synthesis with the espeak-ng library that the `espeakng-loader` wheel bundles.

The wheel ships ``libespeak-ng.so`` and its ``espeak-ng-data`` folder (phonemes, dictionaries for
~100 languages, ~100 voice variants) and nothing else: no binary, no Python API beyond
``get_library_path()`` / ``get_data_path()``. We drive the C API through ctypes in synchronous
mode, where ``espeak_Synth`` returns only after the whole utterance was handed to our callback.

Determinism: espeak-ng keeps synthesis state in static variables that survive between utterances
(and even espeak_Terminate/Initialize): the phase of its pitch "flutter", and other phase-like
values of the wave generator. The same text, voice and parameters therefore give different samples
depending on what the process synthesised before. We remove what we can (every voice variant is
loaded from a private copy with ``flutter 0`` appended; espeak's noise generator is seeded per
clip), and the speech builder synthesises each fixed-size chunk of clips in a fresh process, so a
clip depends only on the chunk it is in, never on how chunks were spread over workers.
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


def prepare_data_dir(root: str | Path) -> Path:
    """Write `root`/espeak-ng-data: the wheel's data, except that every voice variant has flutter 0.

    Returns `root`, the folder to pass to `Espeak`. Entries other than the variants are symlinks.
    """
    _, wheel_data = espeak_paths()
    root = Path(root)
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
    return root


class Espeak:
    """The process's espeak-ng engine (the C library is a singleton): use `engine()`.

    `root` is a folder made by `prepare_data_dir`.
    """

    def __init__(self, root: str | Path) -> None:
        lib_path, _ = espeak_paths()
        self.root = Path(root)
        self.data = self.root / "espeak-ng-data"
        if not (self.data / "phondata").exists():
            raise DataError(
                f"{self.data}: not an espeak-ng data folder; make it with prepare_data_dir"
            )
        self.variants = sorted(p.name for p in (self.data / "voices" / "!v").iterdir())
        lib = ctypes.CDLL(str(lib_path))
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        # espeak-ng >= 1.52 (the wheel's): seeds the noise of breathy voices; older ones lack it
        self._set_seed = getattr(lib, "espeak_ng_SetRandSeed", None)
        if self._set_seed is not None:
            self._set_seed.argtypes = [ctypes.c_long]
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
            if self._set_seed is not None:
                self._set_seed(seed)
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


def engine(root: str | Path | None = None) -> Espeak:
    """This process's espeak-ng engine, created on first use.

    `root`: a `prepare_data_dir` folder; None makes one in a temporary folder removed at exit.
    """
    global _ENGINE
    if _ENGINE is None:
        if root is None:
            root = prepare_data_dir(tempfile.mkdtemp(prefix="loretta-espeak-"))
            atexit.register(shutil.rmtree, root, ignore_errors=True)
        _ENGINE = Espeak(root)
    elif root is not None and Path(root) != _ENGINE.root:
        raise DataError(
            f"this process's espeak-ng engine already uses {_ENGINE.root}, not {root}: the "
            "library holds one instance per process"
        )
    return _ENGINE
