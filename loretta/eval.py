"""Evaluation utilities: conditional likelihood across modalities (zero-shot classification by
ranking class prototypes), pooled hidden states and linear probes, and generation.

    loretta-eval zeroshot CKPT --data TEST --from image --to speech --prototypes TRAIN_SET
    loretta-eval probe CKPT --train TRAIN_SET --test TEST --modalities image,text
    loretta-eval generate CKPT --data TEST --from speech --to image -n 8

CKPT is a checkpoint step folder, a run's checkpoints/ folder, a consolidated export or a
Hugging Face export (see loretta/checkpoint/).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from loretta.model import Decoder, KVCache
from loretta.model.generate import SamplingConfig, generate
from loretta.vocab import Part, VocabLayout, encode


def _pad(seqs: list[np.ndarray], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.from_numpy(s)
    return ids, torch.tensor([len(s) for s in seqs])


@torch.no_grad()
def conditional_logprob(
    model: Decoder,
    layout: VocabLayout,
    conds: Sequence[Part],
    targets: Sequence[Part],
    batch_size: int = 32,
    normalize: bool = True,
    forward: Any = None,
    max_rows: int = 1024,
) -> np.ndarray:
    """scores[i, k] = log p(target_k | cond_i), summed (or averaged, with normalize) over the
    target's content tokens. `forward` replaces model(...) (e.g. the engine's gathered forward
    under ZeRO-3, which runs no collective per call).

    Conditions whose prefixes `[bos] <a> A <c>` have the same length run together; each prefix
    runs once and its KV cache is shared by every target, in rows of (condition, target) pairs
    at most `max_rows` at a time: N prefixes + N*K targets in few large calls. batch_size is the
    least number of conditions per call."""
    model.eval()
    fwd = forward or model
    dev = model.tok_embeddings.weight.device
    dtype = model.tok_embeddings.weight.dtype
    by_mod: dict[str, list[int]] = {}
    for k, (name, _) in enumerate(targets):
        by_mod.setdefault(name, []).append(k)
    scores = np.zeros((len(conds), len(targets)))
    for name, ks in by_mod.items():
        off = layout[name].offset
        ids_t, lens_t = _pad(
            [np.asarray(targets[k][1], dtype=np.int64) + off for k in ks], layout.pad_id
        )
        K, T = ids_t.shape
        tok0 = ids_t[:, 0].to(dev)  # (K,)
        # log p of target token t+1 is read at row position t; padded positions count nothing
        valid = (torch.arange(T)[None, :] < (lens_t[:, None] - 1)).to(dev)  # (K, T)
        nxt = torch.cat([ids_t[:, 1:], ids_t[:, :1]], 1).to(dev)  # (K, T) next-token ids
        prefixes = [encode(layout, [c], open_=name) for c in conds]
        groups: dict[int, list[int]] = {}
        for i, pre in enumerate(prefixes):
            groups.setdefault(len(pre), []).append(i)
        per_call = max(batch_size, max_rows // max(K, 1), 1)
        for P, idx in groups.items():
            for lo in range(0, len(idx), per_call):
                chunk = idx[lo : lo + per_call]
                Q = len(chunk)
                pre_ids = torch.from_numpy(np.stack([prefixes[i] for i in chunk])).to(dev)
                pcache = KVCache.empty(model.cfg, Q, P, dev, dtype)
                first = F.log_softmax(fwd(pre_ids, cache=pcache)[:, -1].float(), -1)  # (Q, V)
                lp = first[:, tok0]  # (Q, K): log p(first target token | prefix)
                for klo in range(0, K, max(1, max_rows // Q)):
                    kk = slice(klo, min(K, klo + max(1, max_rows // Q)))
                    n_k = kk.stop - kk.start
                    cache = KVCache.empty(model.cfg, Q * n_k, P + T, dev, dtype)
                    # query-major rows: row q*n_k + j = (condition q, target j)
                    cache.k[:, :, :P] = pcache.k.repeat_interleave(n_k, dim=1)
                    cache.v[:, :, :P] = pcache.v.repeat_interleave(n_k, dim=1)
                    cache.length = P
                    ids = ids_t[kk].to(dev).repeat(Q, 1)  # (Q*n_k, T)
                    pos = torch.arange(P, P + T, device=dev).expand(Q * n_k, T)
                    logp = F.log_softmax(fwd(ids, pos, cache=cache).float(), -1)
                    got = logp.gather(2, nxt[kk].repeat(Q, 1)[..., None])[..., 0]  # (Q*n_k, T)
                    got = (got * valid[kk].repeat(Q, 1)).sum(1).view(Q, n_k)
                    lp[:, kk] += got
                lp = lp.cpu().double()
                if normalize:
                    lp = lp / lens_t[None, :].double()
                scores[np.ix_(chunk, ks)] = lp.numpy()
    return scores


@torch.no_grad()
def unconditional_logprob(
    model: Decoder, layout: VocabLayout, targets: Sequence[Part], normalize: bool = True
) -> np.ndarray:
    """log p(target | [bos] <t>) per target: how likely each prototype is with no condition."""
    model.eval()
    dev = model.tok_embeddings.weight.device
    out = np.zeros(len(targets))
    for i, (name, ids) in enumerate(targets):
        seq = encode(layout, [(name, ids)])
        logp = F.log_softmax(model(torch.from_numpy(seq)[None].to(dev)).float(), -1)[0].cpu()
        tok = torch.from_numpy(seq[2:])
        lp = logp[1:-1].gather(1, tok[:, None]).sum().item()
        out[i] = lp / max(len(tok), 1) if normalize else lp
    return out


def zero_shot(
    model: Decoder,
    layout: VocabLayout,
    items: Sequence[Part],
    prototypes: dict[int, list[Part]],
    batch_size: int = 32,
    calibrate: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Classify each item by the mean conditional log-likelihood of each class's prototypes.

    With `calibrate`, each prototype's unconditional log-likelihood is subtracted first (a
    pointwise-mutual-information score): prototypes that are likely whatever the input no
    longer win for every item. Returns (predicted labels, scores (n_items, n_classes))."""
    classes = sorted(prototypes)
    flat = [p for c in classes for p in prototypes[c]]
    owner = np.array([c for c in classes for _ in prototypes[c]])
    lp = conditional_logprob(model, layout, items, flat, batch_size)
    if calibrate:
        lp = lp - unconditional_logprob(model, layout, flat)[None, :]
    scores = np.stack([lp[:, owner == c].mean(1) for c in classes], 1)
    return np.asarray(classes)[scores.argmax(1)], scores


def retrieval(
    model: Decoder,
    layout: VocabLayout,
    queries: Sequence[Part],
    query_labels: np.ndarray,
    gallery: Sequence[Part],
    gallery_labels: np.ndarray,
    exclude: Sequence[int] | None = None,
    batch_size: int = 32,
    forward: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot retrieval against held-out gallery items: each query is labelled with the class
    whose gallery items are, on average, most likely given it.

    score[i, j] = log p(gallery_j | query_i) - mean over queries i' of log p(gallery_j | query_i')
    (per-token log-likelihoods). Centring each gallery item over the queries removes whatever
    makes an item likely whatever the input (its prior, its length, a model's bias for it), so a
    model that knows nothing of the classes scores chance on balanced queries; a plain
    likelihood, or a PMI against a separately estimated prior, does not guarantee that.
    `exclude[i]` is a gallery index left out of query i's scores (its own aligned item), or -1.
    Returns (predicted labels, per-query correctness as 0/1 floats)."""
    lp = conditional_logprob(model, layout, queries, gallery, batch_size, forward=forward)
    lp = lp - lp.mean(0, keepdims=True)
    if exclude is not None:
        for i, j in enumerate(exclude):
            if j >= 0:
                lp[i, j] = np.nan
    classes = np.unique(gallery_labels)
    scores = np.stack([np.nanmean(lp[:, gallery_labels == c], 1) for c in classes], 1)
    pred = classes[scores.argmax(1)]
    return pred, (pred == np.asarray(query_labels)).astype(np.float64)


@torch.no_grad()
def pooled_features(
    model: Decoder, layout: VocabLayout, docs: Sequence[Sequence[Part]], batch_size: int = 32
) -> np.ndarray:
    """Mean of the final hidden states over each document's tokens: (n_docs, dim)."""
    model.eval()
    dev = model.tok_embeddings.weight.device
    out = []
    for lo in range(0, len(docs), batch_size):
        seqs = [encode(layout, d) for d in docs[lo : lo + batch_size]]
        ids, lens = _pad(seqs, layout.pad_id)
        h = model(ids.to(dev), return_hidden=True).float().cpu()
        mask = (torch.arange(ids.shape[1])[None] < lens[:, None]).float()[..., None]
        out.append(((h * mask).sum(1) / mask.sum(1)).numpy())
    return np.concatenate(out)


def fit_linear(x: np.ndarray, y: np.ndarray, weight_decay: float = 1e-3, steps: int = 200) -> Any:
    """An L2-regularised multinomial logistic regression; returns predict(x) -> labels."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xt = torch.tensor((x - mu) / sd, dtype=torch.float64)
    classes = np.unique(y)
    yt = torch.tensor(np.searchsorted(classes, y))
    w = torch.zeros(xt.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w + b, yt) + weight_decay * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    w_, b_ = w.detach(), b.detach()

    def predict(z: np.ndarray) -> np.ndarray:
        zt = torch.tensor((z - mu) / sd, dtype=torch.float64)
        return np.asarray(classes[(zt @ w_ + b_).argmax(1).numpy()])

    return predict


def linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    weight_decay: float = 1e-3,
    steps: int = 200,
) -> float:
    """Accuracy of an L2-regularised multinomial logistic regression on frozen features."""
    predict = fit_linear(x_train, y_train, weight_decay, steps)
    return float((predict(x_test) == y_test).mean())


def token_features(layout: VocabLayout, name: str, seqs: Sequence[np.ndarray]) -> np.ndarray:
    """Classifier features of one modality's local ids: the values themselves for a fixed-length
    modality (pixels, binned MFCCs are ordinal), a bag of tokens otherwise."""
    m = layout[name]
    if m.fixed_length is not None:
        return np.stack([np.asarray(s[: m.fixed_length], dtype=np.float64) for s in seqs])
    out = np.zeros((len(seqs), m.size))
    for i, s in enumerate(seqs):
        np.add.at(out[i], np.asarray(s, dtype=np.int64), 1.0)
    return out


@torch.no_grad()
def generate_modality(
    model: Decoder,
    layout: VocabLayout,
    conds: Sequence[Part],
    target: str,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    max_tokens: int | None = None,
    forward: Any = None,
) -> list[np.ndarray]:
    """Sample `target` (local ids) given each condition: [bos] <a> A <target> -> ..."""
    m = layout[target]
    n = m.fixed_length or max_tokens
    if n is None:
        raise ValueError(f"modality {target!r} has no fixed length: pass max_tokens")
    stop = () if m.fixed_length else (layout.eos_id, *layout.modality_token_ids)
    prompts = [torch.from_numpy(encode(layout, [c], open_=target)) for c in conds]
    sc = SamplingConfig(
        max_new_tokens=n,
        allowed=(m.offset, m.stop),
        stop_ids=stop,
        temperature=temperature,
        top_k=top_k,
        pad_id=layout.pad_id,
    )
    out, lens = generate(
        model, prompts, sc, torch.Generator().manual_seed(seed), use_cache=True, forward=forward
    )
    return [row[: int(k)].cpu().numpy() - m.offset for row, k in zip(out, lens)]


# ---- datasets with labels --------------------------------------------------------------------
def labelled(
    path: str, modalities: Sequence[str], limit: int | None = None, label_key: str = "label"
) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """Samples having every one of `modalities`, with their integer labels from {key}.json."""
    from loretta.data.sources import open_dataset

    ds = open_dataset(path)
    names = ds.layout.names
    want = [names.index(m) for m in modalities]
    samples, labels = [], []
    for i in range(len(ds)):
        if not all(ds.lengths[i][j] > 0 for j in want):
            continue
        meta = ds.meta(i)
        if label_key not in meta:
            raise ValueError(f"{ds.where(i)}: no {label_key!r} in its metadata")
        samples.append({m: np.array(a) for m, a in ds.read(i, list(modalities)).items()})
        labels.append(int(meta[label_key]))
        if limit is not None and len(samples) >= limit:
            break
    return samples, np.asarray(labels)


def prototypes_from(path: str, modality: str, per_class: int) -> dict[int, list[Part]]:
    samples, labels = labelled(path, [modality])
    out: dict[int, list[Part]] = {}
    for s, y in zip(samples, labels):
        if len(out.setdefault(int(y), [])) < per_class:
            out[int(y)].append((modality, s[modality]))
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line parser (no side effects)."""
    ap = argparse.ArgumentParser(
        prog="loretta-eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    z = sub.add_parser("zeroshot", help="zero-shot classification by conditional likelihood")
    z.add_argument("checkpoint")
    z.add_argument("--data", required=True)
    z.add_argument("--from", dest="src", required=True)
    z.add_argument("--to", dest="dst", required=True)
    z.add_argument("--prototypes", required=True, help="dataset with labelled samples of --to")
    z.add_argument("--per-class", type=int, default=1)
    z.add_argument("--limit", type=int, default=None)
    z.add_argument(
        "--scoring",
        choices=["pmi", "plain"],
        default="pmi",
        help="pmi: log p(proto | input) - log p(proto) (default); plain: log p(proto | input)",
    )
    pr = sub.add_parser("probe", help="linear probe on pooled hidden states")
    pr.add_argument("checkpoint")
    pr.add_argument("--train", required=True)
    pr.add_argument("--test", required=True)
    pr.add_argument("--modalities", required=True, help="comma-separated, in document order")
    pr.add_argument("--limit", type=int, default=None)
    g = sub.add_parser("generate", help="generate one modality from another")
    g.add_argument("checkpoint")
    g.add_argument("--data", required=True)
    g.add_argument("--from", dest="src", required=True)
    g.add_argument("--to", dest="dst", required=True)
    g.add_argument("-n", type=int, default=8)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0: no top-k; 1: greedy")
    for p in (z, pr, g):
        p.add_argument("--device", default="cpu")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from loretta.checkpoint.load import load_model
    from loretta.errors import LorettaError

    try:
        model, layout = load_model(a.checkpoint, a.device)
        if a.cmd == "zeroshot":
            items, y = labelled(a.data, [a.src], a.limit)
            protos = prototypes_from(a.prototypes, a.dst, a.per_class)
            conds = [(a.src, s[a.src]) for s in items]
            pred, _ = zero_shot(model, layout, conds, protos, calibrate=a.scoring == "pmi")
            res: dict[str, Any] = {
                "task": f"{a.src}->{a.dst}",
                "accuracy": float((pred == y).mean()),
                "n": len(y),
                "scoring": a.scoring,
            }
        elif a.cmd == "probe":
            mods = a.modalities.split(",")
            tr, ytr = labelled(a.train, mods, a.limit)
            te, yte = labelled(a.test, mods, a.limit)
            ftr = pooled_features(model, layout, [[(m, s[m]) for m in mods] for s in tr])
            fte = pooled_features(model, layout, [[(m, s[m]) for m in mods] for s in te])
            res = {
                "task": f"probe[{a.modalities}]",
                "accuracy": linear_probe(ftr, ytr, fte, yte),
                "n": len(yte),
            }
        else:
            items, y = labelled(a.data, [a.src], a.n)
            conds = [(a.src, s[a.src]) for s in items]
            outs = generate_modality(
                model, layout, conds, a.dst, a.seed, a.temperature, a.top_k or None
            )
            res = {
                "task": f"generate {a.src}->{a.dst}",
                "labels": y.tolist(),
                "generated": [o.tolist() for o in outs],
            }
    except LorettaError as e:
        print(f"loretta-eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
