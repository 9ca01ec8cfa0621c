"""Several training runs at a time (loretta.launch.run_jobs), with real processes: the limit,
the order a branch needs, an early start once the trunk's checkpoint exists, and failures."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from loretta.launch import Job, run_jobs

# each job records when it ran; `touch` lets a dependent start before the job ends
SCRIPT = """
import json, sys, time
out, name, secs, code, touch = sys.argv[1:6]
t0 = time.time()
if touch:
    time.sleep(0.2)
    open(touch, "w").close()
time.sleep(float(secs))
json.dump({"start": t0, "end": time.time()}, open(f"{out}/{name}.json", "w"))
sys.exit(int(code))
"""


def job(
    tmp: Path, name: str, secs: float = 0.3, code: int = 0, touch: str = "", **kw: object
) -> Job:
    argv = [sys.executable, "-c", SCRIPT, str(tmp), name, str(secs), str(code), touch]
    return Job(name=name, command=lambda: argv, env=dict(os.environ), **kw)  # type: ignore[arg-type]


def spans(tmp: Path) -> dict[str, tuple[float, float]]:
    out = {}
    for p in tmp.glob("*.json"):
        d = json.loads(p.read_text())
        out[p.stem] = (d["start"], d["end"])
    return out


def most_at_once(s: dict[str, tuple[float, float]]) -> int:
    return max(sum(a <= t < b for a, b in s.values()) for t, _ in s.values())


def test_at_most_parallel_and_after_waits(tmp_path: Path) -> None:
    jobs = [job(tmp_path, n) for n in "abcd"] + [job(tmp_path, "e", after="a")]
    assert run_jobs(jobs, parallel=2, say=lambda s: None) == []
    s = spans(tmp_path)
    assert sorted(s) == list("abcde")
    assert most_at_once(s) == 2  # the limit is reached and never passed
    assert s["e"][0] >= s["a"][1]


def test_one_at_a_time_runs_in_list_order(tmp_path: Path) -> None:
    jobs = [job(tmp_path, n, secs=0.05) for n in "cab"]
    assert run_jobs(jobs, parallel=1, say=lambda s: None) == []
    s = spans(tmp_path)
    assert sorted(s, key=lambda n: s[n][0]) == list("cab") and most_at_once(s) == 1


def test_ready_lets_a_branch_start_before_its_trunk_ends(tmp_path: Path) -> None:
    mark = tmp_path / "checkpoint"
    trunk = job(tmp_path, "trunk", secs=1.5, touch=str(mark))
    branch = job(tmp_path, "branch", secs=0.1, after="trunk", ready=mark.exists)
    assert run_jobs([trunk, branch], parallel=2, say=lambda s: None) == []
    s = spans(tmp_path)
    assert s["trunk"][0] < s["branch"][0] < s["trunk"][1]
    # with one slot it still waits for the trunk
    for p in tmp_path.glob("*"):
        p.unlink()
    assert run_jobs([trunk, branch], parallel=1, say=lambda s: None) == []
    s = spans(tmp_path)
    assert s["branch"][0] >= s["trunk"][1]


def test_a_failure_stops_new_starts_and_its_dependents(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "bad.log"
    jobs = [
        job(tmp_path, "bad", secs=0.1, code=3, log=log),
        job(tmp_path, "slow", secs=1.0),  # running when "bad" fails: it finishes
        job(tmp_path, "child", after="bad"),
        job(tmp_path, "later"),
    ]
    said: list[str] = []
    failed = run_jobs(jobs, parallel=2, say=said.append)
    assert failed == [
        f"bad: exit 3 (log: {log})",
        "child: not started: bad failed",
        "later: not started: an earlier job failed",
    ]
    assert sorted(spans(tmp_path)) == ["bad", "slow"]
    assert any(s.startswith("bad: FAILED, exit 3") for s in said)


def test_bad_batches_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not in the batch"):
        run_jobs([job(tmp_path, "a", after="x")], parallel=1)
    with pytest.raises(ValueError, match="repeat"):
        run_jobs([job(tmp_path, "a"), job(tmp_path, "a")], parallel=1)
    with pytest.raises(ValueError, match="wait for each other"):
        run_jobs([job(tmp_path, "a", after="b"), job(tmp_path, "b", after="a")], parallel=2)
    with pytest.raises(ValueError, match="at least 1"):
        run_jobs([job(tmp_path, "a")], parallel=0)


def test_demo_runs_several_at_a_time_with_the_same_results(tmp_path: Path) -> None:
    """The demo (smoke preset) trained one run at a time and three at a time, each run with one
    process: every scored item is the same, and the branches started from the trunk's
    transitive-start checkpoint (when, relative to the trunk's end, is up to the machine: the
    early start itself is tested above)."""
    import subprocess

    from helpers import BIN, REPO, base_env

    def demo(jobs: int, runs: int = 3) -> dict[str, object]:
        out = tmp_path / f"jobs{jobs}"
        cmd = [
            str(BIN / "loretta-demo"),
            "--preset=smoke",
            f"--out={out}",
            f"--data={tmp_path / 'data'}",
            "--methods=commutative,loretta,control",
            "--nproc=1",
            f"--jobs={jobs}",
            "--logging.wandb=disabled",
        ]
        res = subprocess.run(
            cmd, env=base_env(), capture_output=True, text=True, timeout=600, cwd=REPO
        )
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert f"{runs} runs of 6 steps, {jobs} at a time" in res.stdout
        metrics = json.loads((out / "report" / "metrics.json").read_text())
        meta = metrics["meta"]
        assert meta["jobs"] == jobs
        # where the time went (the parts add up to wall_s by construction, so only their signs
        # are checked); at the preset's own steps there is nothing to project
        assert meta["train_s"] > 0 and meta["eval_s"] > 0 and meta["data_s"] >= 0
        assert meta["projected_full_wall_s"] is None
        return dict(metrics["per_seed"])

    one, three = demo(1), demo(3)
    assert one == three
    # a branch trained again on a trunk trained earlier (a method added later, a crashed run)
    shutil.rmtree(tmp_path / "jobs3" / "control-seed0")
    assert demo(3, runs=1) == one
    out = tmp_path / "jobs3"
    assert (out / "loretta-seed0" / "train.log").stat().st_size > 0  # each run's own log
    for branch in ("loretta", "control"):
        rows = [
            json.loads(x)
            for x in (out / f"{branch}-seed0" / "metrics.jsonl").read_text().splitlines()
        ]
        start = next(r for r in rows if r.get("event") == "start")
        assert start["resumed_from"].endswith("commutative-seed0/checkpoints/step_00000003")


def test_methods_and_seeds_default_to_the_preset_and_refuse_unknown_methods() -> None:
    """loretta-demo and bench/demo.py resolve --methods/--seeds alike; a typo is refused with the
    choices before anything trains (bench/demo.py used to fail later with a KeyError)."""
    from loretta.demo.pipeline import PRESETS, methods_and_seeds

    cpu = PRESETS["cpu"]
    assert methods_and_seeds(cpu, "", "") == (cpu.methods, cpu.seeds)
    assert methods_and_seeds(cpu, "loretta,control", "7,8") == (["loretta", "control"], [7, 8])
    with pytest.raises(ValueError, match=r"--methods: unknown \['lorreta'\]; choose from"):
        methods_and_seeds(cpu, "commutative,lorreta", "")
    with pytest.raises(ValueError, match=r"--seeds='1,a': not integers"):
        methods_and_seeds(cpu, "", "1,a")


def test_bad_recipe_overrides_are_refused_before_the_data_is_built(tmp_path: Path) -> None:
    """`loretta-demo --model.dimm=3` used to build the data and then die with a traceback: now
    every preset's own runs pass the check, and a typo exits 2 naming the field and the fix
    before anything is written."""
    from loretta.demo.pipeline import PRESETS, check_overrides, main, with_data

    for preset in PRESETS.values():  # the shipped presets are valid as they are
        check_overrides(preset, preset.methods, preset.steps, [])
    smoke = PRESETS["smoke"]
    check_overrides(smoke, ["loretta"], 6, ["--model.dim=32"])
    with pytest.raises(ValueError, match=r"model\.dimm: unknown field; did you mean model\.dim"):
        check_overrides(smoke, ["loretta"], 6, ["--model.dimm=32"])
    with pytest.raises(ValueError, match=r"override '--sede': expected --section\.field=value"):
        check_overrides(smoke, ["commutative"], 6, ["--sede", "3"])
    with pytest.raises(ValueError, match=r"svl\.image_sid: unknown field; did you mean"):
        check_overrides(with_data(smoke, {"image_sid": 14}), ["commutative"], 6, [])
    data = tmp_path / "data"
    argv = ["--preset", "smoke", "--out", str(tmp_path / "out"), "--data", str(data)]
    assert main([*argv, "--model.dimm=3"]) == 2
    assert main([*argv, "--svl", "image_sid=14"]) == 2  # the data's fields too
    assert "image_sid" not in smoke.data  # --svl changes a copy, never the shipped preset
    assert main([*argv, "--seeds", "1,a"]) == 2
    for flag in ("--jobs", "--nproc", "--steps"):  # refused by the parser (exit 2), not mid-run
        with pytest.raises(SystemExit, match="2"):
            main([*argv, flag, "-3"])
    assert not data.exists() and not (tmp_path / "out").exists()


def test_a_probe_projects_the_full_presets_wall_time() -> None:
    """A run at fewer steps than its preset's (the GPU preset probed at 200 of 3,000 steps)
    projects the full preset's wall time: training scaled by the steps, data and evaluation as
    measured; the report says so."""
    from loretta.demo.pipeline import projected_full_wall
    from loretta.demo.report import time_split

    meta: dict[str, object] = {
        "steps": 200,
        "preset_steps": 3000,
        "data_s": 10.0,
        "train_s": 100.0,
        "eval_s": 50.0,
    }
    assert projected_full_wall(meta) == 10.0 + 50.0 + 100.0 * 15
    assert projected_full_wall({**meta, "steps": 3000}) is None
    meta["projected_full_wall_s"] = projected_full_wall(meta)
    line = time_split(meta)
    assert "training 100 s, evaluation 50 s" in line and "3000 steps about 1560 s" in line
    assert time_split({"wall_s": 5.0}) == ""  # reports written before the split


def test_data_only_builds_the_presets_data_and_trains_nothing(tmp_path: Path) -> None:
    """`loretta-demo --data-only` builds the data a GPU machine cannot (espeak-ng, MNIST wheels)
    into the folder the preset reads, and stops; a second call finds it cached."""
    from loretta.demo.pipeline import PRESETS, data_dir_for, main

    data, out = tmp_path / "data", tmp_path / "out"
    argv = ["--preset", "smoke", "--data", str(data), "--out", str(out), "--data-only"]
    assert main(argv) == 0
    folder = data_dir_for(data, PRESETS["smoke"])
    meta = folder / "svl_meta.json"
    assert meta.is_file() and (folder / "val").is_dir() and not out.exists()
    built = meta.stat().st_mtime_ns
    assert main(argv) == 0 and meta.stat().st_mtime_ns == built
