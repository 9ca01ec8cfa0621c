"""Spoken digits synthesised offline (espeak-ng), as fixed-size MFCC token grids.

A clip is described by a `ClipSpec` (word, voice, rate, pitch, noise level, seed). espeak-ng's
output also depends on what the process synthesised before (see loretta/demo/espeak.py), so
`compute_features` synthesises fixed chunks of `SYNTH_CHUNK` clips, each in a fresh process: the
features are then a function of the spec list alone, whatever the number of workers.
Features: trim silence, add white noise at the spec's SNR (synthetic speech is otherwise
unnaturally clean), MFCC with 25 ms windows and 10 ms hops, then a fixed number of frames:
"stretch" interpolates the whole word onto `frames` steps (rate-invariant, nothing cut),
"pad" keeps 10 ms frames, centring the word in silence-plus-noise or cutting its ends.
Binning turns each coefficient into `levels` ids with edges fitted on training clips only.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Literal

import numpy as np

from loretta.demo.espeak import engine, prepare_data_dir
from loretta.demo.mfcc import mfcc, resample_frames, trim_silence

FrameMode = Literal["stretch", "pad"]
Binning = Literal["quantile", "uniform"]

# espeak voices per spoken language: accents (language codes of espeak-ng-data/lang) and the
# num2words code that spells the digit words. English has many accents, so it varies most.
SPEECH_LANGUAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "en": (
        ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc",
         "en-gb-x-gbclan", "en-gb-x-gbcwmd"),
        "en",
    ),
    "de": (("de",), "de"),
    "fr": (("fr", "fr-be", "fr-ch"), "fr"),
    "es": (("es", "es-419"), "es"),
    "it": (("it",), "it"),
    "nl": (("nl",), "nl"),
    "pt": (("pt", "pt-br"), "pt"),
    "sv": (("sv",), "sv"),
}  # fmt: skip
# Voice variants of the espeakng-loader data that sound like speech (not whisper/robot effects).
VOICE_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "Andy", "Annie", "Denis", "Michael", "edward", "john", "linda",
    "max", "norbert", "paul", "rob", "robert", "steph", "travis", "victor", "zac",
)  # fmt: skip
RATE_WPM = (120, 260)  # espeak words per minute (default 175)
PITCH = (20, 80)  # espeak 0..100 (default 50)
PITCH_RANGE = (20, 80)  # intonation range 0..100 (default 50)
HOP_S, WIN_S = 0.010, 0.025
SYNTH_CHUNK = 500  # clips per fresh process; part of what defines the data (see module doc)


@dataclass(frozen=True)
class ClipSpec:
    label: int
    word: str
    voice: str  # "accent+variant", e.g. "en-us+m3"
    rate: int
    pitch: int
    pitch_range: int
    snr_db: float
    seed: int

    def key(self) -> tuple[str, str, int, int, int]:
        """What makes two clips sound different (noise aside)."""
        return (self.word, self.voice, self.rate, self.pitch, self.pitch_range)


def draw_clip_specs(
    words: dict[str, list[str]],
    counts: Sequence[int],
    snr_db: Sequence[float],
    seed: int,
) -> list[list[ClipSpec]]:
    """For each class c, `counts[c]` clips with distinct (word, voice, rate, pitch, range).

    `words` maps a spoken language ("en") to its ten digit words. Distinct specs mean no clip
    appears twice anywhere, so splits cut from these lists share no clip.
    """
    rng = np.random.default_rng([seed, 0x5BEEC4])
    langs = sorted(words)
    seen: set[tuple[str, str, int, int, int]] = set()
    out: list[list[ClipSpec]] = []
    for c, n in enumerate(counts):
        specs: list[ClipSpec] = []
        while len(specs) < n:
            lang = langs[int(rng.integers(len(langs)))]
            accents = SPEECH_LANGUAGES[lang][0]
            accent = accents[int(rng.integers(len(accents)))]
            variant = VOICE_VARIANTS[int(rng.integers(len(VOICE_VARIANTS)))]
            spec = ClipSpec(
                label=c,
                word=words[lang][c],
                voice=f"{accent}+{variant}",
                rate=int(rng.integers(RATE_WPM[0], RATE_WPM[1] + 1)),
                pitch=int(rng.integers(PITCH[0], PITCH[1] + 1)),
                pitch_range=int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
                snr_db=round(float(rng.uniform(snr_db[0], snr_db[1])), 2),
                seed=int(rng.integers(1 << 31)),
            )
            if spec.key() not in seen:  # a repeat would be the same clip in two places
                seen.add(spec.key())
                specs.append(spec)
        out.append(specs)
    return out


@dataclass(frozen=True)
class FeatureSpec:
    frames: int = 39
    coeffs: int = 13
    mels: int = 26
    frame_mode: FrameMode = "stretch"


def clip_audio(spec: ClipSpec, espeak_root: str | Path | None = None) -> tuple[np.ndarray, int]:
    """(float samples in [-1, 1], sample rate) of the spoken word, silence trimmed."""
    eng = engine(espeak_root)
    wav = eng.synth(spec.word, spec.voice, spec.rate, spec.pitch, spec.pitch_range, spec.seed)
    return trim_silence(wav.astype(np.float64) / 32768.0), eng.sample_rate


def clip_features(
    spec: ClipSpec, feat: FeatureSpec, espeak_root: str | Path | None = None
) -> np.ndarray:
    """(frames, coeffs) float32 MFCCs of one clip, synthesised in this process."""
    x, sr = clip_audio(spec, espeak_root)
    power = float(np.mean(x**2)) if x.size else 0.0  # of the word alone, before any padding
    if feat.frame_mode == "pad":
        want = round(((feat.frames - 1) * HOP_S + WIN_S) * sr)
        if len(x) < want:
            left = (want - len(x)) // 2
            x = np.pad(x, (left, want - len(x) - left))
        else:
            cut = (len(x) - want) // 2
            x = x[cut : cut + want]
    rng = np.random.default_rng(spec.seed)
    x = x + rng.normal(0.0, np.sqrt(power / 10.0 ** (spec.snr_db / 10.0)), size=x.shape)
    m = mfcc(x, sr, n_mfcc=feat.coeffs, n_mels=feat.mels, win_s=WIN_S, hop_s=HOP_S)
    if feat.frame_mode == "stretch":
        m = resample_frames(m, feat.frames)
    assert m.shape == (feat.frames, feat.coeffs), (m.shape, feat)
    return m.astype(np.float32)


def _chunk_task(args: tuple[list[ClipSpec], FeatureSpec, str]) -> np.ndarray:
    specs, feat, root = args
    return np.stack([clip_features(s, feat, root) for s in specs])


def compute_features(specs: Sequence[ClipSpec], feat: FeatureSpec, workers: int = 1) -> np.ndarray:
    """(len(specs), frames, coeffs) MFCCs; bit-identical for any number of `workers`."""
    if not specs:
        return np.zeros((0, feat.frames, feat.coeffs), np.float32)
    with tempfile.TemporaryDirectory(prefix="loretta-espeak-") as tmp:
        root = str(prepare_data_dir(tmp))
        tasks = [
            (list(specs[i : i + SYNTH_CHUNK]), feat, root)
            for i in range(0, len(specs), SYNTH_CHUNK)
        ]
        # spawn (not fork: the caller may hold threads) a fresh process per chunk
        ctx = get_context("spawn")
        with ctx.Pool(max(1, min(workers, len(tasks))), maxtasksperchild=1) as pool:
            return np.concatenate(pool.map(_chunk_task, tasks, chunksize=1))


def default_workers() -> int:
    """Processes for speech synthesis: the CPUs this process may use, at most 4."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, cpus or 1))


# ---- binning --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpeechBins:
    """Per-coefficient bin edges (coeffs, levels - 1) and centres (coeffs, levels), MFCC units."""

    edges: np.ndarray
    centres: np.ndarray

    @classmethod
    def fit(cls, train: np.ndarray, levels: int, mode: Binning) -> SpeechBins:
        """Fit on training features (n, frames, coeffs) only, so test clips do not leak in."""
        values = train.reshape(-1, train.shape[-1]).astype(np.float64)  # (n * frames, coeffs)
        if mode == "quantile":
            # equal-frequency bins use every id about equally often: no wasted vocabulary
            qs = np.linspace(0.0, 1.0, levels + 1)[1:-1]
            edges = np.quantile(values, qs, axis=0).T  # (coeffs, levels - 1)
        else:  # z-score, then equal-width bins over +-3 standard deviations
            mean, std = values.mean(axis=0), values.std(axis=0) + 1e-8
            z = np.linspace(-3.0, 3.0, levels + 1)[1:-1]
            edges = mean[:, None] + std[:, None] * z[None, :]
        centres = np.empty((values.shape[1], levels))
        for k in range(values.shape[1]):
            ids = np.searchsorted(edges[k], values[:, k], side="right")
            for b in range(levels):
                hit = values[ids == b, k]
                if hit.size:
                    centres[k, b] = np.median(hit)
                else:  # an empty bin (ties in the data): its edges' midpoint
                    lo = edges[k, b - 1] if b > 0 else edges[k, 0]
                    hi = edges[k, b] if b < levels - 1 else edges[k, -1]
                    centres[k, b] = (lo + hi) / 2.0
        return cls(edges, centres)

    @property
    def levels(self) -> int:
        return int(self.centres.shape[1])

    def tokenize(self, feats: np.ndarray) -> np.ndarray:
        """(n, frames, coeffs) -> (n, frames * coeffs) ids, frame-major (frame 0's coeffs first)."""
        ids = np.empty(feats.shape, dtype=np.int64)
        for k in range(feats.shape[-1]):
            ids[..., k] = np.searchsorted(self.edges[k], feats[..., k], side="right")
        return ids.reshape(len(feats), -1)

    def decode(self, ids: np.ndarray, frames: int) -> np.ndarray:
        """Ids of one clip -> (frames, coeffs) approximate MFCCs (each bin's median value)."""
        grid = np.asarray(ids, dtype=np.int64).reshape(frames, -1)
        return self.centres[np.arange(grid.shape[1])[None, :], grid]
