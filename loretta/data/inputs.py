"""The inputs of `loretta-shards write`: pre-tokenized samples (local ids) read from

* a folder of .npz files, one per sample, arrays named by modality, key = file name;
* a folder of {key}.{modality}.npy files (an unpacked webdataset tar);
* JSON lines {"key": ..., "<modality>": [ids], "meta": {...}}: a .jsonl file or a folder of them.

Next to an .npz or .npy sample, {key}.json holds its metadata. Every sample is checked against
the layout as it is read; errors name the file (and line), the field, the value and the fix.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from loretta.data.format import KEY_BYTES, check_ids, parse_npy
from loretta.data.shards import Sample
from loretta.errors import DataError
from loretta.vocab import VocabLayout


def _check_key(key: str, where: str, seen: set[str]) -> None:
    if not key or "." in key or len(key.encode()) > KEY_BYTES:
        raise DataError(
            f"{where}: sample key {key!r} must be 1..{KEY_BYTES} bytes without '.'; rename it"
        )
    if key in seen:
        raise DataError(f"{where}: sample key {key!r} appears twice; keys must be unique")
    seen.add(key)


def _not_a_modality(name: str, layout: VocabLayout, where: str) -> DataError:
    return DataError(
        f"{where}: {name!r} is not a modality of the layout {layout.names}; rename it, "
        f"or add it to the layout (`loretta-shards layout ... --modality {name}=SIZE`)"
    )


def _check_arrays(values: dict[str, Any], layout: VocabLayout, where: str) -> dict[str, Any]:
    """Validated 1-D integer id arrays per modality (empty ones are left out: absent)."""
    out: dict[str, Any] = {}
    for name, v in values.items():
        if name not in layout:
            raise _not_a_modality(name, layout, where)
        arr = np.asarray(v)
        if arr.size == 0 and arr.ndim == 1:
            continue
        if arr.dtype == object:
            raise DataError(f"{where}: {name} must be a flat list of integer ids (got {v!r:.60})")
        check_ids(arr, layout[name].size, f"{where}: {name}")
        fixed = layout[name].fixed_length
        if fixed is not None and arr.size != fixed:
            raise DataError(
                f"{where}: {name} has {arr.size} tokens but the layout fixes {name} at {fixed}; "
                "re-tokenise the sample, or drop --fixed from the layout"
            )
        out[name] = arr
    if not out:
        raise DataError(f"{where}: no token ids for any modality of the layout {layout.names}")
    return out


def _sidecar_meta(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise DataError(f"{path}: metadata must be a JSON object, got {type(meta).__name__}")
    return meta


def _read_npz(files: list[Path], layout: VocabLayout) -> Iterator[Sample]:
    seen: set[str] = set()
    for f in files:
        key = f.name[: -len(".npz")]
        _check_key(key, str(f), seen)
        try:
            with np.load(f, allow_pickle=False) as z:
                if not isinstance(z, np.lib.npyio.NpzFile):
                    raise ValueError("not an .npz archive")
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{f}: unreadable .npz ({type(e).__name__}: {e})") from e
        meta = _sidecar_meta(f.with_name(f"{key}.json"))
        yield {"key": key, **_check_arrays(arrays, layout, str(f)), "meta": meta}


def _npy_groups(folder: Path) -> dict[str, dict[str, Path]]:
    groups: dict[str, dict[str, Path]] = {}
    for f in sorted(folder.glob("*.npy")):
        key, rest = f.name.split(".", 1)
        groups.setdefault(key, {})[rest[: -len(".npy")]] = f
    return groups


def _read_npy(groups: dict[str, dict[str, Path]], layout: VocabLayout) -> Iterator[Sample]:
    seen: set[str] = set()
    for key in sorted(groups):
        files = groups[key]
        where = str(next(iter(files.values())).with_name(f"{key}.*.npy"))
        _check_key(key, where, seen)
        arrays = {}
        for mod, f in files.items():
            if mod not in layout:
                raise _not_a_modality(mod, layout, str(f))
            arrays[mod] = parse_npy(f.read_bytes(), str(f))
        meta = _sidecar_meta(f.parent / f"{key}.json")
        yield {"key": key, **_check_arrays(arrays, layout, where), "meta": meta}


def _read_jsonl(files: list[Path], layout: VocabLayout) -> Iterator[Sample]:
    seen: set[str] = set()
    for f in files:
        with open(f, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{f}:{lineno}"
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise DataError(f"{where}: not valid JSON ({e})") from e
                if not isinstance(obj, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                key = obj.pop("key", None)
                if not isinstance(key, str):
                    raise DataError(
                        f'{where}: "key" is {key!r}; every line needs a string "key" field'
                    )
                _check_key(key, where, seen)
                meta = obj.pop("meta", None) or {}
                if not isinstance(meta, dict):
                    raise DataError(f'{where}: "meta" must be a JSON object, got {meta!r:.60}')
                yield {"key": key, **_check_arrays(obj, layout, where), "meta": meta}


def _count_lines(files: list[Path]) -> int:
    n = 0
    for f in files:
        with open(f, "rb") as fh:
            n += sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    return n


def open_input(path: Path, fmt: str, layout: VocabLayout) -> tuple[Iterator[Sample], int]:
    """The samples of a `write` input and their count."""
    if not path.exists():
        raise DataError(f"input {path} does not exist")
    kinds = {"npz": "*.npz", "npy": "*.npy", "jsonl": "*.jsonl"}
    if path.is_file():
        if fmt == "auto" and path.suffix not in (".jsonl", ".json", ".ndjson"):
            raise DataError(
                f"{path}: a single input file must be JSON lines (.jsonl); give a folder of .npz "
                "or {key}.{modality}.npy files, or pass --format jsonl"
            )
        if fmt not in ("auto", "jsonl"):
            raise DataError(f"{path}: --format {fmt} needs a folder, not a file")
        return _read_jsonl([path], layout), _count_lines([path])
    if fmt == "auto":
        found = [k for k, pat in kinds.items() if next(path.glob(pat), None) is not None]
        if not found:
            raise DataError(
                f"{path}: no .npz, .npy or .jsonl files found; see `loretta-shards write --help` for the "
                "input formats"
            )
        if len(found) > 1:
            raise DataError(f"{path}: holds {found} files; choose one with --format")
        fmt = found[0]
    files = sorted(path.glob(kinds[fmt]))
    if not files:
        raise DataError(f"{path}: no {kinds[fmt]} files found (--format {fmt})")
    if fmt == "npz":
        return _read_npz(files, layout), len(files)
    if fmt == "npy":
        groups = _npy_groups(path)
        return _read_npy(groups, layout), len(groups)
    return _read_jsonl(files, layout), _count_lines(files)


def sample_bytes(s: Sample) -> int:
    """Approximate tar bytes of a sample: members of 512-byte blocks with a 512-byte header."""
    sizes = [128 + np.asarray(v).nbytes for k, v in s.items() if k not in ("key", "meta")]
    sizes.append(len(json.dumps(s.get("meta") or {})))
    return sum(512 + -(-n // 512) * 512 for n in sizes)
