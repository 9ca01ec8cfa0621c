"""Everything about URLs: recognising them, joining names onto them, and fetching files from
them into a local cache, for both backends. No shell is ever involved.

A dataset path is a URL when it has a scheme (``https://``, ``gs://``, ``s3://``, ``file://``)
or is a ``pipe:`` command. Files are fetched by name from the dataset's prefix:

* ``http(s)://`` with urllib. The timeout bounds the connect and every read, so a server that
  sends its headers and then stalls fails the attempt; a body shorter than its Content-Length
  fails it too. Failed attempts are retried with bounded exponential back-off and jitter; a 4xx
  answer (but 408/429) is not retried;
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

The cache can be bounded (`FetchOptions.cache_limit`, ``data.cache_limit``): after each download
the least recently used complete files of the whole cache (every dataset's folder under it) are
deleted until it fits. Use is recorded by touching a file's mtime on every cache hit (atime is
unreliable on noatime mounts). The file just fetched is never evicted, temporary files of
downloads in flight are neither counted nor evicted, and a file another process removed first is
simply skipped; an evicted file that is needed again is downloaded again.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import random
import re
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from loretta.data.format import check_file_name
from loretta.errors import DataError

DEFAULT_CACHE = Path.home() / ".cache/loretta/shards"
RETRIES = 3  # attempts per file
TIMEOUT_S = 60.0  # per attempt: connect and each read (http), or the whole command (pipe:)
BACKOFF_S = 0.5  # first pause between attempts; doubled each time, up to BACKOFF_MAX_S
BACKOFF_MAX_S = 30.0
_DIGEST_RE = re.compile(r"^[0-9a-f]{16}$")  # names of the per-URL folders cache_folder makes


@dataclass(frozen=True)
class FetchOptions:
    """How remote files are fetched and cached (from DataConfig: `DataConfig.fetch_options`)."""

    retries: int = RETRIES  # attempts per file, >= 1
    timeout_s: float = TIMEOUT_S
    cache_limit: int = 0  # bytes the cache may hold; 0 = unlimited
    backoff_s: float = BACKOFF_S
    backoff_max_s: float = BACKOFF_MAX_S


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
    opts: FetchOptions | None = None,
) -> Path:
    """Copy file `name` of the dataset at URL `root` to folder/name (unless already there)."""
    url = join_url(root, name, where)
    return download(url, cache_path(folder, name, where), opts=opts)


def download(url: str, dest: Path, *, opts: FetchOptions | None = None) -> Path:
    """Copy `url` to `dest` atomically, with retries; an existing `dest` is complete: kept (and
    touched, so the cache's LRU eviction sees it used)."""
    o = opts or FetchOptions()
    if dest.exists():
        touch(dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    retries = max(1, o.retries)
    for attempt in range(1, retries + 1):
        try:
            _atomic_copy(lambda f: _copy_url(url, f, o), dest)
            break
        except _Permanent as e:
            raise DataError(f"could not fetch {url}: {e}") from e.__cause__
        except (OSError, subprocess.SubprocessError, http.client.HTTPException, _Transient) as e:
            if attempt == retries:
                raise DataError(
                    f"could not fetch {url} ({retries} attempts); last error: "
                    f"{type(e).__name__}: {e}. Check the network and the URL, or raise "
                    f"data.download_retries (now {retries}) / data.download_timeout_s (now "
                    f"{o.timeout_s:g} s per connect or read)"
                ) from e
            time.sleep(backoff(attempt, o))
    if o.cache_limit:
        _fit_cache(url, dest, o.cache_limit)
    return dest


def backoff(attempt: int, o: FetchOptions) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based): "full jitter" (uniform up to the
    exponential bound), so processes that failed together do not retry in lock-step."""
    bound = min(o.backoff_max_s, o.backoff_s * 2 ** (attempt - 1))
    return random.uniform(0.0, bound)


def touch(path: Path) -> None:
    """Record a use of a cached file for LRU eviction (mtime: atime may be off, noatime)."""
    with contextlib.suppress(OSError):  # evicted by another process meanwhile: nothing to mark
        os.utime(path)


# ---- bounded cache -----------------------------------------------------------------------------
def cache_root(folder: Path) -> Path:
    """The cache shared by every dataset: the parent of a per-URL folder made by cache_folder, or
    the folder itself when it is not one (then only its own files are evicted)."""
    return folder.parent if _DIGEST_RE.match(folder.name) else folder


def cached_files(root: Path) -> list[tuple[float, int, Path]]:
    """(mtime, size, path) of every complete cached file under `root`, least recently used first.
    Temp files of downloads in flight (dot names) are not counted; a file removed meanwhile by
    another process is skipped."""
    folders = [root, *(d for d in _listdir(root) if _DIGEST_RE.match(d.name) and d.is_dir())]
    out = []
    for d in folders:
        for f in _listdir(d):
            if f.name.startswith("."):
                continue
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            if not f.is_dir():
                out.append((st.st_mtime, st.st_size, f))
    return sorted(out, key=lambda t: (t[0], str(t[2])))


def _listdir(d: Path) -> list[Path]:
    try:
        return list(d.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _fit_cache(url: str, keep: Path, limit: int) -> None:
    """Evict least recently used files until the cache holds at most `limit` bytes; `keep` (just
    fetched, about to be read) never. A file larger than the limit alone is an error."""
    size = keep.stat().st_size
    if size > limit:
        keep.unlink(missing_ok=True)
        raise DataError(
            f"{url}: {size} bytes, more than data.cache_limit ({limit} bytes) on its own; raise "
            "data.cache_limit above the largest file (e.g. 2x the shard size) or set it empty"
        )
    files = cached_files(cache_root(keep.parent))
    total = sum(n for _, n, _ in files)
    for _, n, f in files:
        if total <= limit:
            break
        if f == keep:
            continue
        f.unlink(missing_ok=True)  # another process may have evicted it first: fine
        total -= n


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


def _copy_url(url: str, out: IO[bytes], o: FetchOptions) -> None:
    if url.startswith("pipe:"):
        _run_pipe(url[len("pipe:") :], out, o.timeout_s)
    elif url.startswith(("http://", "https://")):
        _copy_http(url, out, o)
    elif url.startswith("file://"):
        try:
            with open(url[len("file://") :], "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
        except FileNotFoundError as e:
            raise _Permanent(f"not found ({e})") from e
    else:
        _copy_fsspec(url, out)


def _copy_http(url: str, out: IO[bytes], o: FetchOptions) -> None:
    """GET `url` into `out`. urlopen's timeout is the socket's: it bounds the connect and every
    single read, so a stalled server raises TimeoutError. http.client does not notice a body cut
    short (it just returns b"" at the early close), so the bytes are counted here."""
    try:
        with urllib.request.urlopen(url, timeout=o.timeout_s) as src:
            announced = src.headers.get("Content-Length")
            expected = int(announced) if announced and announced.isdigit() else None
            if expected is not None and o.cache_limit and expected > o.cache_limit:
                raise _Permanent(
                    f"{expected} bytes, more than data.cache_limit ({o.cache_limit} bytes) on its "
                    "own; raise data.cache_limit above the largest file or set it empty"
                )
            got = 0
            while chunk := src.read(1 << 20):
                out.write(chunk)
                got += len(chunk)
    except urllib.error.HTTPError as e:
        if 400 <= e.code < 500 and e.code not in (408, 429):
            raise _Permanent(f"HTTP {e.code} {e.reason}") from e
        raise _Transient(f"HTTP {e.code} {e.reason}") from e
    if expected is not None and got != expected:
        raise _Transient(f"truncated body: {got} of the {expected} bytes announced")


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
        touch(dest)
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
