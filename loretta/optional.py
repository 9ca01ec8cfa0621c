"""Optional GPU packages (attention and loss kernels): installed *and* importable.

A package can be on the path yet fail to import: a missing native library, a wheel built for
another torch or CUDA, or (seen on an H200) flash-attn-4 without its CuTe DSL core package. An
'auto' choice then falls back to the next candidate instead of crashing the job after start-up,
and an explicit choice is refused with the import error and the fix."""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Any


def find_spec(name: str) -> Any:
    """importlib's spec for `name`, or None (also when a parent package fails to import)."""
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


@functools.cache
def import_problem(module: str, install: str) -> str | None:
    """None when `module` imports; else why not, with `install` (the pip command) as the fix."""
    if find_spec(module) is None:
        return f"{module!r} is not installed ({install})"
    try:
        importlib.import_module(module)
    except Exception as e:  # any failure of a third-party import: report it, choose another
        return (
            f"{module!r} is installed but fails to import ({type(e).__name__}: {e}); "
            f"reinstall it with its dependencies ({install})"
        )
    return None
