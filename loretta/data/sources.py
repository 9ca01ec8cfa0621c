"""Opening a dataset of either backend: the one module that knows both webdataset shards
(loretta/data/shards.py) and MDS (loretta/data/mds.py).

`open_dataset(path)` decides by the dataset's manifest.json: format "loretta-mds" is MDS,
anything else our webdataset tars. A folder without a manifest is refused with the command
that makes one (`loretta-shards index`, which indexes tars and adopts plain MDS folders).
"""

from __future__ import annotations

from pathlib import Path

from loretta.data.format import read_manifest
from loretta.data.mds import MDS_FORMAT, MdsDataset
from loretta.data.remote import (
    FetchOptions,
    cache_folder,
    fetch,
    is_url,
    streaming_fetch,
    streaming_remote,
)
from loretta.data.shards import ShardDataset
from loretta.errors import DataError

# URL schemes that only mosaicml-streaming reads in loretta: an MDS dataset is assumed there
STREAMING_ONLY = ("s3", "oci", "azure", "azure-dl", "dbfs", "hf", "sftp")


def open_dataset(
    path: str | Path,
    cache_dir: str | Path = "",
    verify_checksums: bool = False,
    fetch_options: FetchOptions | None = None,
) -> ShardDataset | MdsDataset:
    """The dataset at `path` (a folder or URL): a ShardDataset or an MdsDataset.
    `fetch_options` (retries, timeout, cache limit) apply to our own fetches of URL datasets."""
    path = str(path)
    if is_mds(path, cache_dir, fetch_options):
        return MdsDataset(path, cache_dir=cache_dir, verify_checksums=verify_checksums)
    return ShardDataset(
        path, cache_dir=cache_dir, verify_checksums=verify_checksums, fetch_options=fetch_options
    )


def is_mds(path: str, cache_dir: str | Path = "", opts: FetchOptions | None = None) -> bool:
    """Whether `path` holds an MDS dataset (its manifest says so, or only streaming reads it)."""
    if not is_url(path):
        folder = Path(path)
        if not folder.is_dir():
            raise DataError(f"dataset folder {path!r} does not exist")
        return read_manifest(folder / "manifest.json").format == MDS_FORMAT
    local = cache_folder(path, cache_dir)
    if path.split(":", 1)[0] in STREAMING_ONLY:
        return True
    try:
        fetch(path, "manifest.json", local, opts=opts)
    except DataError:  # unreadable here: ShardDataset reports why, unless streaming reads it
        if path.startswith(("http://", "https://", "file://", "pipe:")):
            return False
        try:
            streaming_fetch(streaming_remote(path), "manifest.json", local)
        except DataError:
            return False
    return read_manifest(local / "manifest.json").format == MDS_FORMAT
