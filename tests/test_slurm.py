"""The SLURM scripts (slurm/*.sh) on a real SLURM cluster: tests/slurm/local_slurm.sh starts a
controller and two slurmd "nodes" (node1, node2) on this machine, installing Debian's packages
if they are missing. The tests skip only where that is impossible (not root, or no apt).

Every training job is the tiny recipe on the CPU with one process per node, so world size 2
spans both nodes. One uninterrupted run is the reference for the preemption test.
"""

from __future__ import annotations

import fcntl
import json
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers import BIN, PY, REPO, base_env, losses, metrics

pytestmark = pytest.mark.slurm

CLUSTER = REPO / "tests" / "slurm" / "local_slurm.sh"
STEPS = 40  # long enough that a signal sent at step 2 lands well before the end
# One test session at a time may use the machine's local cluster (its folder and ports are
# fixed so that a crashed session's daemons are found and stopped by the next one).
LOCK = Path("/tmp/loretta-slurm.lock")


@dataclass
class Job:
    returncode: int
    run_dir: Path
    log: Path

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else "(no log)"

    def tail(self, n: int = 6000) -> str:
        return f"job log {self.log}:\n{self.text()[-n:]}"


@pytest.fixture(scope="module")
def slurm_env() -> Iterator[dict[str, str]]:
    """The environment for sbatch/scontrol against a freshly started local cluster."""
    check = subprocess.run(["bash", str(CLUSTER), "check"], capture_output=True, text=True)
    if check.returncode != 0:
        pytest.skip(f"cannot run a local SLURM cluster here: {check.stderr.strip()}")
    with open(LOCK, "w") as lock:
        deadline = time.monotonic() + 600
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another test session held {LOCK} for 10 minutes")
                time.sleep(2)
        start = subprocess.run(
            ["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=900
        )
        assert start.returncode == 0, f"local_slurm.sh start failed:\n{start.stderr[-4000:]}"
        conf = start.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
        # The venv's programs by absolute path, not by putting its bin/ first on PATH: torch
        # builds DeepSpeed's CPU op with the first `ninja` on PATH, and two ninja versions
        # (the venv's, Debian's) each rebuild what the other built (~30 s, under a lock).
        env = base_env(SLURM_CONF=conf, TORCHRUN=str(BIN / "torchrun"), PYTHON=PY)
        env.pop("MASTER_PORT")  # pretrain.sh derives it from the job id
        try:
            yield env
        finally:
            subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=120)


def run_env(
    slurm_env: dict[str, str], run_dir: Path, data: Path, steps: int, **extra: str
) -> dict[str, str]:
    """The job environment: pretrain.sh reads CONFIG, RUN_DIR and OVERRIDES."""
    overrides = {
        "run.steps": steps,
        "run.precision": "fp32",
        "data.sources.0.path": data,
        "logging.interval": 1,
        "logging.wandb": "disabled",
        "logging.progress": "never",
    }
    return dict(
        slurm_env,
        CONFIG="tiny",
        RUN_DIR=str(run_dir),
        OVERRIDES=" ".join(f"--{k}={v}" for k, v in overrides.items()),
        **extra,
    )


def cancel(env: dict[str, str], name: str) -> None:
    subprocess.run(["scancel", f"--name={name}"], env=env, capture_output=True, timeout=30)


def sbatch_wait(env: dict[str, str], name: str, log: Path, args: list[str], timeout: float) -> int:
    """Run `sbatch --wait` and return the job's exit code (sbatch's own errors fail the test)."""
    cmd = ["sbatch", "--wait", f"--job-name={name}", f"--output={log}", *args]
    try:
        res = subprocess.run(
            cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        cancel(env, name)
        log_text = log.read_text()[-6000:] if log.exists() else "(no log)"
        pytest.fail(f"{shlex.join(cmd)} did not finish in {timeout:.0f}s\n{log_text}")
    if "Submitted batch job" not in res.stdout:
        pytest.fail(f"{shlex.join(cmd)}: sbatch failed: {res.stderr.strip()}")
    return res.returncode


@pytest.fixture(scope="module")
def reference(
    slurm_env: dict[str, str], tiny_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Job:
    """CONFIG=tiny sbatch --wait --nodes=2 slurm/pretrain.sh, run to the end."""
    tmp = tmp_path_factory.mktemp("slurm_reference")
    env = run_env(slurm_env, tmp / "run", tiny_data, STEPS)
    rc = sbatch_wait(env, "ref", tmp / "job.out", ["--nodes=2", "slurm/pretrain.sh"], 600)
    return Job(rc, tmp / "run", tmp / "job.out")


def test_two_node_job_trains_one_process_per_node_and_checkpoints(reference: Job) -> None:
    assert reference.returncode == 0, reference.tail()
    log = reference.text()
    assert "2 node(s) x 1 process(es)" in log, reference.tail()
    for node in ("node 0 (node1)", "node 1 (node2)"):
        assert f"{node}: starting torchrun" in log, reference.tail()
    start = next(m for m in metrics(reference.run_dir) if m.get("event") == "start")
    assert start["world_size"] == 2
    assert sorted(losses(reference.run_dir)) == list(range(1, STEPS + 1))
    ckpts = reference.run_dir / "checkpoints"
    final = ckpts / f"step_{STEPS:08d}"
    assert (ckpts / "latest").read_text().strip() == final.name
    assert json.loads((final / "state.json").read_text())["complete"] is True
    assert len(list((final / "ds").glob("*model_states.pt"))) == 2  # one partition per rank


def test_usr1_checkpoints_requeues_and_resumes_bit_exact(
    slurm_env: dict[str, str], reference: Job, tiny_data: Path, tmp_path: Path
) -> None:
    assert reference.returncode == 0, "the reference run failed (see the test above)"
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = run_env(slurm_env, run_dir, tiny_data, STEPS)
    cmd = ["sbatch", "--wait", "--nodes=2", "--job-name=preempt", f"--output={log}"]
    job = subprocess.Popen(
        [*cmd, "slurm/pretrain.sh"], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        # preempt once training runs: the signal goes to the batch shell, as --signal=B:USR1 does
        deadline = time.monotonic() + 400
        while not (run_dir / "metrics.jsonl").exists() or 2 not in losses(run_dir):
            assert job.poll() is None, f"job ended before step 2\n{log.read_text()[-6000:]}"
            assert time.monotonic() < deadline, f"no step 2 in 400 s\n{log.read_text()[-6000:]}"
            time.sleep(0.2)
        jobid = subprocess.run(
            ["squeue", "-h", "-o", "%A", "--name=preempt"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[0]
        subprocess.run(["scancel", "--signal=USR1", "--batch", jobid], env=env, check=True)
        rc = job.wait(timeout=400)
    finally:
        if job.poll() is None:
            cancel(env, "preempt")
            job.kill()
    text = log.read_text()
    assert rc == 0, text[-6000:]

    events = [m for m in metrics(run_dir) if "event" in m]
    stopped = [m["step"] for m in events if m["event"] == "preempted"]
    assert len(stopped) == 1, events
    at = stopped[0]
    assert 2 <= at < STEPS, f"preempted at step {at}: the resume was not exercised"
    starts = [m for m in events if m["event"] == "start"]
    assert [s["step"] for s in starts] == [0, at]
    assert starts[1]["resumed_from"].endswith(f"step_{at:08d}")
    assert "(restart 1)" in text and f"requeueing job {jobid}" in text, text[-6000:]

    got, want = losses(run_dir), losses(reference.run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    after = {s: (got[s], want[s]) for s in range(at + 1, STEPS + 1) if got[s] != want[s]}
    assert not after, f"losses after the resume at step {at} differ (got, reference): {after}"


def test_a_node_that_fails_to_start_fails_the_job(
    slurm_env: dict[str, str], tiny_data: Path, tmp_path: Path
) -> None:
    log = tmp_path / "job.out"
    env = run_env(slurm_env, tmp_path / "run", tiny_data, STEPS, LORETTA_SLURM_FAIL_NODE="1")
    rc = sbatch_wait(env, "failnode", log, ["--nodes=2", "slurm/pretrain.sh"], 120)
    text = log.read_text()
    assert rc != 0, text
    assert "node 1 (node2): LORETTA_SLURM_FAIL_NODE=1 (test hook): exiting 1" in text, text
    assert "FAILED: training exited with code 1" in text, text
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_prepare_data_array_builds_one_source_per_task(
    slurm_env: dict[str, str], tiny_data: Path, tmp_path: Path
) -> None:
    recipe = yaml.safe_load((REPO / "loretta" / "recipes" / "tiny.yaml").read_text())
    first = recipe["data"]["sources"][0]
    second = dict(first, name="ab2", synthetic=dict(first["synthetic"], seed=1))
    first["path"], second["path"] = str(tmp_path / "ab"), str(tmp_path / "ab2")
    recipe["data"]["sources"] = [first, second]
    config = tmp_path / "two_sources.yaml"
    config.write_text(yaml.safe_dump(recipe))
    env = dict(slurm_env, CONFIG=str(config))
    args = ["--array=0-1", "slurm/prepare_data.sh"]
    rc = sbatch_wait(env, "prepare", tmp_path / "task-%a.out", args, 180)
    logs = [(tmp_path / f"task-{i}.out").read_text() for i in (0, 1)]
    assert rc == 0, logs
    for i, name in enumerate(("ab", "ab2")):
        assert f"data.sources.{i} ({name}): {tmp_path / name}: 4000 samples" in logs[i], logs[i]
    # the same synthetic config gives the same shards as the session's tiny dataset
    built, session = (
        json.loads((p / "manifest.json").read_text()) for p in (tmp_path / "ab", tiny_data)
    )
    assert built["shards"] == session["shards"] and built["index"] == session["index"]


def test_convert_exports_the_reference_checkpoint(
    slurm_env: dict[str, str], reference: Job, tmp_path: Path
) -> None:
    assert reference.returncode == 0, "the reference run failed (see the first test)"
    src = reference.run_dir / "checkpoints" / f"step_{STEPS:08d}"
    dst = tmp_path / "hf"
    log = tmp_path / "job.out"
    args = ["--cpus-per-task=1", "slurm/convert.sh", str(src), str(dst)]  # fake nodes: 2 CPUs
    rc = sbatch_wait(slurm_env, "convert", log, args, 180)
    assert rc == 0, log.read_text()[-6000:]
    assert (dst / "config.json").exists() and list(dst.glob("*.safetensors")), log.read_text()


def test_deepspeed_hostfile_job_from_the_docs(
    slurm_env: dict[str, str], reference: Job, tiny_data: Path, tmp_path: Path
) -> None:
    assert reference.returncode == 0, "the reference run failed (see the first test)"
    doc = (REPO / "docs" / "slurm.md").read_text()
    after = doc.split("<!-- tests/test_slurm.py runs this script as written -->\n```bash\n", 1)
    assert len(after) == 2, "docs/slurm.md lost its tested deepspeed job script"
    script = tmp_path / "ds_job.sh"
    script.write_text(after[1].split("```", 1)[0])
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = dict(run_env(slurm_env, run_dir, tiny_data, 5), DEEPSPEED=str(BIN / "deepspeed"))
    rc = sbatch_wait(env, "dsjob", log, ["--nodes=2", str(script)], 300)
    assert rc == 0, log.read_text()[-6000:]
    start = next(m for m in metrics(run_dir) if m.get("event") == "start")
    assert start["world_size"] == 2
    # the same ranks, data and seed as the torchrun reference: the same first losses
    want = losses(reference.run_dir)
    assert losses(run_dir) == {s: want[s] for s in range(1, 6)}
