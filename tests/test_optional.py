"""Optional GPU packages count as available only when they import: a broken install makes 'auto'
fall back and an explicit choice name the import error (seen on an H200: flash-attn-4 without
its CuTe DSL core package crashed every job that resolved 'auto' to it)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loretta.model.attention import backend_available, resolve_backend
from loretta.optional import import_problem


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    import_problem.cache_clear()
    yield tmp_path
    import_problem.cache_clear()
    for name in set(sys.modules) - before:
        del sys.modules[name]


def write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_import_problem_tells_missing_broken_and_good_apart(site: Path) -> None:
    write(site, "lor_good_pkg/__init__.py", "X = 1\n")
    write(site, "lor_broken_pkg/__init__.py", "raise ImportError('libfoo.so: cannot open')\n")
    assert import_problem("lor_good_pkg", "pip install good") is None
    missing = import_problem("lor_missing_pkg", "pip install missing")
    assert missing is not None and "not installed" in missing and "pip install missing" in missing
    broken = import_problem("lor_broken_pkg", "pip install broken")
    assert broken is not None
    assert "fails to import" in broken and "libfoo.so" in broken and "pip install broken" in broken


def test_broken_flash_attn_4_is_not_chosen(site: Path) -> None:
    # flash-attn-4's layout: flash_attn/ is a namespace package, flash_attn/cute/ the kernels
    write(site, "flash_attn/cute/__init__.py", "import cutlass.cute  # its DSL, not installed\n")
    cuda = torch.device("cuda")  # the import check comes before any CUDA call
    ok, why = backend_available("flash_attn_4", cuda)
    assert not ok
    assert "flash_attn.cute" in why and "fails to import" in why and "cutlass" in why
    assert resolve_backend("auto", cuda) not in ("flash_attn_4", "flash_attn")
