"""Remote data that survives the network (loretta/data/remote.py), against a real HTTP server on
127.0.0.1 whose handler misbehaves on purpose: 503s, stalls after the headers, bodies shorter
than their Content-Length, 404s. Plus the bounded LRU cache and parallel fetches."""

from __future__ import annotations

import http.server
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from test_data_sources import LAYOUT, samples

from loretta.config import SourceConfig, load_config
from loretta.data.loader import ROW_FIELDS, build_loader
from loretta.data.remote import FetchOptions, cached_files, download, fetch
from loretta.data.shards import write_dataset
from loretta.errors import ConfigError, DataError

FAST = FetchOptions(retries=3, timeout_s=0.5, backoff_s=0.01, backoff_max_s=0.05)


@dataclass
class Plan:
    """What the server does: files it serves and, per file name, how it misbehaves."""

    files: dict[str, bytes] = field(default_factory=dict)
    fail_first: dict[str, int] = field(default_factory=dict)  # name -> 503s before success
    stall: dict[str, int] = field(default_factory=dict)  # name -> stalled answers before success
    truncate: set[str] = field(default_factory=set)  # always cut short
    stall_s: float = 3.0
    root: Path | None = None  # also serve the files of this folder
    hits: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def make_handler(plan: Plan) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:
            name = self.path.lstrip("/")
            with plan.lock:
                n = plan.hits[name] = plan.hits.get(name, 0) + 1
            body = plan.files.get(name)
            if body is None and plan.root is not None and (plan.root / name).is_file():
                body = (plan.root / name).read_bytes()
            if body is None:
                self.send_error(404, "no such file")
                return
            if n <= plan.fail_first.get(name, 0):
                self.send_error(503, "try again")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if n <= plan.stall.get(name, 0):
                self.wfile.write(body[:10])
                self.wfile.flush()
                time.sleep(plan.stall_s)  # headers and a little, then nothing
                return
            if name in plan.truncate:
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture
def server() -> Iterator[tuple[str, Plan]]:
    plan = Plan()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(plan))
    srv.daemon_threads = True  # a stalled handler does not hold up shutdown
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", plan
    finally:
        srv.shutdown()
        srv.server_close()


def test_transient_503s_are_retried(server: tuple[str, Plan], tmp_path: Path) -> None:
    url, plan = server
    plan.files["a.bin"] = b"x" * 1000
    plan.fail_first["a.bin"] = 2
    got = fetch(url, "a.bin", tmp_path, opts=FAST)
    assert got.read_bytes() == b"x" * 1000 and plan.hits["a.bin"] == 3


def test_a_stalled_server_fails_the_attempt_within_the_timeout(
    server: tuple[str, Plan], tmp_path: Path
) -> None:
    url, plan = server
    plan.files["s.bin"] = b"y" * 5000
    plan.stall["s.bin"] = 1
    t0 = time.monotonic()
    got = fetch(url, "s.bin", tmp_path, opts=FAST)
    took = time.monotonic() - t0
    assert got.read_bytes() == b"y" * 5000 and plan.hits["s.bin"] == 2
    assert took < plan.stall_s - 1, f"the stalled attempt took {took:.1f} s, timeout 0.5 s"


def test_a_truncated_body_never_reaches_the_destination(
    server: tuple[str, Plan], tmp_path: Path
) -> None:
    url, plan = server
    plan.files["t.bin"] = b"z" * 4000
    plan.truncate.add("t.bin")
    with pytest.raises(DataError) as e:
        fetch(url, "t.bin", tmp_path, opts=FAST)
    msg = str(e.value)
    assert f"{url}/t.bin" in msg and "3 attempts" in msg and "truncated" in msg
    assert "data.download_retries" in msg and "data.download_timeout_s" in msg
    assert plan.hits["t.bin"] == 3
    assert list(tmp_path.iterdir()) == []  # no partial file, no temp file


def test_404_is_not_retried(server: tuple[str, Plan], tmp_path: Path) -> None:
    url, plan = server
    with pytest.raises(DataError, match=r"could not fetch http://127\.0\.0\.1:\d+/nope.*HTTP 404"):
        fetch(url, "nope", tmp_path, opts=FAST)
    assert plan.hits["nope"] == 1 and list(tmp_path.iterdir()) == []


def _fetch_in_child(url: str, folder: str) -> None:
    fetch(url, "p.bin", Path(folder), opts=FAST)


def test_parallel_processes_fetch_the_same_file(server: tuple[str, Plan], tmp_path: Path) -> None:
    url, plan = server
    plan.files["p.bin"] = os.urandom(200_000)
    ctx = mp.get_context("fork")  # the server thread lives in this process only
    procs = [ctx.Process(target=_fetch_in_child, args=(url, str(tmp_path))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert (tmp_path / "p.bin").read_bytes() == plan.files["p.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["p.bin"]


def test_the_cache_stays_under_its_limit_evicting_least_recently_used(
    server: tuple[str, Plan], tmp_path: Path
) -> None:
    """Four 1000-byte files, a 2500-byte limit: the cache keeps two. Touching a file on a cache
    hit makes it recent, so the other one goes first; an evicted file is fetched again."""
    url, plan = server
    for name in "abcd":
        plan.files[name] = name.encode() * 1000
    cache = tmp_path / "0123456789abcdef"  # a per-URL folder, as cache_folder names them
    other = tmp_path / "fedcba9876543210"  # another dataset's folder in the same cache
    opts = FetchOptions(**{**FAST.__dict__, "cache_limit": 2500})
    (cache / ".x.bin.123.abc.tmp").parent.mkdir(parents=True)
    (cache / ".x.bin.123.abc.tmp").write_bytes(b"t" * 5000)  # a download in flight: not counted

    def cached() -> set[str]:
        return {p.name for _, _, p in cached_files(tmp_path)}

    fetch(url, "a", cache, opts=opts)
    time.sleep(0.02)  # distinct mtimes
    fetch(url, "b", other, opts=opts)
    time.sleep(0.02)
    fetch(url, "a", cache, opts=opts)  # a cache hit: a is now more recent than b
    time.sleep(0.02)
    fetch(url, "c", cache, opts=opts)
    assert cached() == {"a", "c"}  # b, least recently used, went first
    time.sleep(0.02)
    fetch(url, "d", cache, opts=opts)
    assert cached() == {"c", "d"}
    assert sum(n for _, n, _ in cached_files(tmp_path)) <= 2500
    assert (cache / ".x.bin.123.abc.tmp").exists()
    assert plan.hits["a"] == 1
    assert fetch(url, "a", cache, opts=opts).read_bytes() == b"a" * 1000  # evicted: fetched again
    assert plan.hits["a"] == 2 and cached() == {"d", "a"}


def test_a_file_larger_than_the_cache_limit_is_a_clear_error(
    server: tuple[str, Plan], tmp_path: Path
) -> None:
    url, plan = server
    plan.files["big"] = b"b" * 3000
    opts = FetchOptions(**{**FAST.__dict__, "cache_limit": 1000})
    with pytest.raises(DataError, match=r"/big: 3000 bytes, more than data.cache_limit \(1000"):
        fetch(url, "big", tmp_path, opts=opts)
    assert list(tmp_path.iterdir()) == []


def test_download_settings_come_from_the_config(tmp_path: Path) -> None:
    cfg = load_config(
        "tiny",
        ["--data.cache_limit=10KiB", "--data.download_retries=5", "--data.download_timeout_s=2"],
    )
    assert cfg.data.fetch_options() == FetchOptions(retries=5, timeout_s=2.0, cache_limit=10240)
    assert load_config("tiny", []).data.fetch_options().cache_limit == 0
    for bad, field_name in [
        ("--data.cache_limit=lots", "data.cache_limit"),
        ("--data.download_retries=0", "data.download_retries"),
        ("--data.download_timeout_s=0", "data.download_timeout_s"),
    ]:
        with pytest.raises(ConfigError, match=field_name):
            load_config("tiny", [bad])


def test_download_without_options_keeps_an_existing_file(tmp_path: Path) -> None:
    dest = tmp_path / "f"
    dest.write_bytes(b"kept")
    os.utime(dest, (1, 1))
    assert download("http://127.0.0.1:9/never-asked", dest).read_bytes() == b"kept"
    assert dest.stat().st_mtime > 1  # touched: a use the LRU cache sees


def test_a_webdataset_served_over_http_reads_like_its_folder(
    server: tuple[str, Plan], tmp_path: Path
) -> None:
    """The loader path end to end: a dataset folder served by the test server, its first shard
    answering 503 once, gives the same batches as the folder itself."""
    url, plan = server
    write_dataset(samples(24), tmp_path / "ds", LAYOUT, samples_per_shard=8)
    plan.root = tmp_path / "ds"
    plan.fail_first["shard-000000.tar"] = 1

    def batches(path: str) -> list[dict[str, torch.Tensor]]:
        cfg = load_config("tiny", ["--data.num_workers=0", f"--data.cache_dir={tmp_path / 'c'}"])
        cfg.data.sources = [SourceConfig(name="s", path=path)]
        it = iter(build_loader(cfg, 0, 1)[0])
        return [next(it) for _ in range(3)]

    for x, y in zip(batches(url), batches(str(tmp_path / "ds")), strict=True):
        assert all(torch.equal(x[k], y[k]) for k in ROW_FIELDS)
    assert plan.hits["manifest.json"] >= 1 and plan.hits["shard-000000.tar"] == 2
