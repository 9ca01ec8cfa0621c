"""The live linking monitor: is the pair that is never seen together being learned, now?

Every `monitor.interval` steps it scores, on a held-out split (never a training source):
  * zero-shot retrieval for each `monitor.retrieval` pair (e.g. both directions of the missing
    pair), with the centred score of loretta.eval.retrieval (chance for a model that knows
    nothing);
  * the class information in the generator's samples for each `monitor.generation` pair (e.g.
    text -> image: the pseudo-modalities transitive documents are built from), decoded as the
    objective decodes them and labelled by a linear classifier fit on the split's real samples.
A gated transitive link (objective.links.N.gate) opens on its generator's score here.
Every rank computes the same (small) thing under one weight gather, with the engine's gathered
forward (no collective per call), so ranks stay in lockstep; rank 0 logs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from loretta.config import TrainConfig
from loretta.vocab import VocabLayout


def _balanced(labels: np.ndarray, per_class: int, skip: set[int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        idx = [int(i) for i in rng.permutation(np.flatnonzero(labels == c)) if int(i) not in skip]
        out += idx[:per_class]
    return np.sort(np.asarray(out, dtype=np.int64))


class LinkingMonitor:
    def __init__(self, cfg: TrainConfig, layout: VocabLayout) -> None:
        from loretta.eval import fit_linear, labelled, token_features

        m = self.m = cfg.monitor
        self.cfg, self.layout = cfg, layout
        pairs = [tuple(p) for p in m.retrieval + m.generation]
        mods = sorted({x for p in pairs for x in p})
        unknown = [x for x in mods if x not in layout]
        if unknown:
            from loretta.errors import ConfigError

            raise ConfigError(
                [f"monitor: modalities {unknown} are not in the data's layout {layout.names}"]
            )
        self.items, self.labels = labelled(m.data, mods, label_key=m.label_key)
        # at most half of each class are queries: the rest hold the gallery and fit classifiers
        half = max(1, int(np.bincount(self.labels).min()) // 2)
        self.queries = _balanced(self.labels, min(m.items_per_class, half), set(), seed=0)
        self.gallery = _balanced(self.labels, m.gallery_per_class, set(self.queries.tolist()), 1)
        rest = np.setdiff1d(np.arange(len(self.labels)), self.queries)
        self.classifiers = {
            dst: fit_linear(
                token_features(layout, dst, [self.items[i][dst] for i in rest]), self.labels[rest]
            )
            for _, dst in m.generation
        }

    def on_step_end(self, step: int, ctx: Any) -> dict[str, float] | None:
        if not self.m.interval or step % self.m.interval:
            return None
        from loretta.eval import generate_modality, retrieval, token_features

        eng = ctx.engine
        model = eng.module
        g = self.cfg.objective.generation
        out: dict[str, float] = {}
        q, gl = self.queries, self.gallery
        was_training = model.training
        with eng.generation(g.gather, g.layers_per_group) as fwd:
            for src, dst in self.m.retrieval:
                _, correct = retrieval(
                    model,
                    self.layout,
                    [(src, self.items[i][src]) for i in q],
                    self.labels[q],
                    [(dst, self.items[j][dst]) for j in gl],
                    self.labels[gl],
                    forward=fwd,
                )
                out[f"monitor/retrieval/{src}->{dst}"] = float(correct.mean())
            for src, dst in self.m.generation:
                temperature, top_k = g.decoding(dst)
                gen = generate_modality(
                    model,
                    self.layout,
                    [(src, self.items[i][src]) for i in q],
                    dst,
                    seed=step,
                    temperature=temperature,
                    top_k=top_k or None,
                    max_tokens=g.max_tokens.get(dst, 32),
                    forward=fwd,
                )
                pred = self.classifiers[dst](token_features(self.layout, dst, gen))
                out[f"monitor/generation/{src}->{dst}"] = float((pred == self.labels[q]).mean())
        model.train(was_training)
        return out


def build_monitors(cfg: TrainConfig, layout: VocabLayout) -> list[Any]:
    return [LinkingMonitor(cfg, layout)] if cfg.monitor.interval > 0 else []
