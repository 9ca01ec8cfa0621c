"""MFCC features in numpy: pre-emphasis, framing, power spectrum, mel filterbank, log, DCT.

The usual speech-recognition recipe (as in HTK / python_speech_features), written out so the
demo needs no audio library. Shapes: a signal is (samples,), features are (frames, n_mfcc).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


@lru_cache(maxsize=16)
def mel_filterbank(
    n_mels: int, n_fft: int, sample_rate: int, fmin: float, fmax: float
) -> np.ndarray:
    """Triangular filters equally spaced on the mel scale: (n_mels, n_fft // 2 + 1)."""
    mels = np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2)
    bins = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)  # centre frequency of each FFT bin
    edges = mel_to_hz(mels)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (bins[None, :] - lo) / (mid - lo)
    down = (hi - bins[None, :]) / (hi - mid)
    fb = np.maximum(0.0, np.minimum(up, down))
    fb.setflags(write=False)  # shared through the cache
    return fb


@lru_cache(maxsize=16)
def dct_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Orthonormal DCT-II as a matrix: (n_out, n_in), so that coeffs = x @ dct.T."""
    k = np.arange(n_out)[:, None]
    n = np.arange(n_in)[None, :]
    m = np.cos(np.pi * k * (2 * n + 1) / (2 * n_in)) * np.sqrt(2.0 / n_in)
    m[0] /= np.sqrt(2.0)
    m.setflags(write=False)
    return m


def trim_silence(signal: np.ndarray, threshold_db: float = -35.0, margin: int = 0) -> np.ndarray:
    """Drop leading/trailing samples quieter than `threshold_db` below the peak."""
    x = np.asarray(signal, dtype=np.float64)
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak == 0.0:
        return x
    loud = np.flatnonzero(np.abs(x) >= peak * 10.0 ** (threshold_db / 20.0))
    return x[max(0, loud[0] - margin) : loud[-1] + 1 + margin]


def mfcc(
    signal: np.ndarray,
    sample_rate: int,
    n_mfcc: int = 13,
    n_mels: int = 26,
    win_s: float = 0.025,
    hop_s: float = 0.010,
    preemphasis: float = 0.97,
    fmin: float = 0.0,
    fmax: float | None = None,
) -> np.ndarray:
    """MFCCs of `signal` (float samples): (frames, n_mfcc), c0 (log energy) first.

    A signal shorter than one window is zero-padded to one frame.
    """
    assert n_mfcc <= n_mels, f"n_mfcc={n_mfcc} must be <= n_mels={n_mels}"
    x = np.asarray(signal, dtype=np.float64)
    # pre-emphasis lifts the high frequencies that voiced speech attenuates (~6 dB/octave)
    x = np.append(x[:1], x[1:] - preemphasis * x[:-1])
    win = round(win_s * sample_rate)
    hop = round(hop_s * sample_rate)
    if len(x) < win:
        x = np.pad(x, (0, win - len(x)))
    n_frames = 1 + (len(x) - win) // hop
    idx = np.arange(win)[None, :] + hop * np.arange(n_frames)[:, None]
    frames = x[idx] * np.hamming(win)[None, :]  # (frames, win)
    n_fft = 1 << (win - 1).bit_length()  # next power of two >= window
    power = np.abs(np.fft.rfft(frames, n_fft)) ** 2 / n_fft  # (frames, n_fft // 2 + 1)
    fb = mel_filterbank(n_mels, n_fft, sample_rate, fmin, fmax or sample_rate / 2.0)
    log_mel = np.log(np.maximum(power @ fb.T, 1e-10))  # (frames, n_mels)
    return log_mel @ dct_matrix(n_mfcc, n_mels).T  # (frames, n_mfcc)


def resample_frames(features: np.ndarray, n_frames: int) -> np.ndarray:
    """Linearly interpolate (frames, d) features along time to exactly (n_frames, d)."""
    t_in = np.linspace(0.0, 1.0, len(features))
    t_out = np.linspace(0.0, 1.0, n_frames)
    if len(features) == 1:
        return np.repeat(features, n_frames, axis=0)
    return np.stack([np.interp(t_out, t_in, col) for col in features.T], axis=1)
