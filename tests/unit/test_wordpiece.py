"""The ASCII word cache (engine/wordpiece.py) gives the Rust tokenizer's ids exactly."""

from __future__ import annotations

import json
import random
import string

import pytest
from tokenizers import Tokenizer

from embedsvc.engine import wordpiece
from embedsvc.engine.tokenize import TextTokenizer
from embedsvc.engine.wordpiece import AsciiWordPiece
from tests.support.models import MINILM_PATH

WORDS = [
    "Hello",
    "world",
    "don't",
    "U.S.A.",
    "3.14",
    "a-b",
    "##ing",
    "un",
    "affable",
    "42",
    "x" * 120,
    "[SEP]",
    "[cls]",
    "[MASK]",
    "Straße",
    "naïve",
    "中文",
    "\t",
    "  ",
    "!!",
    "e-mail",
    "C++",
    "<b>",
    "$5,000",
    "50%",
    "ünïcödé",
    "\u00a0",
    "\u200b",
    "x\x00y",
]


def _tokenizer(**normalizer: object) -> Tokenizer:
    cfg = json.loads((MINILM_PATH / "tokenizer.json").read_text())
    cfg["normalizer"].update(normalizer)
    tok = Tokenizer.from_str(json.dumps(cfg))
    tok.no_padding()
    tok.no_truncation()
    return tok


def _texts(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    printable = string.printable[:95]  # space to tilde
    texts = []
    for _ in range(n):
        kind = rnd.random()
        if kind < 0.35:
            texts.append("".join(rnd.choice(printable) for _ in range(rnd.randint(0, 60))))
        elif kind < 0.85:
            texts.append(" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(0, 12))))
        else:
            chars = string.printable + "éß中\u00a0\u200b\u3000"
            texts.append("".join(rnd.choice(chars) for _ in range(rnd.randint(0, 40))))
    return texts


@pytest.mark.parametrize("lowercase", [True, False], ids=["uncased", "cased"])
def test_ids_equal_the_rust_tokenizer(lowercase: bool) -> None:
    tok = _tokenizer(lowercase=lowercase)
    tt = TextTokenizer(tok, 512)
    fast = AsciiWordPiece.for_tokenizer(tok)
    assert fast is not None
    texts = _texts(6000, seed=1 if lowercase else 2)
    want = [e.ids for e in tok.encode_batch(texts, add_special_tokens=True)]
    assert tt.encode_full(texts) == want
    # ... and the word cache answered most of them itself: the comparison tests it.
    answered = sum(fast.encode(t) is not None for t in texts)
    assert answered > len(texts) // 3


def test_prompts_and_truncation_still_match() -> None:
    tok = _tokenizer()
    tt = TextTokenizer(tok, 16)
    texts = ["what is a cat?", "a " * 40 + "end", "Tiere: Straße"]
    prefix = "Represent this sentence for searching relevant passages: "
    got = tt.encode(texts, prefix=prefix, truncate=True, direction="right", param="inputs")
    tok.enable_truncation(16)
    want = [e.ids for e in tok.encode_batch([prefix + t for t in texts])]
    assert got == want


def test_added_tokens_and_other_characters_go_to_the_tokenizer() -> None:
    fast = AsciiWordPiece.for_tokenizer(_tokenizer())
    assert fast is not None
    assert fast.encode("plain words, and 3 digits!") is not None
    for text in ["a [SEP] b", "a [sep] b", "[MASK]", "café", "tab\there", "line\nbreak"]:
        assert fast.encode(text) is None, text


def test_other_pipelines_get_no_word_cache() -> None:
    cfg = json.loads((MINILM_PATH / "tokenizer.json").read_text())
    cfg["pre_tokenizer"] = {"type": "Whitespace"}  # splits differently at punctuation
    assert AsciiWordPiece.for_tokenizer(Tokenizer.from_str(json.dumps(cfg))) is None
    cfg = json.loads((MINILM_PATH / "tokenizer.json").read_text())
    cfg["normalizer"] = {"type": "Lowercase"}
    assert AsciiWordPiece.for_tokenizer(Tokenizer.from_str(json.dumps(cfg))) is None


def test_the_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wordpiece, "CACHE_WORDS", 50)
    tok = _tokenizer()
    fast = AsciiWordPiece.for_tokenizer(tok)
    assert fast is not None
    rnd = random.Random(3)
    for _ in range(300):
        text = " ".join(
            "".join(rnd.choice(string.ascii_lowercase) for _ in range(rnd.randint(1, 9)))
            for _ in range(5)
        )
        assert fast.encode(text) == tok.encode(text).ids
        assert len(fast._cache) <= 50
