"""Everything about URLs: recognising them, joining names onto them, and fetching files from
them into a local cache, for both backends. No shell is ever involved.

A dataset path is a URL when it has a scheme (``https://``, ``gs://``, ``s3://``, ``file://``)
or is a ``pipe:`` command. Files are fetched by name from the dataset's prefix:

* ``http(s)://`` with urllib (timeout, retries with back-off; a 4xx answer is not retried);
* ``file://`` by copying the local file;
* ``pipe:PROGRAM ARGS...`` by running PROGRAM with ARGS, ``{}`` in an argument replaced by the
  file name, its standard output being the file: ``pipe:aws s3 cp s3://bucket/ds/{} -``. The
  command is split like a shell would (shlex) but run without one (`subprocess` with an argument
  list): pipes, redirections and ``$VARIABLES`` are not interpreted;
* any other scheme (``gs://``, ``s3://``, ...) through fsspec, when its filesystem package
  (gcsfs, s3fs, ...) is installed.

Names come from manifests and streaming index files, which are data from outside: every name is
checked to be a plain file name (`check_file_name`) before it is joined to a URL, put on a
command line or used as a cache path, and cache paths are confined to their cache folder. A file
is downloaded to a temporary name in the cache folder and renamed when complete, so a reader
never sees a partial file; two processes fetching the same file both succeed.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

from loretta.data.format import check_file_name
from loretta.errors import DataError

DEFAULT_CACHE = Path.home() / ".cache/loretta/shards"
RETRIES = 3  # attempts per file
TIMEOUT_S = 60.0  # per attempt: connect and each read (http), or the whole command (pipe:)


def is_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def join_url(root: str, name: str, where: str = "file name") -> str:
    """The URL of file `name` under dataset prefix `root` ('{}' in `root` stands for the name)."""
    check_file_name(name, where)
    if "{}" in root:
        return root.replace("{}", name)
    if root.startswith("pipe:"):
        raise DataError(
            f"{root!r}: a pipe: dataset path must say where the file name goes with {{}}, e.g. "
            "'pipe:aws s3 cp s3://bucket/ds/{} -'"
        )
    return root.rstrip("/") + "/" + name


def cache_folder(path: str, cache_dir: str | Path = "") -> Path:
    """Local folder of a dataset: the path itself, or a per-URL folder of the cache."""
    if not is_url(path):
        return Path(path)
    digest = hashlib.sha256(path.encode()).hexdigest()[:16]
    return Path(cache_dir or DEFAULT_CACHE) / digest


def cache_path(folder: Path, name: str, where: str = "file name") -> Path:
    """folder/name, refusing any name that would leave `folder`."""
    check_file_name(name, where)
    dest = folder / name
    if dest.resolve().parent != folder.resolve():
        raise DataError(f"{where} {name!r} leaves the cache folder {folder}; refusing it")
    return dest


def fetch(
    root: str,
    name: str,
    folder: Path,
    *,
    where: str = "file name",
    retries: int = RETRIES,
    timeout: float = TIMEOUT_S,
) -> Path:
    """Copy file `name` of the dataset at URL `root` to folder/name (unless already there)."""
    url = join_url(root, name, where)
    return download(url, cache_path(folder, name, where), retries=retries, timeout=timeout)


def download(url: str, dest: Path, *, retries: int = RETRIES, timeout: float = TIMEOUT_S) -> Path:
    """Copy `url` to `dest` atomically, with retries; an existing `dest` is complete: kept."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    retries = max(1, retries)
    for attempt in range(1, retries + 1):
        try:
            _atomic_copy(lambda f: _copy_url(url, f, timeout), dest)
            return dest
        except _Permanent as e:
            raise DataError(f"could not fetch {url}: {e}") from e.__cause__
        except (OSError, subprocess.SubprocessError, _Transient) as e:
            if attempt == retries:
                raise DataError(
                    f"could not fetch {url} ({retries} attempts): {type(e).__name__}: {e}"
                ) from e
            time.sleep(min(0.5 * 2**attempt, 10.0))
    raise AssertionError("unreachable")


class _Transient(Exception):
    """Worth another attempt (a 5xx answer, a failing command)."""


class _Permanent(Exception):
    """Not worth another attempt (404, unknown scheme, missing program)."""


def _atomic_copy(write: Callable[[IO[bytes]], None], dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_url(url: str, out: IO[bytes], timeout: float) -> None:
    if url.startswith("pipe:"):
        _run_pipe(url[len("pipe:") :], out, timeout)
    elif url.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as src:
                shutil.copyfileobj(src, out, 1 << 20)
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500 and e.code not in (408, 429):
                raise _Permanent(f"HTTP {e.code} {e.reason}") from e
            raise _Transient(f"HTTP {e.code} {e.reason}") from e
    elif url.startswith("file://"):
        try:
            with open(url[len("file://") :], "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
        except FileNotFoundError as e:
            raise _Permanent(f"not found ({e})") from e
    else:
        _copy_fsspec(url, out)


def _run_pipe(command: str, out: IO[bytes], timeout: float) -> None:
    try:
        args = shlex.split(command)
    except ValueError as e:
        raise _Permanent(f"cannot split the pipe: command ({e})") from e
    if not args:
        raise _Permanent("empty pipe: command")
    try:
        res = subprocess.run(args, stdout=out, stderr=subprocess.PIPE, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise _Permanent(f"program {args[0]!r} not found (pipe: runs it without a shell)") from e
    if res.returncode != 0:
        tail = res.stderr.decode(errors="replace").strip()[-300:]
        raise _Transient(f"{shlex.join(args)} exited with {res.returncode}: {tail}")


def _copy_fsspec(url: str, out: IO[bytes]) -> None:
    scheme = url.split("://", 1)[0]
    try:
        import fsspec

        with fsspec.open(url, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
    except (ImportError, ValueError) as e:  # fsspec lacks the scheme or its package
        raise _Permanent(
            f"no reader for {scheme}:// URLs ({e}); install its fsspec package (gcsfs for "
            "gs://, s3fs for s3://), or use https:// or pipe:PROGRAM ARGS {}"
        ) from e
    except FileNotFoundError as e:
        raise _Permanent(f"not found ({e})") from e


# ---- mosaicml-streaming remotes ----------------------------------------------------------------
def streaming_remote(url: str) -> str:
    """The remote that mosaicml-streaming understands: file:// URLs become plain paths."""
    if url.startswith("file://"):
        return url[len("file://") :]
    from streaming.base.storage.download import DOWNLOADER_MAPPINGS

    scheme = url.split("://", 1)[0] if "://" in url else url.split(":", 1)[0]
    if scheme not in DOWNLOADER_MAPPINGS:
        known = [*sorted(s for s in DOWNLOADER_MAPPINGS if s), "file"]
        raise DataError(
            f"{url}: mosaicml-streaming cannot read {scheme!r} URLs (it reads {known}); "
            "copy the MDS folder to one of those, or convert it with `loretta-shards from-mds` "
            "and serve the webdataset tars instead"
        )
    return url


def streaming_fetch(remote: str, name: str, folder: Path, where: str = "file name") -> Path:
    """Copy remote/name to folder/name with streaming's downloader, unless already there."""
    dest = cache_path(folder, name, where)
    if dest.exists():
        return dest
    from streaming.base.storage.download import CloudDownloader

    folder.mkdir(parents=True, exist_ok=True)
    src = os.path.join(remote, name)
    try:
        tmp = folder / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp"
        try:
            CloudDownloader.direct_download(src, str(tmp))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    except Exception as e:
        raise DataError(f"could not fetch {src}: {type(e).__name__}: {e}") from e
    return dest
