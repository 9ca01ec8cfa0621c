"""File manifests for checkpoint folders: what was written, and whether it is still intact.

    write_manifest(folder)          -> manifest.json: {relative path: {size, crc32}} of every file
    verify(folder, full=True)       -> list of problems ("ds/x.pt: 812 bytes, manifest says 4096")

Rank 0 writes the manifest last, after the barrier that follows every rank's writes, so it
lists all ranks' files. Before any process group starts, the chosen checkpoint is checked
against it: a missing, truncated, grown, flipped or unlisted file is reported by name, and
DeepSpeed's own loader only ever opens files that passed. Checksums are CRC-32 (zlib), read in
8 MiB blocks on a thread pool (zlib releases the GIL), so the check runs at disk speed. CRC-32
finds accidental damage (bit flips, truncation, partial copies); it is not a signature: someone
who can write the folder can write a matching manifest too (see checkpoint.py: no file in a
checkpoint is unpickled).
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from loretta.data.format import atomic_write_json

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
BLOCK = 8 << 20
# made later, on demand, from the verified ds/ files (resume at another world size)
DERIVED = ("universal/",)


def crc32_file(path: Path) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return crc


def _workers() -> int:
    return max(4, min(16, 2 * (os.cpu_count() or 1)))


def list_files(folder: Path, derived: bool = False) -> list[str]:
    """Files under `folder` but the manifest (and the derived universal/ unless `derived`)."""
    out = []
    for dirpath, _, names in os.walk(folder):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), folder).replace(os.sep, "/")
            if rel != MANIFEST and (derived or not rel.startswith(DERIVED)):
                out.append(rel)
    return sorted(out)


def build_manifest(folder: Path) -> dict[str, Any]:
    files = list_files(folder)
    with ThreadPoolExecutor(_workers()) as pool:
        crcs = list(pool.map(lambda rel: crc32_file(folder / rel), files))
    return {
        "version": MANIFEST_VERSION,
        "checksum": "crc32",
        "files": {
            rel: {"size": (folder / rel).stat().st_size, "crc32": f"{c:08x}"}
            for rel, c in zip(files, crcs)
        },
    }


def write_manifest(folder: Path) -> dict[str, Any]:
    m = build_manifest(folder)
    atomic_write_json(folder / MANIFEST, m)
    return m


def read_manifest(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """(manifest, problem): (None, '') when there is none; (None, why) when it is unreadable."""
    f = folder / MANIFEST
    if not f.exists():
        return None, ""
    try:
        m = json.loads(f.read_text())
        files = m["files"]
        if not isinstance(files, dict) or m.get("checksum") != "crc32":
            raise ValueError("no 'files' mapping or an unknown checksum")
        for rel, e in files.items():
            if rel.startswith("/") or ".." in rel.split("/"):
                raise ValueError(f"path {rel!r} leaves the folder")
            int(e["size"]), int(e["crc32"], 16)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"{MANIFEST}: unreadable ({e})"
    return m, ""


def verify(folder: Path, full: bool = True) -> list[str]:
    """Problems of `folder` against its manifest ([] = intact). `full=False` checks presence
    and sizes only (no reading)."""
    m, bad = read_manifest(folder)
    if bad:
        return [bad]
    if m is None:
        return [f"{MANIFEST}: missing (the save did not finish, or the file was deleted)"]
    want: dict[str, dict[str, Any]] = m["files"]
    problems: list[str] = []
    to_read = []
    for rel, e in want.items():
        p = folder / rel
        try:
            size = p.stat().st_size
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if size != int(e["size"]):
            what = "truncated" if size < int(e["size"]) else "grown"
            problems.append(f"{rel}: {what}: {size} bytes, the manifest says {e['size']}")
        elif full:
            to_read.append(rel)
    extra = [rel for rel in list_files(folder) if rel not in want]
    problems += [f"{rel}: not in the manifest (added after the save)" for rel in extra]
    if to_read:
        with ThreadPoolExecutor(_workers()) as pool:
            crcs = list(pool.map(lambda rel: _crc_or_none(folder / rel), to_read))
        for rel, c in zip(to_read, crcs):
            if c is None:
                problems.append(f"{rel}: unreadable")
            elif c != int(want[rel]["crc32"], 16):
                problems.append(
                    f"{rel}: contents changed (crc32 {c:08x}, the manifest says "
                    f"{want[rel]['crc32']})"
                )
    return problems


def _crc_or_none(path: Path) -> int | None:
    try:
        return crc32_file(path)
    except OSError:
        return None


def total_bytes(folder: Path) -> int:
    m, _ = read_manifest(folder)
    return sum(int(e["size"]) for e in m["files"].values()) if m else 0


# ---- pickles DeepSpeed will load ---------------------------------------------------------------
# DeepSpeed's own loads run weights-only (loretta.engine.weights_only_loads). Before any
# process group starts, every .pt file's pickle is also read as opcodes (nothing is executed)
# and each global it references must be one of these: torch's tensor rebuilders, storages,
# dtypes and sizes, plain containers, and DeepSpeed's own config enums, so a hostile file is
# reported by name up front rather than failing inside DeepSpeed.
SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),  # calls only globals that are checked too
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
}
_TORCH_DTYPES = {
    "float32", "float", "float16", "half", "bfloat16", "float64", "double", "int64", "long",
    "int32", "int", "int16", "int8", "uint8", "bool",
}  # fmt: skip


def _global_ok(module: str, name: str) -> bool:
    if (module, name) in SAFE_GLOBALS:
        return True
    return module == "torch" and (name.endswith("Storage") or name in _TORCH_DTYPES)


def pickle_globals(data: bytes) -> list[tuple[str, str]]:
    """Every (module, name) a pickle would import, read from its opcodes without running it.
    A STACK_GLOBAL whose two names are not the two values pushed just before it (the way
    pickle writes them) comes back as ('?', '?'): unresolved, hence refused."""
    import pickletools

    found: list[tuple[str, str]] = []
    pushed: list[str | None] = []  # per value-pushing opcode: the string, or None
    memo: dict[int, str | None] = {}
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in ("GLOBAL", "INST"):
            mod, _, attr = str(arg).partition(" ")
            found.append((mod, attr))
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            a, b = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
            found.append((a, b) if a is not None and b is not None else ("?", "?"))
            pushed.append(None)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(str(arg))] = pushed[-1] if pushed else None
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(int(str(arg))))
        elif isinstance(arg, str) and ("UNICODE" in name or "STRING" in name):
            pushed.append(arg)
        else:
            pushed.append(None)
    return found


def unsafe_pickle_globals(path: Path) -> list[str]:
    """Globals in a torch file (zip or legacy pickle) that loading it would call or import."""
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                blobs = [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
        else:
            blobs = [path.read_bytes()]
        refs = [g for b in blobs for g in pickle_globals(b)]
    except Exception as e:  # a pickle we cannot even read as opcodes is not loaded either
        return [f"unreadable pickle ({type(e).__name__}: {e})"]
    return sorted({f"{m}.{n}" for m, n in refs if not _global_ok(m, n)})


def check_pickles(folder: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Problems of the torch files under `folder` (but those starting with `skip`) that
    DeepSpeed would unpickle."""
    problems = []
    for rel in list_files(folder, derived=True):  # universal/ too: DeepSpeed unpickles it
        if rel.endswith((".pt", ".pth", ".bin", ".pkl")) and not rel.startswith(skip):
            bad = unsafe_pickle_globals(folder / rel)
            if bad:
                problems.append(
                    f"{rel}: its pickle references {', '.join(bad[:5])}, which loading would "
                    "run; refusing to load it"
                )
    return problems
