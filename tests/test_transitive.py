"""LoReTTa's transitive objective: planning, generation, loss masks, and ZeRO-3 runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import losses, metrics, tiny_overrides, torchrun

from loretta.config import load_config
from loretta.data.loader import build_loader
from loretta.data.sequences import IGNORE
from loretta.dist import DistInfo
from loretta.errors import ConfigError
from loretta.model import Decoder
from loretta.objectives import LocalEngine
from loretta.train.loss import cross_entropy_per_token
from loretta.train.trainer import finalize_model_config, prepare


@pytest.fixture(scope="module")
def abc_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loretta.data.synthetic import ensure_synthetic

    root = tmp_path_factory.mktemp("abc")
    cfg = load_config("tiny_loretta")
    for s in cfg.data.sources:
        assert s.synthetic is not None
        ensure_synthetic(root / s.name, s.synthetic)
    return root


def overrides(root: Path, **more: Any) -> list[str]:
    o = [f"--data.sources.0.path={root / 'ab'}", f"--data.sources.1.path={root / 'bc'}"]
    return o + [f"--{k}={v}" for k, v in more.items()]


def setup(root: Path, *over: str) -> tuple[Any, Any, Any, Decoder]:
    cfg = load_config("tiny_loretta", overrides(root) + list(over))
    p = prepare(cfg, DistInfo())
    finalize_model_config(cfg, p.layout.size)
    loader, _ = build_loader(cfg, 0, 1, None, p.objective.planner_factory())
    model = Decoder(cfg.model)
    model.init_weights(0)
    return cfg, p, iter(loader), model


def test_transitive_documents_are_generated_in_range_and_masked(abc_data: Path) -> None:
    _cfg, p, it, model = setup(abc_data)
    lay = p.layout
    batch = next(it)
    docs = batch["gen_docs"]
    assert len(docs) >= 3  # transitive_prob 0.5 over ~3.5 documents per row x 8 rows
    batch = p.objective.prepare(batch, LocalEngine(model), 0)
    for r, start, _, plan, _ in docs:
        gen, real = plan.blocks
        assert gen.gen_from >= 0 and real.gen_from < 0 and gen.modality != real.modality
        m_gen, m_real = lay.modalities[gen.modality], lay.modalities[real.modality]
        toks, tgt = batch["tokens"][r], batch["targets"][r]
        assert toks[start] == lay.bos_id and toks[start + 1] == m_gen.token_id
        j = start + 2
        while toks[j] != m_real.token_id:  # the generated block, in its modality's id range
            assert m_gen.offset <= toks[j] < m_gen.stop, (toks[j], m_gen)
            assert tgt[j - 1] == IGNORE  # no loss on generated tokens (default)
            j += 1
        assert j > start + 2  # at least one generated token
        assert tgt[j - 1] == m_real.token_id  # the real block is predicted from C'
        n = real.n
        assert (tgt[j : j + n] == toks[j + 1 : j + n + 1]).all() and (
            tgt[j : j + n] != IGNORE
        ).all()


def test_one_generate_call_per_wave_for_every_modality(
    abc_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks of different modalities in one micro-batch share a call (a decode step costs the
    same for any mix of rows): one generate call per wave, each row in its own id range."""
    import loretta.transitive as tr

    _cfg, p, it, model = setup(abc_data)
    batch = next(it)
    gen_modalities = {plan.blocks[0].modality for *_, plan, _ in batch["gen_docs"]}
    assert len(gen_modalities) == 2, gen_modalities  # both links in this micro-batch
    calls: list[int] = []
    real = tr.generate

    def counting(*a: Any, **k: Any) -> Any:
        calls.append(len(a[1]))
        return real(*a, **k)

    monkeypatch.setattr(tr, "generate", counting)
    p.objective.prepare(batch, LocalEngine(model), 0)
    assert calls == [len(batch["gen_docs"])], calls


def _generated_target_positions(batch: dict[str, Any], layout: Any) -> torch.Tensor:
    """(B, T) bool: target positions that predict a generated token, found by walking the rows
    (not from the objective's own masks): from the generated block's modality token up to the
    real block's modality token, in every transitive document [bos] <c> C' <a> A [eos]."""
    mask = torch.zeros_like(batch["targets"], dtype=torch.bool)
    for r, start, _, plan, _ in batch["gen_docs"]:
        gen, real = plan.blocks
        assert gen.gen_from >= 0 and real.gen_from < 0
        toks = batch["tokens"][r]
        j = start + 2
        while toks[j] != layout.modalities[real.modality].token_id:
            mask[r, j - 1] = True  # the target at j - 1 is the generated token at j
            j += 1
    return mask


def test_no_gradient_flows_through_generated_tokens(abc_data: Path) -> None:
    """With loss_on_generated=false the gradient is exactly that of the loss on the real tokens:
    the generated block's targets do not reach it. With loss_on_generated=true they do."""
    one_kind = "--objective.all_modalities_prob=0"  # transitive documents only: [<c> C' <a> A]
    _, p, it, model = setup(abc_data, one_kind)
    _, p_on, it_on, _ = setup(abc_data, one_kind, "--objective.loss_on_generated=true")
    off = p.objective.prepare(next(it), LocalEngine(model), 0)
    on = p_on.objective.prepare(next(it_on), LocalEngine(model), 0)
    assert torch.equal(off["tokens"], on["tokens"])  # same seed: the same generated tokens
    gen = _generated_target_positions(off, p.layout)
    assert gen.sum() >= 8, "too few generated tokens for a meaningful check"
    # the two settings differ exactly at the generated targets
    assert (off["targets"][gen] == IGNORE).all() and (on["targets"][gen] != IGNORE).all()
    assert torch.equal(off["targets"][~gen], on["targets"][~gen])

    def grad(targets: torch.Tensor) -> torch.Tensor:
        """d(mean loss over the counted targets) / d(the first layer's attention weights)."""
        model.zero_grad()
        logits = model(off["tokens"], off["positions"], off["doc_ids"])
        tl = cross_entropy_per_token(logits, targets)
        (tl.sum() / (targets != IGNORE).sum()).backward()
        w = model.layers[0].attention.wqkv.weight
        assert w.grad is not None
        return w.grad.clone()

    g_off, g_on = grad(off["targets"]), grad(on["targets"])
    assert not torch.allclose(g_off, g_on, rtol=1e-3, atol=1e-7)
    # off == the loss on the real targets only (generated ones masked here, independently)
    real_only = on["targets"].masked_fill(gen, IGNORE)
    torch.testing.assert_close(g_off, grad(real_only), rtol=1e-6, atol=1e-9)
    # other ids at the generated targets: the gradient moves with loss_on_generated=true, and
    # the real-token loss (what loss_on_generated=false trains on) does not move at all
    lay = p.layout
    shifted = on["targets"].clone()
    for m in lay.modalities:  # another id of the same modality, position by position
        inside = gen & (shifted >= m.offset) & (shifted < m.stop)
        shifted[inside] = m.offset + (shifted[inside] - m.offset + 1) % (m.stop - m.offset)
    assert (
        torch.equal(shifted[~gen], on["targets"][~gen])
        and (shifted[gen] != on["targets"][gen]).all()
    )
    assert not torch.allclose(grad(shifted), g_on, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(grad(shifted.masked_fill(gen, IGNORE)), g_off, rtol=0, atol=0)


def test_generation_is_deterministic_for_a_seed(abc_data: Path) -> None:
    outs = []
    for _ in range(2):
        _, p, it, model = setup(abc_data)
        outs.append(p.objective.prepare(next(it), LocalEngine(model), 0)["tokens"])
    assert torch.equal(outs[0], outs[1])
    _, p, it, model = setup(abc_data, "--run.seed=5")
    assert not torch.equal(outs[0], p.objective.prepare(next(it), LocalEngine(model), 0)["tokens"])


def _gen_blocks(abc_data: Path, *over: str) -> dict[int, list[list[int]]]:
    """modality index -> the generated blocks of one prepared micro-batch."""
    _, p, it, model = setup(abc_data, *over)
    batch = next(it)
    docs = batch["gen_docs"]
    toks = p.objective.prepare(batch, LocalEngine(model), 0)["tokens"]
    lay, out = p.layout, {}
    for r, start, _, plan, _ in docs:
        gen, real = plan.blocks
        end = start + 2
        while toks[r, end] != lay.modalities[real.modality].token_id:
            end += 1
        out.setdefault(gen.modality, []).append(toks[r, start + 2 : end].tolist())
    return out


def test_each_modality_is_decoded_with_its_own_decoding(abc_data: Path) -> None:
    """generation.top_k_by_modality: c greedy while a is sampled gives c's blocks of an all-
    greedy run and a's blocks of an all-sampled run (one generate call holds both)."""
    sampled = _gen_blocks(abc_data, "--objective.generation.top_k=0")
    greedy = _gen_blocks(abc_data, "--objective.generation.top_k=1")
    mixed = _gen_blocks(
        abc_data,
        "--objective.generation.top_k=0",
        "--objective.generation.top_k_by_modality={c: 1}",
    )
    a, c = (setup(abc_data)[1].layout.index(m) for m in ("a", "c"))
    assert mixed[a] and mixed[c]
    assert sampled[c] != greedy[c] and sampled[a] != greedy[a]  # the decodings differ here
    assert mixed[c] == greedy[c] and mixed[a] == sampled[a]
    cold = _gen_blocks(
        abc_data,
        "--objective.generation.top_k=0",
        "--objective.generation.temperature_by_modality={a: 0.01}",
    )
    assert cold[c] == sampled[c] and cold[a] != sampled[a]


def test_all_modalities_documents(abc_data: Path) -> None:
    _, p, it, model = setup(
        abc_data, "--objective.transitive_prob=0", "--objective.all_modalities_prob=1"
    )
    batch = p.objective.prepare(next(it), LocalEngine(model), 0)
    assert batch["gen_docs"]
    for _, _, _, plan, _ in batch["gen_docs"]:
        assert len(plan.blocks) == 3 and sum(b.gen_from >= 0 for b in plan.blocks) == 1


BAD = [
    (["--objective.links.0.target=zz"], "objective.links.0.target='zz': not a modality"),
    (["--objective.links.0.generate=b"], "cycle"),
    (["--objective.links.0.target=c"], "target='c' equals generate"),
    (["--objective.links.0.source=xy"], "objective.links.0.source='xy': no such data source"),
    (
        [
            "--objective.links.0.prompt=c",
            "--objective.links.0.generate=a",
            "--objective.links.0.target=b",
        ],
        "objective.links.0.prompt='c': source 'ab' does not have it",
    ),
    (["--objective.generation.max_tokens={}"], "set objective.generation.max_tokens.c"),
    (["--objective.transitive_prob=1.5"], "objective.transitive_prob=1.5"),
    (["--objective.links.1.transitive_prob=-0.1"], "objective.links.1.transitive_prob=-0.1"),
    (
        ["--objective.links.0.transitive_prob=0.8", "--objective.all_modalities_prob=0.3"],
        "objective.links.0.transitive_prob + all_modalities_prob = 1.1",
    ),
    (["--objective.links.0.via=[b]"], "cycle"),
    (
        ["--objective.generation.temperature_by_modality={zz: 0.5}"],
        "objective.generation.temperature_by_modality.zz: not a modality",
    ),
    (
        ["--objective.generation.top_k_by_modality={c: -1}"],
        "objective.generation.top_k_by_modality.c=-1: must be >= 0",
    ),
    (
        ["--objective.generation.temperature_by_modality={a: 101}"],
        "objective.generation.temperature_by_modality.a=101",
    ),
]


@pytest.mark.parametrize(("over", "msg"), BAD)
def test_bad_objective_configs_rejected(abc_data: Path, over: list[str], msg: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg = load_config("tiny_loretta", overrides(abc_data) + over)
        prepare(cfg, DistInfo())
    assert msg in str(e.value), str(e.value)


def _run(tmp: Path, data: Path, nproc: int = 2, **more: Any) -> dict[int, float]:
    over = tiny_overrides(tmp, steps=6, data=data / "ab", **{"optim.warmup_steps": 2, **more})
    torchrun(nproc, ["--config", "tiny_loretta", *over, f"--data.sources.1.path={data / 'bc'}"])
    return losses(tmp / "run")


@pytest.mark.parametrize("gather", ["once", "layers"])
def test_zero3_transitive_run_no_hang_and_reproducible(
    tmp_path: Path, abc_data: Path, gather: str
) -> None:
    # variable-length generation: ranks stop at different tokens and hold different numbers of
    # transitive documents; the run must neither hang nor depend on anything but the seed
    more = {
        "objective.generation.gather": gather,
        "objective.generation.layers_per_group": 1,
        "objective.generation.batch_size": 5,
    }
    a = _run(tmp_path / "a", abc_data, **more)
    b = _run(tmp_path / "b", abc_data, **more)
    assert sorted(a) == list(range(1, 7)) and a == b
    m = [
        x
        for x in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in x
    ]
    import json

    rec = json.loads(m[-1])
    assert rec["generation_share"] > 0 and any(
        k.startswith("loss/dir/c'->a") or k.startswith("loss/dir/a'->c") for k in rec
    )


def test_chain_for_a_single_modality_source(abc_data: Path) -> None:
    """a -> b' -> c', then train [c', a]: two generation waves for one document."""
    chain = [
        "--data.sources.0.modalities=[a]",
        "--objective.links=[{source: ab, prompt: a, via: [b], generate: c, target: a}]",
        "--objective.transitive_prob=1.0",
    ]
    _, p, it, model = setup(abc_data, *chain)
    lay = p.layout
    batch = next(it)
    docs = [d for d in batch["gen_docs"] if d[3].source == 0]
    assert docs
    batch = p.objective.prepare(batch, LocalEngine(model), 0)
    c, a = lay["c"], lay["a"]
    for r, start, _, plan, _ in docs:
        assert [(b.modality, b.gen_from) for b in plan.blocks] == [(2, 0), (0, -1)]
        toks = batch["tokens"][r]
        assert toks[start + 1] == c.token_id
        j = start + 2
        while toks[j] != a.token_id:
            assert c.offset <= toks[j] < c.stop
            j += 1
    assert p.objective.last_generation["gen_tokens"] > 0


def test_transitive_documents_start_after_the_configured_fraction(abc_data: Path) -> None:
    cfg, _p, it, _ = setup(abc_data, "--objective.transitive_start=0.5", "--run.steps=10")
    # the start is row 5 * 8 = 40 (5 steps of 8 rows at world size 1); documents are planned
    # per chunk of data.plan_chunk_rows rows, so the first transitive documents are those of
    # the first chunk that starts at or after row 40
    R = cfg.data.plan_chunk_rows
    first = -(-40 // R) * R
    batches = [next(it) for _ in range(first // 8 + 3)]
    assert all(not b["gen_docs"] for b in batches[:5])  # rows before the start: real only
    assert all(not b["gen_docs"] for b in batches[: first // 8])
    assert all(b["gen_docs"] for b in batches[first // 8 :])


def test_each_link_has_its_own_transitive_prob(abc_data: Path) -> None:
    # link 0 (source ab) always, link 1 (source bc) never
    _, _, it, _ = setup(
        abc_data, "--objective.links.0.transitive_prob=1.0", "--objective.links.1.transitive_prob=0"
    )
    docs = [next(it)["gen_docs"] for _ in range(4)]
    by_source = [d[3].source for batch in docs for d in batch]
    assert by_source and set(by_source) == {0}
    # link 1 at 0.25 against 0.75: its documents become transitive about a third as often
    rates = []
    for p1 in (0.25, 0.75):
        _, _, it, _ = setup(abc_data, f"--objective.links.1.transitive_prob={p1}")
        n = sum(d[3].source == 1 for _ in range(12) for d in next(it)["gen_docs"])
        rates.append(n)
    assert 0.15 < rates[0] / rates[1] < 0.6, rates


def test_a_per_link_prob_equal_to_the_objectives_plans_the_same(abc_data: Path) -> None:
    # runs planned before links had their own probability are planned identically now
    plain = setup(abc_data)[2]
    same = setup(
        abc_data,
        "--objective.links.0.transitive_prob=0.5",
        "--objective.links.1.transitive_prob=0.5",
    )[2]
    other = setup(abc_data, "--objective.links.0.transitive_prob=0.3")[2]
    a, b, c = ([next(i)["tokens"] for _ in range(4)] for i in (plain, same, other))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_objectives_module_does_not_import_transitive() -> None:
    """No import cycle: transitive builds on objectives, never the other way round."""
    import subprocess
    import sys

    code = "import sys, loretta.objectives; print('loretta.transitive' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def _plans(batch: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Each document of a micro-batch with its blocks: which ones are generated, and from what."""
    return [
        (*d, tuple(tuple(b) for b in blocks))
        for d, blocks in zip(batch["docs"][:, 1:].tolist(), batch["doc_blocks"])
    ]


@pytest.mark.parametrize(("old", "new"), [(2, 1), (1, 2), (2, 3)])
def test_elastic_resume_keeps_the_transitive_decisions(abc_data: Path, old: int, new: int) -> None:
    # transitive_start=0.5 of 12 steps: the first transitive row is fixed by the world size
    # the run started at, and saved in the loader state. The job that resumes at another world
    # size, with run.steps raised, must make the same decisions (recomputing the start from its
    # own world size and steps would move it).
    import json

    from loretta.data.loader import global_stream, open_sources

    def cfg_at(steps: int) -> Any:
        return load_config(
            "tiny_loretta",
            [*overrides(abc_data), "--objective.transitive_start=0.5", f"--run.steps={steps}"],
        )

    first = cfg_at(12)
    p = prepare(first, DistInfo())
    B, stop_groups, after_groups = first.data.micro_batch_size, 4, 5
    consumed: list[tuple[Any, ...]] = []
    state = None
    for r in range(old):
        it = iter(build_loader(first, r, old, None, p.objective.planner_factory())[0])
        for _ in range(stop_groups):
            b = next(it)
            consumed += _plans(b)
        state = json.loads(json.dumps(b["state"]))  # as stored in a checkpoint
    later = cfg_at(40)
    q = prepare(later, DistInfo())
    for r in range(new):
        it = iter(build_loader(later, r, new, state, q.objective.planner_factory())[0])
        for _ in range(after_groups):
            consumed += _plans(next(it))
    # reference: the run that was never interrupted, computed in one process
    stream, _ = global_stream(
        first, *open_sources(first.data, first.run.seed), old, p.objective.planner_factory()
    )
    n_rows = B * (old * stop_groups + new * after_groups)
    expect = [
        (d.source, d.sample, d.epoch, tuple(tuple(b) for b in d.blocks))
        for _ in range(n_rows)
        for d in stream.next_row()
    ]
    assert any(any(b[2] >= 0 for b in e[3]) for e in expect)  # transitive documents occur
    assert any(all(b[2] < 0 for b in e[3]) for e in expect[len(expect) // 2 :])
    assert sorted(consumed) == sorted(expect)


def audit(run_dir: Path) -> dict[int, list[Any]]:
    """step -> the documents every rank trained on (with their blocks), from the audit logs."""
    import json

    out: dict[int, list[Any]] = {}
    for f in sorted((run_dir / "audit").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], [])
            out[rec["step"]] += [(*d, json.dumps(b)) for d, b in zip(rec["docs"], rec["blocks"])]
    return {k: sorted(v) for k, v in out.items()}


def test_elastic_resume_of_a_loretta_run(tmp_path: Path, abc_data: Path) -> None:
    """ZeRO-3 for real: a tiny_loretta run at 2 ranks, resumed from its step-2 checkpoint at 1
    rank in another folder with more steps: the audit logs hold exactly the documents, and the
    generated blocks, of the uninterrupted run."""
    import json

    def run(tmp: Path, nproc: int, steps: int, *more: str) -> None:
        over = tiny_overrides(tmp, steps=steps, data=abc_data / "ab", **{"data.audit": "true"})
        torchrun(
            nproc,
            [
                *("--config", "tiny_loretta", *over, f"--data.sources.1.path={abc_data / 'bc'}"),
                *("--objective.transitive_start=0.5", "--checkpoint.keep_last=10", *more),
            ],
        )

    run(tmp_path / "a", 2, 6, "--checkpoint.interval=2")  # transitive from step 3 (row 48)
    ck = tmp_path / "a" / "run" / "checkpoints" / "step_00000002"
    # 1 rank from step 2 to 10: the same 64 rows as steps 3..6 of the 2-rank run; recomputed
    # at 1 rank and 10 steps, the start would be row 5 * 8 = 40 instead of 48
    run(tmp_path / "b", 1, 10, f"--checkpoint.resume={ck}")
    a, b = audit(tmp_path / "a" / "run"), audit(tmp_path / "b" / "run")
    want = sorted(d for s in range(3, 7) for d in a[s])
    got = sorted(d for s in range(3, 11) for d in b[s])
    assert any(any(blk[2] >= 0 for blk in json.loads(d[-1])) for d in want)  # transitive docs
    assert got == want


# ---- gates: a link's transitive documents wait until its generator is good enough ----------

GATED = [
    "--objective.transitive_prob=1.0",
    "--objective.links.0.gate=0.5",  # link 0: (a, b) samples, generate c from b, train [c', a]
    "--monitor.interval=2",
    "--monitor.data=held-out",
    "--monitor.generation=[[b, c]]",
]


def _link_sources(batch: dict[str, Any]) -> set[int]:
    """Sources of the transitive documents of a micro-batch (0: link 0, 1: link 1)."""
    return {d[3].source for d in batch["gen_docs"]}


def test_a_gated_link_opens_at_a_chunk_boundary_and_replans_the_same(abc_data: Path) -> None:
    import json

    from loretta.data.chunks import ChunkStream
    from loretta.data.loader import GlobalStream, chunk_stream, open_sources
    from loretta.transitive import closed_gates, gated_links, open_gates, passed_gates

    cfg, p, it, _ = setup(abc_data, *GATED)
    links = gated_links(p.objective)
    assert [lk.index for lk in links] == [0] and links[0].gate_metric == "monitor/generation/b->c"
    B, R = cfg.data.micro_batch_size, cfg.data.plan_chunk_rows
    before = [next(it) for _ in range(3)]  # 24 rows, mid-chunk (16-row chunks)
    assert all(_link_sources(b) == {1} for b in before)  # only the ungated link
    state = json.loads(json.dumps(before[-1]["state"]))  # as a checkpoint stores it
    assert closed_gates(links, state) == links

    def same(t: torch.Tensor, op: str) -> torch.Tensor:
        return t

    key = links[0].gate_metric
    assert passed_gates(links, {key: 0.49}, reduce=same) == []
    assert passed_gates(links, {}, reduce=same) == []  # no score: closed
    assert passed_gates(links, {key: 0.5}, reduce=same) == links
    opened = open_gates(state, links)
    assert closed_gates(links, opened) == []
    S = opened["planner"]["gate_rows"]["0"]
    assert S == -(-3 * B // R) * R == 32  # the next chunk boundary after the 24 rows consumed
    # a gate that passes before objective.transitive_start opens the link at the start row
    late = {**state, "planner": {**state["planner"], "transitive_start_row": 80}}
    assert open_gates(late, links)["planner"]["gate_rows"] == {"0": 80}

    it2 = iter(build_loader(cfg, 0, 1, opened, p.objective.planner_factory())[0])
    after = [next(it2) for _ in range(4)]  # rows 24..55
    for b in after:
        assert (0 in _link_sources(b)) == (b["first_row"] >= S), b["first_row"]

    # a resume from a checkpoint on either side of the gate replans every row the same: the
    # reference is the stream walked from row 0 with the gate opened at row S, and the rows
    # before S were trained with the gate closed
    chunks, _ = chunk_stream(
        cfg, *open_sources(cfg.data, cfg.run.seed), 1, p.objective.planner_factory()
    )
    assert isinstance(chunks, ChunkStream)
    chunks.planner.load_state_dict(opened["planner"])  # type: ignore[attr-defined]
    ref = GlobalStream(chunks, cfg.data.max_skipped)
    expect = [
        (d.source, d.sample, d.epoch, tuple(tuple(blk) for blk in d.blocks))
        for _ in range(7 * B)
        for d in ref.next_row()
    ]
    consumed = [x for b in before + after for x in _plans(b)]
    assert sorted(consumed) == sorted(expect)


@pytest.mark.parametrize(
    ("over", "msg"),
    [
        (["--objective.links.0.gate=1.5"], "objective.links.0.gate=1.5: must be an accuracy"),
        (["--objective.links.0.gate=0.3"], "objective.links.0.gate=0.3 needs the live monitor"),
        (["--objective.links.0.gate_checks=0"], "objective.links.0.gate_checks=0: must be an"),
        (
            [*GATED[:4], "--monitor.generation=[[b, a]]"],
            "reads the monitor's generation/b->c score, but monitor.generation=[['b', 'a']]",
        ),
    ],
)
def test_bad_gates_rejected(abc_data: Path, over: list[str], msg: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config("tiny_loretta", overrides(abc_data) + over)
    assert msg in str(e.value), str(e.value)


def _held_out(tmp_path: Path) -> Path:
    """A held-out split of the tiny recipe's synthetic data for the live monitor."""
    from dataclasses import replace

    from loretta.data.synthetic import ensure_synthetic

    syn = load_config("tiny_loretta").data.sources[0].synthetic
    assert syn is not None
    held = tmp_path / "held-out"
    ensure_synthetic(held, replace(syn, seed=3, samples=300, present=["a", "b", "c"]))
    return held


def _gated_zero3_run(tmp: Path, abc_data: Path, held: Path, steps: int, *more: str) -> Path:
    """ZeRO-3 on 2 ranks, `tiny_loretta` on the (a, b) and (b, c) pair sets with link 0 gated
    at 0 (every monitor check passes), the audit on and a checkpoint every 2 steps: its run
    folder."""
    over = tiny_overrides(tmp, steps=steps, data=abc_data / "ab", **{"data.audit": "true"})
    torchrun(
        2,
        [
            *("--config", "tiny_loretta", *over, f"--data.sources.1.path={abc_data / 'bc'}"),
            *("--objective.transitive_prob=0.5", "--objective.links.0.gate=0.0"),
            *(f"--monitor.data={held}", "--monitor.generation=[[b, c]]"),
            *("--checkpoint.interval=2", "--checkpoint.keep_last=10", *more),
        ],
    )
    return tmp / "run"


def test_a_gated_zero3_run_opens_on_the_monitor_and_resumes_exactly(
    tmp_path: Path, abc_data: Path
) -> None:
    """ZeRO-3 for real, 2 ranks: link 0 waits for the live monitor (a held-out split, every 4
    steps), opens at step 4 and starts at the next chunk boundary. Jobs resumed from checkpoints
    before the gate (step 2: it must open again at step 4) and after it (step 6: the opening
    is in the loader state) train on exactly the documents and losses of the run that was
    never interrupted."""
    import json

    held = _held_out(tmp_path)

    def run(tmp: Path, *more: str) -> None:
        monitor = ("--monitor.interval=4", "--monitor.items_per_class=3")
        _gated_zero3_run(tmp, abc_data, held, 8, *monitor, *more)

    def link(docs: list[Any], source: int) -> int:  # transitive documents of a source's link
        return sum(1 for d in docs if d[0] == source and any(b[2] >= 0 for b in json.loads(d[-1])))

    run(tmp_path / "a")
    a = tmp_path / "a" / "run"
    events = [m for m in metrics(a) if m.get("event") == "transitive_gate"]
    assert len(events) == 1, events
    ev = events[0]
    # 8 rows x 2 ranks a step: 64 rows consumed after step 4, a chunk boundary (16-row chunks)
    assert (ev["step"], ev["link"], ev["start_row"]) == (4, 0, 64), ev
    assert ev["metric"] == "monitor/generation/b->c" and 0.0 <= ev["score"] <= 1.0
    da = audit(a)
    assert all(link(da[s], 0) == 0 for s in range(1, 5))
    assert all(link(da[s], 0) > 0 for s in range(5, 9))
    assert all(link(da[s], 1) > 0 for s in range(1, 9))  # link 1 has no gate: open throughout
    la = losses(a)
    for name, step in (("b", 2), ("c", 6)):
        ck = a / "checkpoints" / f"step_{step:08d}"
        run(tmp_path / name, f"--checkpoint.resume={ck}")
        r = tmp_path / name / "run"
        assert {s: da[s] for s in range(step + 1, 9)} == audit(r), name
        lr = losses(r)
        assert {s: la[s] for s in range(step + 1, 9)} == lr, name
        n = [m for m in metrics(r) if m.get("event") == "transitive_gate"]
        assert len(n) == (1 if step < 4 else 0), (name, n)


def test_a_gate_opens_after_its_checks_in_a_row() -> None:
    from loretta.transitive import Link, count_passes

    a = Link((0, 1), 2, 0.5, index=0, gate=0.2, gate_metric="m0", gate_checks=3)
    b = Link((1, 0), 2, 0.5, index=1, gate=0.2, gate_metric="m1", gate_checks=1)
    passes: dict[str, int] = {}
    opened_at = {}
    # a passes at checks 1, 2, fails at 3, passes at 4, 5, 6; b passes first at check 2
    for check, passed in enumerate([[a], [a, b], [], [a], [a], [a]], start=1):
        closed = [lk for lk in (a, b) if lk.index not in opened_at]
        passes, opened = count_passes(closed, [lk for lk in passed if lk in closed], passes)
        opened_at.update({lk.index: check for lk in opened})
    assert opened_at == {1: 2, 0: 6}  # a's failed check restarted its count
    assert passes == {"0": 3}  # an opened link leaves the counts once it is no longer closed


def test_bad_gate_counts_in_a_checkpoint_rejected(tmp_path: Path) -> None:
    from loretta.errors import CheckpointError
    from loretta.train.trainer import _gate_passes

    assert _gate_passes(None, tmp_path) == {}
    assert _gate_passes({"0": 2}, tmp_path) == {"0": 2}
    for bad in ([1], {"0": -1}, {"0": "2"}, {"0": True}):
        with pytest.raises(CheckpointError, match="gate_passes"):
            _gate_passes(bad, tmp_path)


def test_a_gate_needing_two_checks_resumes_between_them(tmp_path: Path, abc_data: Path) -> None:
    """ZeRO-3, 2 ranks: link 0 needs two monitor checks in a row (every 2 steps, gate 0 so
    every check passes), so it opens at step 4, not 2. A job resumed from the checkpoint at
    step 2, after the first check, counts on from it: it opens at step 4 too and trains on
    exactly the documents and losses of the run that was never interrupted."""
    import json

    held = _held_out(tmp_path)

    def run(tmp: Path, *more: str) -> Path:
        checks = ("--objective.links.0.gate_checks=2", "--monitor.interval=2")
        return _gated_zero3_run(
            tmp, abc_data, held, 6, *checks, "--monitor.items_per_class=2", *more
        )

    def gate_events(r: Path) -> list[tuple[int, int]]:
        return [
            (m["step"], m["start_row"]) for m in metrics(r) if m.get("event") == "transitive_gate"
        ]

    a = run(tmp_path / "a")
    # 16 rows a step: 64 rows consumed after step 4, a chunk boundary
    assert gate_events(a) == [(4, 64)]
    ck = a / "checkpoints" / "step_00000002"
    assert json.loads((ck / "state.json").read_text())["gate_passes"] == {"0": 1}
    b = run(tmp_path / "b", f"--checkpoint.resume={ck}")
    assert gate_events(b) == [(4, 64)]
    da = audit(a)
    assert {s: da[s] for s in range(3, 7)} == audit(b)
    la = losses(a)
    assert {s: la[s] for s in range(3, 7)} == losses(b)
