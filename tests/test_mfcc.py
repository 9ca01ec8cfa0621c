"""loretta/demo/mfcc.py against librosa (the `dev` extra), on synthetic signals.

The reference is assembled from librosa's own pieces with our recipe's settings: pre-emphasis
(zi=0: the first sample is kept), a Hamming window of win_s zero-padded to the next power of
two (librosa's window array, center=False), |STFT|^2 / n_fft, HTK-style unnormalised mel
triangles, natural log floored at 1e-10, orthonormal DCT-II. Everything is float64 and the two
differ only in summation order (numpy's rfft and a DCT matrix here, scipy's FFT/DCT there):
about 1e-14 measured on coefficients of magnitude ~30, so atol=1e-8 is loose enough to be
stable and still catches any change of recipe (a window, scale or filter edge moves the
coefficients by 1e-3 or more).
"""

from __future__ import annotations

import numpy as np
import pytest

from loretta.demo.mfcc import mel_filterbank, mfcc


def signal(sr: int, seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(0)
    tone = 0.6 * np.sin(2 * np.pi * 440 * t) * np.exp(-3 * t)
    chirp = 0.3 * np.sin(2 * np.pi * (300 + 0.25 * sr * t) * t)
    return tone + chirp + 0.05 * rng.standard_normal(t.size)


def reference(
    x: np.ndarray, sr: int, n_mfcc: int, n_mels: int, fmin: float, fmax: float
) -> np.ndarray:
    import librosa

    win, hop = round(0.025 * sr), round(0.010 * sr)
    n_fft = 1 << (win - 1).bit_length()
    y = librosa.effects.preemphasis(x, coef=0.97, zi=0.0)
    # frames of n_fft samples whose last n_fft - win get a zero weight = our frames of win
    # samples zero-padded to n_fft; pad the end so both cut the same number of frames
    y = np.pad(y, (0, n_fft - win + max(0, win - len(y))))
    window = np.pad(np.hamming(win), (0, n_fft - win))
    spec = librosa.stft(
        y, n_fft=n_fft, hop_length=hop, win_length=n_fft, window=window, center=False
    )
    power = np.abs(spec) ** 2 / n_fft
    mel = librosa.feature.melspectrogram(
        S=power, sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=True, norm=None,
        dtype=np.float64,
    )  # fmt: skip
    log_mel = np.log(np.maximum(mel, 1e-10))
    return librosa.feature.mfcc(S=log_mel, n_mfcc=n_mfcc, dct_type=2, norm="ortho").T


@pytest.mark.parametrize(
    ("sr", "seconds", "n_mfcc", "n_mels", "fmin", "fmax"),
    [
        (16000, 0.5, 13, 26, 0.0, 8000.0),  # the demo's settings
        (8000, 0.3, 20, 40, 100.0, 3500.0),
        (16000, 0.01, 13, 26, 0.0, 8000.0),  # shorter than one window: one zero-padded frame
    ],
)
def test_mfcc_matches_librosa(
    sr: int, seconds: float, n_mfcc: int, n_mels: int, fmin: float, fmax: float
) -> None:
    import librosa

    x = signal(sr, seconds)
    ours = mfcc(x, sr, n_mfcc=n_mfcc, n_mels=n_mels, fmin=fmin, fmax=fmax)
    ref = reference(x, sr, n_mfcc, n_mels, fmin, fmax)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-8)
    n_fft = 1 << (round(0.025 * sr) - 1).bit_length()
    fb = librosa.filters.mel(
        sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=True, norm=None,
        dtype=np.float64,
    )  # fmt: skip
    np.testing.assert_allclose(mel_filterbank(n_mels, n_fft, sr, fmin, fmax), fb, atol=1e-12)
