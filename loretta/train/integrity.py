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


def list_files(folder: Path) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(folder):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), folder).replace(os.sep, "/")
            if rel != MANIFEST and not rel.startswith(DERIVED):
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
