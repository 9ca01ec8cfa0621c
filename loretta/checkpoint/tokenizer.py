"""The tokenizer of a Hugging Face export: one `tokenizers` tokenizer over the whole shared
vocabulary, so that ``AutoTokenizer.from_pretrained(export)`` maps every id of the model.

    pad, bos, eos                 <pad>, <s>, </s>                 special tokens
    modality tokens               <image>, <text>, ...             special tokens
    ids of a modality             <image_0>, <image_1>, ...        added tokens (encodable)
    ids of the text modality      its own tokenizer's tokens, when one is given (BPE or
                                  WordLevel tokenizer.json, e.g. the SVL-digits demo's), shifted
                                  to the modality's global ids; its merges and byte-level
                                  pre-tokenizer and decoder are kept, so text encodes as in
                                  the data
    ids past the layout           <unused_N> (model vocabularies are padded)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loretta.errors import CheckpointError
from loretta.vocab import VocabLayout

TOKENIZER_FILE = "tokenizer.json"
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def find_text_tokenizer(train_config: dict[str, Any]) -> Path | None:
    """The tokenizer.json stored with the training data (in or beside a source folder)."""
    data = train_config.get("data")
    sources = data.get("sources") if isinstance(data, dict) else None
    for s in sources if isinstance(sources, list) else []:
        path = s.get("path") if isinstance(s, dict) else None
        if not path:
            continue
        for folder in (Path(path), Path(path).parent):
            if (folder / TOKENIZER_FILE).is_file():
                return folder / TOKENIZER_FILE
    return None


def _added(content: str, i: int, special: bool) -> dict[str, Any]:
    return {
        "id": i,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _text_vocab(path: Path, modality: str, size: int) -> dict[str, Any]:
    """The tokenizer.json at `path` as a dict; its model's vocab must fit the modality."""
    try:
        tj = json.loads(path.read_text())
        vocab = tj["model"]["vocab"]
        kind = tj["model"]["type"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a tokenizers tokenizer.json ({e})") from e
    if kind not in ("BPE", "WordLevel") or not isinstance(vocab, dict):
        raise CheckpointError(
            f"{path}: a {kind} tokenizer; the export can carry a BPE or WordLevel text "
            "tokenizer (ids are shifted into the shared vocabulary)"
        )
    if tj.get("added_tokens"):
        raise CheckpointError(f"{path}: has added tokens; expected a plain text tokenizer")
    if len(vocab) > size or any(not 0 <= int(i) < size for i in vocab.values()):
        raise CheckpointError(
            f"{path}: {len(vocab)} tokens do not fit modality {modality!r} of {size} ids"
        )
    return dict(tj)


def build_tokenizer_json(
    layout: VocabLayout,
    vocab_size: int,
    text_tokenizer: Path | None = None,
    text_modality: str = "text",
) -> dict[str, Any]:
    """tokenizer.json (as a dict) covering ids 0..vocab_size-1, checked to load."""
    from tokenizers import Tokenizer

    names: dict[int, str] = {layout.pad_id: PAD, layout.bos_id: BOS, layout.eos_id: EOS}
    special = set(names)
    for m in layout.modalities:
        names[m.token_id] = m.token
        special.add(m.token_id)
    text: dict[str, Any] | None = None
    if text_tokenizer is not None:
        if text_modality not in layout:
            raise CheckpointError(
                f"--tokenizer {text_tokenizer}: the layout has no modality {text_modality!r} "
                f"(has: {layout.names}); name the text modality with --tokenizer-modality"
            )
        m = layout[text_modality]
        text = _text_vocab(text_tokenizer, text_modality, m.size)
        for tok, i in text["model"]["vocab"].items():
            names[m.offset + int(i)] = tok
    text_ids = set(names) - special
    for m in layout.modalities:
        for i in range(m.size):
            names.setdefault(m.offset + i, f"<{m.name}_{i}>")
    for i in range(vocab_size):
        names.setdefault(i, f"<unused_{i}>")
    if len(set(names.values())) != len(names):
        seen: dict[str, int] = {}
        clash = next(n for i, n in sorted(names.items()) if seen.setdefault(n, i) != i)
        raise CheckpointError(
            f"token {clash!r} would name two ids ({seen[clash]} and another); the text "
            "tokenizer's vocabulary clashes with the generated token names"
        )
    vocab = {n: i for i, n in sorted(names.items())}
    added = [_added(names[i], i, i in special) for i in sorted(names) if i not in text_ids]
    out: dict[str, Any] = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "post_processor": None,
    }
    if text is None:
        out.update(
            pre_tokenizer={"type": "WhitespaceSplit"},
            decoder=None,
            model={"type": "WordLevel", "vocab": vocab, "unk_token": PAD},
        )
    else:
        out.update(
            normalizer=text.get("normalizer"),
            pre_tokenizer=text.get("pre_tokenizer"),
            decoder=text.get("decoder"),
            model={**text["model"], "vocab": vocab},
        )
    try:
        Tokenizer.from_str(json.dumps(out))
    except Exception as e:
        raise CheckpointError(f"the export's tokenizer does not load ({e})") from e
    return out


def write_tokenizer(
    folder: Path, tokenizer_json: dict[str, Any], layout: VocabLayout, max_positions: int
) -> None:
    """tokenizer.json (from build_tokenizer_json), tokenizer_config.json and
    special_tokens_map.json in `folder`."""
    (folder / TOKENIZER_FILE).write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    extra = [m.token for m in layout.modalities]
    (folder / "special_tokens_map.json").write_text(
        json.dumps({**specials, "additional_special_tokens": extra}, indent=2) + "\n"
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "additional_special_tokens": extra,
        "model_max_length": max_positions,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
