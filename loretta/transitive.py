"""LoReTTa's transitive objective: link modalities that never appear together.

With pair sets (A, B) and (B, C) but no (A, C): for an (A, B) sample, generate C' from
`[bos] <b> B <c>` and train on `[bos] <c> C' <a> A [eos]`, so the real A must be predicted
from the model's own C'; likewise A' from B for (B, C) samples. A link is configured per
source (objective.links); chains (A -> B' -> C') go through `via`.

Split of the work:
  * planning (in the data loader, a pure function like the rest of the stream): a seeded
    per-sample draw decides whether a sample becomes a transitive document (or an
    "all modalities" document); the generated block reserves its length in the row;
  * completion (in the training process, `prepare`): every generated block of the micro-batch
    is sampled in batched, KV-cached generate calls restricted to the target modality's ids,
    under one ZeRO-3 gather (or layer-group gathers), with no gradient; then the documents
    are rewritten with the generated tokens. Generated tokens carry no loss by default.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from loretta.comm import all_reduce_
from loretta.config import TrainConfig
from loretta.data.sequences import IGNORE, Block, DocPlan, SequenceBuilder, mix64, unit_float
from loretta.errors import ConfigError
from loretta.model.generate import SamplingConfig, generate
from loretta.objectives import Objective
from loretta.vocab import VocabLayout, encode


@dataclass(frozen=True)
class Link:
    path: tuple[int, ...]  # modality indices: real prompt, intermediate generated..., generated
    target: int  # the real modality trained after the generated block
    prob: float  # chance that a sample of its source becomes a transitive document
    index: int = 0  # its place in objective.links (the key of its gate in the loader state)
    gate: float | None = None  # monitor score that opens it (None: open from transitive_start)
    gate_metric: str = ""  # the monitor metric the gate reads (its generator's samples' class)
    gate_checks: int = 1  # monitor checks in a row that must reach the gate to open it

    @property
    def prompt(self) -> int:
        return self.path[0]

    @property
    def generate(self) -> int:
        return self.path[-1]


def resolve_links(cfg: TrainConfig, layout: VocabLayout) -> dict[int, list[Link]]:
    """Config links -> per-source-index links; unknown modalities are config errors."""
    problems: list[str] = []
    out: dict[int, list[Link]] = {}
    names = [s.name for s in cfg.data.sources]
    for i, lc in enumerate(cfg.objective.links):
        w = f"objective.links.{i}"
        bad = [
            (f, v)
            for f, v in (("prompt", lc.prompt), ("generate", lc.generate), ("target", lc.target))
            if v not in layout
        ]
        bad += [(f"via.{j}", v) for j, v in enumerate(lc.via) if v not in layout]
        for f, v in bad:
            problems.append(
                f"{w}.{f}={v!r}: not a modality of the vocabulary layout {layout.names}"
            )
        src = cfg.data.sources[names.index(lc.source)] if lc.source in names else None
        if src is not None and src.modalities:
            for f, v in (("prompt", lc.prompt), ("target", lc.target)):
                if v not in src.modalities:
                    problems.append(
                        f"{w}.{f}={v!r}: source {lc.source!r} does not have it "
                        f"(its modalities: {src.modalities}); a link needs real {f} data"
                    )
        gen = lc.generate
        if (
            gen in layout
            and layout[gen].fixed_length is None
            and gen not in cfg.objective.generation.max_tokens
        ):
            problems.append(
                f"{w}.generate={gen!r} has no fixed length: set "
                f"objective.generation.max_tokens.{gen} to the most tokens to generate"
            )
        if bad or lc.source not in names:
            continue
        path = tuple(layout.index(m) for m in [lc.prompt, *lc.via, lc.generate])
        prob = cfg.objective.transitive_prob if lc.transitive_prob is None else lc.transitive_prob
        metric = f"monitor/generation/{lc.prompt}->{lc.generate}"
        link = Link(path, layout.index(lc.target), prob, i, lc.gate, metric, lc.gate_checks)
        out.setdefault(names.index(lc.source), []).append(link)
    g = cfg.objective.generation
    for field_name, table in (
        ("temperature_by_modality", g.temperature_by_modality),
        ("top_k_by_modality", g.top_k_by_modality),
    ):
        for m in table:
            if m not in layout:
                problems.append(
                    f"objective.generation.{field_name}.{m}: not a modality of the vocabulary "
                    f"layout {layout.names}; use one of those names"
                )
    if problems:
        raise ConfigError(problems, "objective")
    return out


class _Planner:
    """Document planner run inside data-loader workers (picklable; no torch state)."""

    def __init__(
        self,
        builder: SequenceBuilder,
        links: dict[int, list[Link]],
        cfg: TrainConfig,
        reserve: dict[int, int],
        world: int,
    ) -> None:
        self.builder, self.links, self.reserve = builder, links, reserve
        self.p_all = cfg.objective.all_modalities_prob
        # transitive documents start at this global row: objective.transitive_start is a
        # fraction of run.steps, turned into rows once, with the world size the run *starts*
        # at. The row is saved in the loader state (`state_dict`), so a run resumed at another
        # world size, or with run.steps raised, keeps the same transitive decisions. The row a
        # document is planned with is its chunk's first row (loretta/data/chunks.py), so the
        # decision is a function of the document's position, whoever plans it.
        rows_per_step = cfg.data.micro_batch_size * cfg.optim.grad_accum_steps * world
        self.start_row = int(cfg.objective.transitive_start * cfg.run.steps) * rows_per_step
        # gated links (objective.links.N.gate): the row each was opened at, by link index, once
        # the trainer has opened it (`open_gates`); a gated link not in here is closed
        self.gate_rows: dict[str, int] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"transitive_start_row": self.start_row, "gate_rows": dict(self.gate_rows)}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.start_row = int(s["transitive_start_row"])
        self.gate_rows = {str(k): int(v) for k, v in s.get("gate_rows", {}).items()}

    def is_open(self, link: Link, row: int) -> bool:
        if row < self.start_row:
            return False
        if link.gate is None:
            return True
        opened = self.gate_rows.get(str(link.index))
        return opened is not None and row >= opened

    def __call__(
        self, source: int, sample: int, epoch: int, lengths: np.ndarray, h: int, row: int = 0
    ) -> DocPlan | None:
        links = [
            lk
            for lk in self.links.get(source, ())
            if lengths[lk.prompt] > 0 and lengths[lk.target] > 0
        ]
        u = unit_float(mix64(h, 7))
        # the link is drawn independently of u, so a single transitive_prob plans as before
        link = links[mix64(h, 8) % len(links)] if links else None
        if link is not None and self.is_open(link, row) and u < link.prob + self.p_all:
            gen = Block(link.generate, self.reserve[link.generate], link.prompt)
            if u < link.prob:  # [<c> C' <a> A]: the real target after the generated block
                wanted = [gen, Block(link.target, int(lengths[link.target]))]
            else:  # every real modality and the generated one, in a seeded order
                real = [Block(m, int(n)) for m, n in enumerate(lengths) if n > 0]
                blocks = {b.modality: b for b in [*real, gen]}
                wanted = [blocks[m] for m in self.builder.order(tuple(sorted(blocks)), h)]
            blocks_fit = self.builder.fit(wanted)
            if any(b.gen_from >= 0 for b in blocks_fit) and any(b.gen_from < 0 for b in blocks_fit):
                return DocPlan(
                    source, sample, epoch, blocks_fit, self.builder.doc_length(blocks_fit)
                )
        return self.builder.plan(source, sample, epoch, lengths, h, row)


class TransitiveObjective(Objective):
    def __init__(self, cfg: TrainConfig, layout: VocabLayout) -> None:
        self.cfg, self.layout = cfg, layout
        self.links = resolve_links(cfg, layout)
        g = cfg.objective.generation
        self.reserve = {
            i: (m.fixed_length if m.fixed_length is not None else g.max_tokens.get(m.name, 0))
            for i, m in enumerate(layout.modalities)
        }
        self.builder = SequenceBuilder(layout, cfg.data.sequence, cfg.data.seq_len, cfg.run.seed)
        self.stop_ids = (layout.eos_id, *layout.modality_token_ids)
        self.max_waves = max(
            (len(lk.path) - 1 for lks in self.links.values() for lk in lks), default=1
        )
        self.last_generation: dict[str, float] = {}

    def planner_factory(self) -> Callable[[list[Any], SequenceBuilder, int], Any]:
        links, cfg, reserve = self.links, self.cfg, self.reserve

        def factory(datasets: list[Any], builder: SequenceBuilder, world: int) -> _Planner:
            return _Planner(builder, links, cfg, reserve, world)

        return factory

    # ---- completion in the training process -------------------------------------------------
    def prompt(self, modality: int, ids: np.ndarray, target: int) -> torch.Tensor:
        """[bos] <m> ids <target>: global ids of a generation prompt (ids are local)."""
        lay, seq = self.layout, self.cfg.data.sequence
        name = lay.modalities[modality].name
        cap = seq.max_tokens.get(name, len(ids))
        parts = [(name, ids[:cap])]
        return torch.from_numpy(encode(lay, parts, seq.add_bos, lay.modalities[target].name))

    def sampling(self, modality: int | None, n: int) -> SamplingConfig:
        """How a block of `modality` is decoded (None: any id, no stop: a call's base)."""
        g = self.cfg.objective.generation
        m = None if modality is None else self.layout.modalities[modality]
        temperature, top_k = (g.temperature, g.top_k) if m is None else g.decoding(m.name)
        return SamplingConfig(
            max_new_tokens=n,
            allowed=None if m is None else (m.offset, m.stop),
            stop_ids=() if m is None or m.fixed_length is not None else self.stop_ids,
            temperature=temperature,
            top_k=top_k or None,
            pad_id=self.layout.pad_id,
        )

    def prepare(self, batch: dict[str, Any], engine: Any, step: int) -> dict[str, Any]:
        """Generate every generated block of this micro-batch, then rewrite its documents.

        A chain (A -> B' -> C') runs in waves: wave w generates path[w+1] from path[w]."""
        if not self.links:
            return batch
        t0 = time.perf_counter()
        docs = batch.get("gen_docs") or []
        outputs: list[dict[int, np.ndarray]] = [{} for _ in docs]  # block index -> local ids
        inputs: list[dict[int, np.ndarray]] = [dict(arrays) for (*_, arrays) in docs]
        made = 0
        calls = self._agree_calls(engine, docs)
        if calls:
            g = self.cfg.objective.generation
            with engine.generation(g.gather, g.layers_per_group) as fwd:
                # one wave's blocks of every modality share its calls (each row sampled in its
                # own modality's range): a decode step costs the same for any mix of rows
                for wave, n_max, n_chunks in calls:
                    jobs = []  # (doc, block index, prompt, tokens wanted, key, modality)
                    for d, (*_, plan, _) in enumerate(docs):
                        for k, b in enumerate(plan.blocks):
                            path = self._path(plan, b)
                            if b.gen_from < 0 or len(path) - 1 <= wave:
                                continue
                            modality = path[wave + 1]
                            last = wave == len(path) - 2
                            prompt = self.prompt(path[wave], inputs[d][path[wave]], modality)
                            # the sampling noise of a generated block is a function of the
                            # document and block alone: the same tokens whatever rank, micro-
                            # batch or generation batch the document lands in
                            key = mix64(
                                self.cfg.run.seed, 0x6E0153, plan.source, plan.sample,
                                plan.epoch, k, wave,
                            )  # fmt: skip
                            jobs.append(
                                (
                                    d,
                                    k if last else -1,
                                    prompt,
                                    b.n if last else self.reserve[modality],
                                    key,
                                    modality,
                                )
                            )
                    made += self._generate(
                        engine, fwd, jobs, n_max, n_chunks, batch, wave, outputs, inputs
                    )
        self._rewrite(batch, docs, outputs)
        self.last_generation = {"gen_s": time.perf_counter() - t0, "gen_tokens": float(made)}
        return batch

    def _path(self, plan: DocPlan, b: Block) -> tuple[int, ...]:
        for lk in self.links.get(plan.source, ()):
            if lk.generate == b.modality and lk.prompt == b.gen_from:
                return lk.path
        return (b.gen_from, b.modality)

    def _agree_calls(self, engine: Any, docs: list[Any]) -> list[tuple[int, int, int]]:
        """Every rank must make the same generate calls (the gathers are collectives): agree on
        wave -> most tokens and number of prompt chunks, with one all-reduce(max)."""
        W = self.max_waves
        need = torch.zeros(W, dtype=torch.long)
        counts = torch.zeros(W, dtype=torch.long)
        for *_, plan, _ in docs:
            for b in plan.blocks:
                if b.gen_from < 0:
                    continue
                path = self._path(plan, b)
                for wave in range(len(path) - 1):
                    m = path[wave + 1]
                    n = b.n if wave == len(path) - 2 else self.reserve[m]
                    need[wave] = max(int(need[wave]), n)
                    counts[wave] += 1
        bs = self.cfg.objective.generation.batch_size
        table = torch.stack([need, (counts + bs - 1) // bs])
        table = all_reduce_(table.to(engine.device), "max").cpu()
        return [(w, int(table[0, w]), int(table[1, w])) for w in range(W) if table[1, w] > 0]

    def _generate(
        self,
        engine: Any,
        fwd: Any,
        jobs: list[Any],
        n_max: int,
        n_chunks: int,
        batch: dict[str, Any],
        wave: int,
        outputs: list[dict[int, np.ndarray]],
        inputs: list[dict[int, np.ndarray]],
    ) -> int:
        bs = self.cfg.objective.generation.batch_size
        lay = self.layout
        made = 0
        for c in range(n_chunks):
            chunk = jobs[c * bs : (c + 1) * bs]
            # a rank with nothing to generate still runs the call: the others wait on it
            prompts = [p for (_, _, p, *_) in chunk] or [torch.tensor([lay.bos_id])]
            keys = [key for (*_, key, _) in chunk] or [0]
            rows = [self.sampling(m, n) for (_, _, _, n, _, m) in chunk] or None
            seed = mix64(self.cfg.run.seed, int(batch.get("first_row", 0)), wave, c)
            gen = torch.Generator().manual_seed(seed % (2**63))
            out, lens = generate(
                engine.module,
                prompts,
                self.sampling(None, n_max),
                gen,
                use_cache=True,
                fixed_steps=True,  # n_max steps on every rank, whatever its rows
                forward=fwd,
                compile_step=self.cfg.objective.generation.compile_decode,
                row_keys=keys,
                row_cfgs=rows,
            )
            for (d, k, *_, m), row, ln in zip(chunk, out.cpu(), lens.cpu()):
                ids = (row[: int(ln)].numpy() - lay.modalities[m].offset).astype(np.int64)
                made += len(ids)
                if k >= 0:
                    outputs[d][k] = ids
                inputs[d][m] = ids  # the next wave of a chain prompts with it
        return made

    def _rewrite(
        self, batch: dict[str, Any], docs: list[Any], outputs: list[dict[int, np.ndarray]]
    ) -> None:
        fields = (
            "tokens",
            "positions",
            "doc_ids",
            "targets",
            "target_modality",
            "target_direction",
        )
        for (r, start, d, plan, arrays), gen in zip(docs, outputs):
            row = {f: batch[f][r].numpy() for f in fields}
            blocks = tuple(
                Block(b.modality, len(gen[k]), b.gen_from) if k in gen else b
                for k, b in enumerate(plan.blocks)
            )
            new = DocPlan(
                plan.source, plan.sample, plan.epoch, blocks, self.builder.doc_length(blocks)
            )
            self.builder.write_doc(
                new, arrays, row, start, d, gen, self.cfg.objective.loss_on_generated
            )
            end, old_end = start + new.length, start + plan.length
            if end < old_end:  # a variable-length block came out shorter: pad the rest
                row["tokens"][end:old_end] = self.layout.pad_id
                row["positions"][end:old_end] = np.arange(old_end - end)
                row["doc_ids"][end:old_end] = 1_000_000 + d  # its own document, no loss
                row["targets"][end:old_end] = IGNORE
                row["target_modality"][end:old_end] = -1
                row["target_direction"][end:old_end] = -1


# ---- gates: transitive documents of a link start once its generator is good enough --------


def gated_links(objective: Any) -> list[Link]:
    """The objective's links with a gate (none for an objective without links)."""
    links = getattr(objective, "links", {})
    return sorted(
        (lk for lks in links.values() for lk in lks if lk.gate is not None), key=lambda lk: lk.index
    )


def closed_gates(links: list[Link], loader_state: dict[str, Any] | None) -> list[Link]:
    """Gated links the loader state has not opened yet (the same on every rank)."""
    opened = ((loader_state or {}).get("planner") or {}).get("gate_rows", {})
    return [lk for lk in links if str(lk.index) not in opened]


def passed_gates(
    closed: list[Link],
    scores: dict[str, float],
    device: torch.device | str = "cpu",
    reduce: Callable[[torch.Tensor, str], torch.Tensor] = all_reduce_,
) -> list[Link]:
    """The closed links whose monitor score reached the gate on every rank.

    Every rank's monitor computes the same scores; the minimum over ranks makes the decision
    one decision even if they did not, so no rank plans documents another does not generate."""
    flags = torch.tensor(
        [float(scores.get(lk.gate_metric, -1.0) >= (lk.gate or 0.0)) for lk in closed],
        dtype=torch.float32,
        device=device,
    )
    flags = reduce(flags, "min").cpu()
    return [lk for lk, f in zip(closed, flags.tolist()) if f > 0]


def count_passes(
    closed: list[Link], passed: list[Link], passes: dict[str, int]
) -> tuple[dict[str, int], list[Link]]:
    """After one monitor check: each closed link's count of checks in a row that reached its
    gate (a check that does not resets it), and the links whose count has reached their
    gate_checks, to open. Links not in `closed` (opened, or ungated) leave the counts. The counts
    go into checkpoints (`Progress.gate_passes`), so a run resumed between two passing checks
    opens at the same step as the run that was never interrupted."""
    hit = {lk.index for lk in passed}
    counts = {
        str(lk.index): passes.get(str(lk.index), 0) + 1 if lk.index in hit else 0 for lk in closed
    }
    return counts, [lk for lk in closed if counts[str(lk.index)] >= lk.gate_checks]


def open_gates(loader_state: dict[str, Any], links: list[Link]) -> dict[str, Any]:
    """The loader state with `links` opened at the first chunk boundary at or after the rows
    consumed (and not before the transitive start row): the links' first transitive row.
    Chunks that start before it keep the plan they were trained on (a chunk is planned with its
    first row), so a resume from any checkpoint, before or after the gate, replans every row the
    same; the loader must be rebuilt from this state (prefetched rows dropped)."""
    R = int(loader_state["plan"]["chunk_rows"])
    planner = dict(loader_state.get("planner") or {})
    row = max(-(-int(loader_state["rows"]) // R) * R, int(planner.get("transitive_start_row", 0)))
    planner["gate_rows"] = {**planner.get("gate_rows", {}), **{str(lk.index): row for lk in links}}
    return {**loader_state, "planner": planner}


def build(cfg: TrainConfig, layout: VocabLayout) -> Objective:
    if cfg.objective.links:
        return TransitiveObjective(cfg, layout)
    return Objective()
