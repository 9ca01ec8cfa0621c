"""Ten-class text that ships offline: number words and short phrases, and a local byte-level BPE.

Class c's texts all denote the number c: the word in many languages (`num2words`), its ordinal,
the numeral, and short English phrases built from templates ("we found seven red apples",
"3 + 4", "the number sieben"...). A string that would denote two classes (a word shared by two
languages for different numbers) is dropped from both, so the label is always recoverable.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from loretta.errors import DataError

NUM2WORDS_HINT = "install it with `pip install num2words` (pure Python, works offline)"

# English phrase parts: kept short so a phrase stays well inside the token cap.
_NOUNS = [
    ("apple", "apples"), ("cat", "cats"), ("dog", "dogs"), ("book", "books"), ("bird", "birds"),
    ("chair", "chairs"), ("star", "stars"), ("cup", "cups"), ("coin", "coins"), ("tree", "trees"),
    ("boat", "boats"), ("key", "keys"), ("shoe", "shoes"), ("hat", "hats"), ("egg", "eggs"),
    ("fish", "fish"), ("car", "cars"), ("pen", "pens"), ("ring", "rings"), ("bell", "bells"),
    ("box", "boxes"), ("cow", "cows"), ("duck", "ducks"), ("lamp", "lamps"), ("door", "doors"),
    ("rock", "rocks"), ("bee", "bees"), ("leaf", "leaves"), ("mouse", "mice"), ("child", "children"),
]  # fmt: skip
_ADJECTIVES = ["", "red", "small", "big", "old", "new", "green", "blue", "tiny", "happy", "lost"]
_FRAMES = ["{}", "I see {}", "we found {}", "she has {}", "he sold {}", "they want {}"]
_NUMBER_FRAMES = [
    "the number {}", "number {}", "digit {}", "it is {}", "the answer is {}", "count to {}",
    "{} again", "just {}", "exactly {}", "{}!", "{}?", "{}.",
]  # fmt: skip
# "the number X" in a few languages, so that phrases are multilingual too
_FOREIGN_FRAMES = {
    "de": ["die Zahl {}", "Ziffer {}"],
    "fr": ["le nombre {}", "le chiffre {}"],
    "es": ["el número {}", "la cifra {}"],
    "it": ["il numero {}", "la cifra {}"],
    "nl": ["het getal {}", "cijfer {}"],
    "pt": ["o número {}", "o algarismo {}"],
}


def num2words_fn() -> Callable[..., Any]:
    try:
        from num2words import num2words
    except ImportError:
        raise DataError(
            f"the SVL-digits text needs the num2words package: {NUM2WORDS_HINT}"
        ) from None
    return num2words  # type: ignore[no-any-return]


def number_words(lang: str, to: str = "cardinal") -> list[str]:
    """The words for 0..9 in `lang` (a num2words language code); a DataError if it has none."""
    n2w = num2words_fn()
    try:
        words = [str(n2w(i, lang=lang, to=to)) for i in range(10)]
    except NotImplementedError:
        raise DataError(f"num2words has no language {lang!r}") from None
    except Exception as e:  # num2words raises assorted errors for languages it half supports
        raise DataError(f"num2words cannot spell 0..9 in {lang!r} ({type(e).__name__}: {e})") from e
    if len(set(words)) != 10:
        raise DataError(f"num2words spells two of 0..9 alike in {lang!r}: {words}")
    return words


def language_problems(languages: Sequence[str], where: str) -> list[str]:
    """Config problems for a list of num2words languages (empty when all of them work)."""
    out = []
    for lang in languages:
        try:
            number_words(lang)
        except DataError as e:
            out.append(f"{where}: {e}; drop {lang!r} from the list")
    return out


def _count_phrases(c: int, word: str) -> Iterable[str]:
    """'we found seven red apples', 'I see 7 cats', ... (most of a class's texts)."""
    for count in (word, str(c)):
        for adj, (one, many) in itertools.product(_ADJECTIVES, _NOUNS):
            phrase = " ".join(p for p in (count, adj, one if c == 1 else many) if p)
            for frame in _FRAMES:
                yield frame.format(phrase)


def _arithmetic(c: int, words: list[str]) -> Iterable[str]:
    """Sums and differences whose result is c, in words and in symbols."""
    for a in range(c + 1):
        yield f"{words[a]} plus {words[c - a]}"
        yield f"{a} + {c - a}"
    for a in range(c, 10):
        yield f"{words[a]} minus {words[a - c]}"
        yield f"{a} - {a - c}"


def class_candidates(c: int, languages: Sequence[str]) -> dict[str, list[str]]:
    """Every distinct text for class `c`, by kind: {"words", "frames", "arithmetic", "phrases"}.

    Kinds differ a lot in size (a few dozen words, thousands of phrases); the builder draws
    from them in turn, so a small dataset still sees every kind.
    """
    english = number_words("en")
    words: list[str] = []
    for lang in languages:
        cardinal = number_words(lang)
        words += [cardinal[c], cardinal[c].capitalize(), f"the number {cardinal[c]}"]
        try:
            words.append(number_words(lang, to="ordinal")[c])
        except DataError:
            pass  # not every language has ordinals in num2words
        words += [frame.format(cardinal[c]) for frame in _FOREIGN_FRAMES.get(lang, [])]
    frames = [f.format(x) for f in _NUMBER_FRAMES for x in (english[c], str(c))]
    kinds = {
        "words": words,
        "frames": frames,
        "arithmetic": list(_arithmetic(c, english)),
        "phrases": list(_count_phrases(c, english[c])),
    }
    seen: set[str] = set()  # a text counts once, in the first kind that has it
    out: dict[str, list[str]] = {}
    for kind, items in kinds.items():
        out[kind] = [t for t in dict.fromkeys(items) if t not in seen]
        seen.update(out[kind])
    return out


def text_pools(languages: Sequence[str], classes: int = 10) -> list[dict[str, list[str]]]:
    """Distinct candidate texts per class and kind; strings that denote two classes are removed."""
    cands = [class_candidates(c, languages) for c in range(classes)]
    owner: dict[str, set[int]] = {}
    for c, kinds in enumerate(cands):
        for items in kinds.values():
            for t in items:
                owner.setdefault(t.casefold(), set()).add(c)
    return [
        {
            # an empty string (some languages lack a form) would be a sample with no text
            kind: [t for t in items if t.strip() and len(owner[t.casefold()]) == 1]
            for kind, items in kinds.items()
        }
        for kinds in cands
    ]


# ---- byte-level BPE -------------------------------------------------------------------------
def train_bpe(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts` (no special tokens: the
    vocabulary layout supplies bos/eos/modality tokens). Any string encodes: bytes are the base."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode(tokenizer: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids (int64) of each text."""
    encs = tokenizer.encode_batch(list(texts))
    return [np.asarray(e.ids, dtype=np.int64) for e in encs]


def decode(tokenizer: Tokenizer, ids: Sequence[int] | np.ndarray) -> str:
    return tokenizer.decode([int(i) for i in ids])
