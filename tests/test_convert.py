"""Checkpoint conversion on real ZeRO-3 CPU checkpoints written by the training entry point.

Two runs of the tiny recipe are trained once for the module:
  a: 2 ranks, 20 steps, fp32, Llama (grouped-query attention, untied output)
  b: 3 ranks (parameters of 64 elements do not split evenly: partition padding), bf16 training
     (fp32 master weights in bf16_* files), a sliding window (-> Mistral), tied embeddings
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import PY, REPO, base_env, losses, tiny_overrides, torchrun
from safetensors.torch import load_file

from loretta.checkpoint.cli import main
from loretta.checkpoint.export import convert
from loretta.checkpoint.hf import param_shapes
from loretta.checkpoint.io import INDEX_FILE, SINGLE_FILE
from loretta.checkpoint.load import load_for_init, load_model, open_source
from loretta.checkpoint.verify import inspect, verify
from loretta.errors import CheckpointError
from loretta.model import Decoder, DecoderConfig
from loretta.units import parse_size
from loretta.vocab import VocabLayout

STEPS_A = 20


@pytest.fixture(scope="module")
def run_a(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    tmp = tmp_path_factory.mktemp("conv_a")
    torchrun(2, ["--config", "tiny", *tiny_overrides(tmp, steps=STEPS_A, data=tiny_data)])
    return tmp / "run"


@pytest.fixture(scope="module")
def run_b(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    tmp = tmp_path_factory.mktemp("conv_b")
    more = {
        "model.sliding_window": 16,
        "model.tie_embeddings": "true",
        "run.precision": "bf16",  # DeepSpeed names its files bf16_zero_pp_rank_*
        "optim.warmup_steps": 1,
    }
    torchrun(3, ["--config", "tiny", *tiny_overrides(tmp, steps=2, data=tiny_data, **more)])
    return tmp / "run"


def step_of(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def st_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors folder, read with the safetensors library itself."""
    index = folder / INDEX_FILE
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else [SINGLE_FILE]
    )
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(folder / f))
    return out


def zero_to_fp32(step: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(step), tag="ds"))


def real_batch(step: Path, rows: int = 4) -> torch.Tensor:
    """Token rows (rows, seq_len) from the run's own training data loader."""
    from loretta.data.loader import build_loader
    from loretta.train.checkpoint import read_config

    loader, _ = build_loader(read_config(step), 0, 1)
    return next(iter(loader))["tokens"][:rows].long()


def assert_no_partial(dst: Path) -> None:
    assert not dst.exists(), f"{dst} left behind"
    leftovers = [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]
    assert not leftovers, leftovers


# ---- names and shapes ---------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True])
def test_param_shapes_match_the_decoder(tie: bool) -> None:
    cfg = DecoderConfig(
        vocab_size=96, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, tie_embeddings=tie
    )
    with torch.device("meta"):
        model = Decoder(cfg)
    assert param_shapes(cfg) == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1.5MiB") == 3 * 2**19


# ---- ZeRO-3 -> consolidated ---------------------------------------------------------------------
@pytest.mark.parametrize("which", ["a", "b"])
def test_consolidated_equals_deepspeed_zero_to_fp32(
    which: str, run_a: Path, run_b: Path, tmp_path: Path
) -> None:
    step = step_of(run_a if which == "a" else run_b)
    dst = tmp_path / "out"
    shard = "20KB" if which == "b" else "2GB"  # b: many shards + index
    main([str(step), str(dst), "--to", "safetensors", "--shard-size", shard, "--no-progress"])
    ref, ours = zero_to_fp32(step), st_dict(dst)
    assert list(ours) and set(ours) == set(ref)
    for name, t in ref.items():
        assert ours[name].dtype == torch.float32 and torch.equal(ours[name], t), name
    assert (dst / INDEX_FILE).exists() == (which == "b")
    assert (dst / "config.yaml").read_text() == (step / "config.yaml").read_text()
    assert json.loads((dst / "layout.json").read_text()) == json.loads(
        (step / "layout.json").read_text()
    )
    if which == "a":  # bf16 output is torch's round-to-nearest-even of the fp32 master weights
        convert(step, tmp_path / "bf16", "safetensors", dtype="bf16", progress=False)
        half = st_dict(tmp_path / "bf16")
        assert all(torch.equal(half[n], t.to(torch.bfloat16)) for n, t in ref.items())


def test_deepspeeds_own_zero_to_fp32_reads_a_step_folder_without_a_tag(
    run_a: Path, tmp_path: Path
) -> None:
    """The step folder carries DeepSpeed's `latest` tag file (listed in the manifest), so
    `zero_to_fp32.py . OUT` run inside it and `get_fp32_state_dict_from_zero_checkpoint(step)`
    work as DeepSpeed users call them, and give our converter's tensors exactly."""
    import deepspeed.utils.zero_to_fp32 as z

    step = step_of(run_a)
    assert (step / "latest").read_text() == "ds"
    assert "latest" in json.loads((step / "manifest.json").read_text())["files"]
    main([str(step), str(tmp_path / "ours"), "--to", "safetensors", "--no-progress"])
    ours = st_dict(tmp_path / "ours")
    ref = dict(z.get_fp32_state_dict_from_zero_checkpoint(str(step)))  # no tag
    assert list(ours) and set(ref) == set(ours)
    assert all(torch.equal(ref[n], t) for n, t in ours.items())
    out = tmp_path / "ds_out"
    # the copy DeepSpeed leaves in the folder (run from deepspeed/utils/, the script's folder
    # comes first on sys.path and its torch.py shadows torch), run as users do: from inside it
    assert (step / "zero_to_fp32.py").read_text() == Path(z.__file__).read_text()
    res = subprocess.run(
        [PY, "zero_to_fp32.py", ".", str(out), "--safe_serialization"],
        cwd=step,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    script = st_dict(out)
    assert set(script) == set(ours)
    assert all(torch.equal(script[n], t) for n, t in ours.items())


# ---- Hugging Face export ------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["a", "b"])
def test_hf_export_loads_in_transformers_with_our_logits(
    which: str, run_a: Path, run_b: Path, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    step = step_of(run_a if which == "a" else run_b)
    dst = convert(step, tmp_path / "hf", "hf", shard_size=50_000, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    ours, layout = load_model(step)  # straight from the ZeRO-3 rank files
    if which == "a":
        assert type(hf).__name__ == "LlamaForCausalLM"
        assert not hf.config.tie_word_embeddings
    else:
        assert type(hf).__name__ == "MistralForCausalLM"
        assert hf.config.sliding_window == ours.cfg.sliding_window == 16
        assert hf.config.tie_word_embeddings
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
        assert "lm_head.weight" not in json.loads((dst / INDEX_FILE).read_text())["weight_map"]
    assert hf.config.bos_token_id == layout.bos_id and hf.config.eos_token_id == layout.eos_id
    ids = real_batch(step)
    assert ids.shape[1] > 16  # longer than the window of run b
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff
    assert VocabLayout.from_dict(json.loads((dst / "loretta_layout.json").read_text())) == layout


@pytest.mark.parametrize("which", ["a", "b"])
def test_ours_to_hf_to_ours_is_bitwise_identity(
    which: str, run_a: Path, run_b: Path, tmp_path: Path
) -> None:
    step = step_of(run_a if which == "a" else run_b)
    convert(step, tmp_path / "ours", "safetensors", progress=False)
    convert(tmp_path / "ours", tmp_path / "hf", "hf", shard_size=30_000, progress=False)
    convert(tmp_path / "hf", tmp_path / "back", "loretta", progress=False)
    first, back = st_dict(tmp_path / "ours"), st_dict(tmp_path / "back")
    assert set(first) == set(back)
    assert all(torch.equal(first[n], back[n]) and first[n].dtype == back[n].dtype for n in first)
    for f in ("config.yaml", "layout.json"):
        assert (tmp_path / "back" / f).read_text() == (tmp_path / "ours" / f).read_text()
    # verify: every pair of formats agrees bitwise (exit 0) ...
    for a, b in ((step, tmp_path / "hf"), (tmp_path / "hf", tmp_path / "back")):
        assert main(["verify", str(a), str(b)]) == 0
    # ... and one changed weight is found (exit 1, named)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "back", bad)
    t = st_dict(bad)
    t["norm.weight"][3] += 1e-3
    from safetensors.torch import save_file

    save_file(t, bad / SINGLE_FILE)
    report = verify(step, bad)
    assert not report["match"] and report["problems"] == ["norm.weight: max |a-b| = 0.001"]
    assert verify(step, bad, atol=2e-3)["match"]
    assert main(["verify", str(step), str(bad)]) == 1


def test_hf_folder_without_loretta_files_needs_a_layout(run_b: Path, tmp_path: Path) -> None:
    step = step_of(run_b)
    hf = foreign_hf(step, tmp_path / "hf")  # the model config comes from config.json
    with pytest.raises(CheckpointError, match="pass --layout"):
        convert(hf, tmp_path / "ours", "loretta", progress=False)
    assert_no_partial(tmp_path / "ours")
    args = [
        str(hf),
        str(tmp_path / "ours"),
        "--to",
        "loretta",
        "--layout",
        str(step / "layout.json"),
    ]
    assert main(args) == 0
    assert verify(step, tmp_path / "ours")["match"]
    src = open_source(tmp_path / "ours")
    assert src.model_cfg.sliding_window == 16 and src.model_cfg.tie_embeddings
    src.close()


def test_cli_wrapper_inspect_and_step_selection(run_a: Path, tmp_path: Path) -> None:
    step = step_of(run_a)
    convert(step, tmp_path / "ours", "safetensors", progress=False)
    res = subprocess.run(
        [
            PY,
            str(REPO / "tools" / "convert_checkpoint.py"),
            "inspect",
            str(run_a),
            "--json",
            "--step",
            str(STEPS_A),
        ],
        capture_output=True,
        text=True,
        env=base_env(),
        cwd=REPO,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    zero = json.loads(res.stdout.strip().splitlines()[-1])
    cons = inspect(tmp_path / "ours")
    assert zero["kind"] == "zero" and zero["step"] == STEPS_A and zero["world_size"] == 2
    assert zero["params"] == cons["params"] == 123_200  # tiny recipe: dim 64, 2 layers, vocab 192
    # same tensors, shapes, dtypes and checksums whether read from the rank files or the export
    assert zero["tensors"] == cons["tensors"]
    with pytest.raises(CheckpointError, match="step_00000007: no such checkpoint"):
        open_source(run_a, step=7)


def foreign_hf(step: Path, dst: Path) -> Path:
    """An HF export with loretta's own files removed: a folder some other tool wrote."""
    export = convert(step, dst, "hf", progress=False)
    for f in ("loretta_config.yaml", "loretta_layout.json"):
        (export / f).unlink()
    return export


# ---- warm start ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def warm_run(run_a: Path, tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """A new run (world size 1) initialised from the HF export of run a (world size 2), stripped
    of loretta's files as if another tool had written it: checkpoint.init_layout names the
    layout."""
    tmp = tmp_path_factory.mktemp("warm")
    export = foreign_hf(step_of(run_a), tmp / "hf")
    more = {
        "checkpoint.init_from": str(export),
        "checkpoint.init_layout": str(step_of(run_a) / "layout.json"),
        "checkpoint.save_final": "false",
        "optim.warmup_steps": 2,
    }
    torchrun(1, ["--config", "tiny", *tiny_overrides(tmp, steps=2, data=tiny_data, **more)])
    return tmp / "run"


def test_warm_start_first_loss_continues_from_the_source(run_a: Path, warm_run: Path) -> None:
    src, warm = losses(run_a), losses(warm_run)
    fresh, last = src[1], src[STEPS_A]
    assert fresh - last > 1.0  # the source run learned something
    assert abs(warm[1] - last) < 0.25 * (fresh - last), (warm[1], last, fresh)


def test_warm_start_keeps_the_weights_after_an_optimizer_step(run_a: Path, warm_run: Path) -> None:
    src, warm = losses(run_a), losses(warm_run)
    assert abs(warm[2] - src[STEPS_A]) < 0.25 * (src[1] - src[STEPS_A]), (warm, src[STEPS_A])


# ---- bad inputs: a clear CheckpointError naming the file, and no partial output -------------------
def copy_step(run: Path, tmp: Path) -> Path:
    step = step_of(run)
    dst = tmp / "ckpt" / step.name
    shutil.copytree(step, dst)
    return dst


def flat_record(path: Path) -> tuple[int, int]:
    """(file offset, bytes) of rank file `path`'s first fp32 flat group, found by its bytes."""
    from loretta.engine import weights_only_loads

    with weights_only_loads():
        sd = torch.load(path, map_location="cpu")["optimizer_state_dict"]
    data = sd["fp32_flat_groups"][0].detach().numpy().tobytes()
    start = path.read_bytes().find(data)
    assert start > 0
    return start, len(data)


def test_missing_rank_file(run_a: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    step = copy_step(run_a, tmp_path)
    (step / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    dst = tmp_path / "out"
    with pytest.raises(
        CheckpointError, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt: missing"
    ):
        convert(step, dst, "hf", progress=False)
    assert_no_partial(dst)
    assert main([str(step), str(dst), "--to", "safetensors"]) == 2
    assert (
        "zero_pp_rank_1_mp_rank_00_optim_states.pt: missing (rank 1 of 2)"
        in capsys.readouterr().err
    )
    assert_no_partial(dst)
    # all ranks back, plus a file left over from an earlier run with more ranks
    orig = step_of(run_a) / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copy(orig, step / "ds" / orig.name)
    shutil.copy(orig, step / "ds" / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match="rank 2 but state.json says world_size=2"):
        convert(step, dst, "hf", progress=False)
    assert_no_partial(dst)


def test_corrupted_and_truncated_optimizer_state(run_a: Path, tmp_path: Path) -> None:
    step = copy_step(run_a, tmp_path)
    rank1 = step / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    good = rank1.read_bytes()
    start, n = flat_record(rank1)
    data = bytearray(good)
    data[start + n // 2] ^= 0x40  # one flipped bit in the fp32 master weights
    rank1.write_bytes(bytes(data))
    dst = tmp_path / "out"
    with pytest.raises(
        CheckpointError,
        match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt: fp32 weights fail their CRC-32",
    ):
        convert(step, dst, "safetensors", progress=False)
    assert_no_partial(dst)
    rank1.write_bytes(good[: len(good) // 2])  # truncated (an interrupted copy)
    with pytest.raises(
        CheckpointError, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt: not a complete"
    ):
        convert(step, dst, "safetensors", progress=False)
    assert_no_partial(dst)
    rank1.write_bytes(b"\0" * 64 + good[64:])  # garbage over the pickle's zip header
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt"):
        convert(step, dst, "safetensors", progress=False)
    assert_no_partial(dst)
    assert zipfile.is_zipfile(step / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")


def test_truncated_safetensors(run_a: Path, tmp_path: Path) -> None:
    src = convert(
        step_of(run_a), tmp_path / "ours", "safetensors", shard_size=100_000, progress=False
    )
    shard = sorted(src.glob("model-*.safetensors"))[1]  # model-00002-of-0000N
    shard.write_bytes(shard.read_bytes()[:-1000])
    dst = tmp_path / "hf"
    with pytest.raises(
        CheckpointError, match=rf"{shard.name}: unreadable safetensors file .* truncated or corrupt"
    ):
        convert(src, dst, "hf", progress=False)
    assert_no_partial(dst)
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(src)


def test_mismatched_layout_or_model_refused_for_warm_start(run_a: Path, tmp_path: Path) -> None:
    step = step_of(run_a)
    export = convert(step, tmp_path / "hf", "hf", progress=False)
    src = open_source(step)
    cfg, layout = src.model_cfg, src.layout
    src.close()
    assert layout is not None
    state = load_for_init(export, cfg, layout)
    assert set(state) == set(param_shapes(cfg))
    other = VocabLayout.build({"a": 64, "b": 32})  # data with a different vocabulary
    with pytest.raises(
        CheckpointError, match=r"loretta_layout\.json differs from this run's training data"
    ):
        load_for_init(export, cfg, other)
    bigger = dataclasses.replace(cfg, dim=128)
    with pytest.raises(CheckpointError, match=r"model\.dim: 64 vs 128"):
        load_for_init(export, bigger, layout)


def test_existing_destination_needs_overwrite(run_a: Path, tmp_path: Path) -> None:
    step = step_of(run_a)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="exists; pass --overwrite"):
        convert(step, dst, "safetensors", progress=False)
    assert (dst / "keep.txt").read_text() == "precious"
    convert(step, dst, "safetensors", overwrite=True, progress=False)
    assert sorted(p.name for p in dst.iterdir()) == [
        "config.yaml",
        "layout.json",
        "model.safetensors",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert os.access(dst / "model.safetensors", os.R_OK)


def test_warm_start_from_a_foreign_hf_folder(run_a: Path, tmp_path: Path) -> None:
    step = step_of(run_a)
    export = foreign_hf(step, tmp_path / "hf")
    with open_source(step) as src:
        cfg, layout = src.model_cfg, src.layout
    assert layout is not None
    with pytest.raises(CheckpointError) as err:
        load_for_init(export, cfg, layout)
    msg = str(err.value)
    assert f"checkpoint.init_from={str(export)!r}" in msg and "loretta_layout.json missing" in msg
    assert "--checkpoint.init_layout=LAYOUT.json" in msg and "--layout LAYOUT.json" in msg
    state = load_for_init(export, cfg, layout, step / "layout.json")
    ref = st_dict(convert(step, tmp_path / "ours", "safetensors", progress=False))
    assert set(state) == set(ref) and all(torch.equal(state[n], ref[n]) for n in ref)
    other = tmp_path / "other.json"
    other.write_text(json.dumps(VocabLayout.build({"a": 64, "c": 64}).to_dict()))
    with pytest.raises(CheckpointError, match=r"other\.json differs from this run's training"):
        load_for_init(export, cfg, layout, other)
    with pytest.raises(CheckpointError, match=r"nope\.json: no such layout file"):
        load_for_init(export, cfg, layout, tmp_path / "nope.json")


# ---- the export's tokenizer ----------------------------------------------------------------------
def test_hf_export_tokenizer_loads_in_transformers(
    run_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    step = step_of(run_a)
    dst = convert(step, tmp_path / "hf", "hf", progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(dst)
    layout = VocabLayout.from_dict(json.loads((dst / "loretta_layout.json").read_text()))
    vocab_size = json.loads((dst / "config.json").read_text())["vocab_size"]
    assert len(tok) == vocab_size == 192 > layout.size
    for m in layout.modalities:  # modality tokens are special tokens with their layout ids
        assert tok.convert_tokens_to_ids(m.token) == m.token_id
        assert m.token in tok.all_special_tokens
        assert tok.convert_tokens_to_ids(f"<{m.name}_7>") == m.offset + 7
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (
        layout.pad_id,
        layout.bos_id,
        layout.eos_id,
    )
    names = tok.convert_ids_to_tokens(list(range(vocab_size)))  # every id has its own token
    assert None not in names and len(set(names)) == vocab_size
    a, b = layout["a"], layout["b"]
    ids = [layout.bos_id, a.token_id, a.offset + 3, b.token_id, b.offset + 63, layout.eos_id]
    assert tok("<s> <a> <a_3> <b> <b_63> </s>")["input_ids"] == ids
    assert tok.decode(ids, skip_special_tokens=True).split() == ["<a_3>", "<b_63>"]
    # the folder is a complete transformers model: a pipeline builds and generates from it
    gen = transformers.pipeline("text-generation", model=str(dst), device="cpu")
    out = gen("<s> <a>", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert out.startswith("<s> <a>") and 2 < len(tok(out)["input_ids"]) <= 5


def test_hf_export_carries_the_text_tokenizer(run_a: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = "one two three four five six seven eight nine ten eleven twelve".split()
    text = Tokenizer(models.BPE())
    text.pre_tokenizer = pre_tokenizers.Whitespace()
    text.train_from_iterator(words * 10, trainers.BpeTrainer(vocab_size=60, show_progress=False))
    assert 20 < text.get_vocab_size() <= 60  # fits modality b (64 ids)
    text.save(str(tmp_path / "tokenizer.json"))
    args = [str(step_of(run_a)), str(tmp_path / "hf"), "--to", "hf", "--no-progress"]
    more = ["--tokenizer", str(tmp_path / "tokenizer.json"), "--tokenizer-modality", "b"]
    assert main([*args, *more]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    b = VocabLayout.from_dict(json.loads((tmp_path / "hf" / "loretta_layout.json").read_text()))[
        "b"
    ]
    for phrase in ("seven twelve", "three nine one"):
        want = [b.offset + i for i in text.encode(phrase).ids]
        assert tok(phrase)["input_ids"] == want
        assert tok.decode(want) == text.decode(text.encode(phrase).ids)
    assert tok.convert_tokens_to_ids("<b>") == b.token_id
    # a tokenizer that does not fit the modality is refused before anything is written
    big = Tokenizer(models.WordLevel({f"w{i}": i for i in range(65)}, unk_token="w0"))
    big.save(str(tmp_path / "big.json"))
    with pytest.raises(CheckpointError, match=r"big\.json: 65 tokens do not fit modality 'b'"):
        convert(
            step_of(run_a),
            tmp_path / "hf2",
            "hf",
            progress=False,
            tokenizer=tmp_path / "big.json",
            tokenizer_modality="b",
        )
    assert_no_partial(tmp_path / "hf2")
