"""Checkpoint integrity without a process group: manifests, damage reports, the fallback of
--resume auto, and RNG files that are never unpickled."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from loretta.config import load_config
from loretta.data.format import atomic_write_json
from loretta.errors import CheckpointError
from loretta.train import checkpoint as ckpt
from loretta.train import integrity


def fake_checkpoint(root: Path, step: int, world: int = 2) -> Path:
    """A checkpoint folder shaped like save_checkpoint's, with made-up DeepSpeed files."""
    tmp = root / f".step_{step:08d}.tmp"
    (tmp / "rng").mkdir(parents=True)
    (tmp / "ds").mkdir(parents=True)
    for r in range(world):
        state = {"exp_avg": torch.arange(8192.0 + r), "step": torch.tensor(3)}
        torch.save(state, tmp / "ds" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        torch.save(
            {"w": torch.ones(7)}, tmp / "ds" / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"
        )
        ckpt.save_rng(tmp / "rng" / f"rank_{r:05d}.safetensors")
    cfg = load_config("tiny")
    (tmp / "config.yaml").write_text(cfg.to_yaml())
    atomic_write_json(tmp / "layout.json", {"modalities": []})
    atomic_write_json(
        tmp / "state.json",
        {"step": step, "world_size": world, "complete": True, "version": ckpt.FORMAT_VERSION},
    )
    integrity.write_manifest(tmp)
    final = ckpt.step_dir(root, step)
    tmp.rename(final)
    return final


def cfg_for(run: Path, resume: str = "auto") -> object:
    return load_config("tiny", [f"--run.run_dir={run}", f"--checkpoint.resume={resume}"])


OPT = "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"


def flip_byte(f: Path, at: int = 1000) -> None:
    b = bytearray(f.read_bytes())
    b[at] ^= 0x01
    f.write_bytes(bytes(b))


DAMAGE = {
    "flipped byte in an optimizer file": (
        lambda d: flip_byte(d / OPT),
        f"{OPT}: contents changed",
    ),
    "truncated file": (
        lambda d: (d / OPT).write_bytes((d / OPT).read_bytes()[:500]),
        f"{OPT}: truncated: 500 bytes",
    ),
    "deleted rank file": (
        lambda d: (d / "ds/zero_pp_rank_0_mp_rank_00_model_states.pt").unlink(),
        "ds/zero_pp_rank_0_mp_rank_00_model_states.pt: missing",
    ),
    "deleted RNG file": (
        lambda d: (d / "rng" / "rank_00001.safetensors").unlink(),
        "rng/rank_00001.safetensors: missing",
    ),
    "deleted state.json": (lambda d: (d / "state.json").unlink(), "state.json: missing"),
    "deleted manifest": (
        lambda d: (d / "manifest.json").unlink(),
        "manifest.json: missing",
    ),
    "file slipped in": (
        lambda d: (d / "ds/zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(b"x"),
        "ds/zero_pp_rank_2_mp_rank_00_optim_states.pt: not in the manifest",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damage_is_named_and_auto_falls_back(
    case: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "run" / "checkpoints"
    old = fake_checkpoint(root, 5)
    new = fake_checkpoint(root, 10)
    assert ckpt.check_folder(new) == [] and ckpt.resolve_resume(cfg_for(tmp_path / "run")) == new
    damage, expect = DAMAGE[case]
    damage(new)
    problems = ckpt.check_folder(new)
    assert any(expect in p for p in problems), problems
    # --resume auto: reported, and the older intact checkpoint is used
    assert ckpt.resolve_resume(cfg_for(tmp_path / "run")) == old
    err = capfd.readouterr().err
    assert f"checkpoint {new} is damaged" in err and expect in err
    assert "resuming from step_00000005" in err
    # named explicitly: one error naming the file
    with pytest.raises(CheckpointError, match="is damaged: .*" + expect.split(":")[0]):
        ckpt.resolve_resume(cfg_for(tmp_path / "run", str(new)))


def test_size_mode_skips_reading_but_catches_truncation(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    d = fake_checkpoint(root, 5)
    flip_byte(d / OPT)
    assert ckpt.check_folder(d, full=False) == []  # same size: only a full check reads
    (d / OPT).write_bytes(b"short")
    assert "truncated" in ckpt.check_folder(d, full=False)[0]


def test_every_checkpoint_damaged_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "run" / "checkpoints"
    d = fake_checkpoint(root, 5)
    flip_byte(d / OPT)
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged .*step_00000005"):
        ckpt.resolve_resume(cfg_for(tmp_path / "run"))


def test_interrupted_save_is_never_a_candidate(tmp_path: Path) -> None:
    root = tmp_path / "run" / "checkpoints"
    d = fake_checkpoint(root, 5)
    shutil.copytree(d, root / ".step_00000010.tmp")
    assert ckpt.resolve_resume(cfg_for(tmp_path / "run")) == d


def test_manifest_paths_cannot_leave_the_folder(tmp_path: Path) -> None:
    d = fake_checkpoint(tmp_path, 5)
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["../../etc/passwd"] = {"size": 1, "crc32": "00000000"}
    (d / "manifest.json").write_text(json.dumps(m))
    assert "leaves the folder" in ckpt.check_folder(d)[0]


class Hostile:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(Path(__file__).parent / ".pwned"),))


def test_a_hostile_rng_pickle_never_runs(tmp_path: Path) -> None:
    marker = Path(__file__).parent / ".pwned"
    marker.unlink(missing_ok=True)
    d = fake_checkpoint(tmp_path, 5, world=1)
    (d / "rng" / "rank_00000.safetensors").unlink()
    with open(d / "rng" / "rank_00000.pt", "wb") as f:
        pickle.dump({"torch": Hostile()}, f)
    with pytest.raises(CheckpointError, match=r"rank_00000\.pt: an RNG file in the old pickle"):
        ckpt.load_rng(d, 0, 1)
    # the same with torch's zip format
    torch.save({"torch": Hostile()}, d / "rng" / "rank_00000.pt")
    with pytest.raises(CheckpointError, match="cannot be read without running code"):
        ckpt.load_rng(d, 0, 1)
    assert not marker.exists()


def test_old_pt_rng_with_only_tensors_loads(tmp_path: Path) -> None:
    d = fake_checkpoint(tmp_path, 5, world=1)
    (d / "rng" / "rank_00000.safetensors").unlink()
    import random

    torch.save(
        {"torch": torch.get_rng_state(), "python": random.getstate()}, d / "rng" / "rank_00000.pt"
    )
    s = ckpt.read_rng(d / "rng" / "rank_00000.pt")
    assert torch.equal(s["torch"], torch.get_rng_state())


def test_rng_roundtrip_is_exact(tmp_path: Path) -> None:
    import random

    import numpy as np

    np.random.randn()  # leaves a cached gaussian in numpy's state
    ckpt.save_rng(tmp_path / "r.safetensors")
    a = (random.random(), np.random.rand(), np.random.randn(), torch.rand(4))
    ckpt.set_rng_state(ckpt.read_rng(tmp_path / "r.safetensors"))
    b = (random.random(), np.random.rand(), np.random.randn(), torch.rand(4))
    assert a[:3] == b[:3] and torch.equal(a[3], b[3])


def test_a_deepspeed_file_whose_pickle_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = Path(__file__).parent / ".pwned"
    marker.unlink(missing_ok=True)
    root = tmp_path / "run" / "checkpoints"
    old = fake_checkpoint(root, 5)
    new = fake_checkpoint(root, 10)
    torch.save({"exp_avg": torch.ones(3), "x": Hostile()}, new / OPT)
    integrity.write_manifest(new)  # whoever planted it can write a matching manifest
    (problem,) = ckpt.check_folder(new)
    assert problem.startswith(f"{OPT}: its pickle references ") and "pathlib.Path" in problem
    assert ckpt.resolve_resume(cfg_for(tmp_path / "run")) == old
    assert not marker.exists()


def test_pickle_scan_resolves_every_protocol() -> None:
    for proto in (0, 2, 4, 5):
        found = integrity.pickle_globals(pickle.dumps({"h": Hostile()}, protocol=proto))
        assert "pathlib" in {m for m, _ in found}, (proto, found)


def test_a_checkpoint_from_before_manifests(tmp_path: Path) -> None:
    """Format 1: no manifest, RNG pickled with torch.save (numpy's state is an ndarray)."""
    d = fake_checkpoint(tmp_path, 5, world=1)
    (d / "manifest.json").unlink()
    state = json.loads((d / "state.json").read_text())
    (d / "state.json").write_text(json.dumps(dict(state, version=1)))
    (d / "rng" / "rank_00000.safetensors").unlink()
    torch.save({"torch": torch.get_rng_state()}, d / "rng" / "rank_00000.pt")
    assert ckpt.check_folder(d) == []  # structural checks only, and the RNG reads safely
    torch.save(ckpt.rng_state(), d / "rng" / "rank_00000.pt")
    (problem,) = ckpt.check_folder(d)
    assert "rank_00000.pt: an RNG file in the old pickle format" in problem


class _Planted:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch planted-ran",))


def test_deepspeed_loads_are_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every torch.load inside engine.weights_only_loads (DeepSpeed's checkpoint reads) refuses
    a pickled callable even when the caller asks for an unrestricted load: nothing runs."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from loretta.engine import weights_only_loads

    monkeypatch.chdir(tmp_path)
    evil, ok = tmp_path / "evil.pt", tmp_path / "ok.pt"
    torch.save({"module": torch.zeros(2), "evil": _Planted()}, evil)
    torch.save({"m": torch.ones(1), "stage": ZeroStageEnum.weights, "s": {1, 2}}, ok)
    unrestricted = {"weights_only": False}  # what DeepSpeed passes
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(evil, **unrestricted)
    assert not (tmp_path / "planted-ran").exists()
    with weights_only_loads():  # tensors and DeepSpeed's own records still load
        got = torch.load(ok, **unrestricted)
    assert torch.equal(got["m"], torch.ones(1)) and got["stage"] == ZeroStageEnum.weights
    assert torch.load is not None and torch.load.__name__ == "load"  # restored
