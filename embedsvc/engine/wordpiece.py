"""BERT WordPiece ids for plain ASCII text, word by word from a cache.

The Rust tokenizer costs about 1.5 us of CPU per word of a short English query (its
normalizer, pre-tokenizer, WordPiece model, post-processor and the Encoding object it
builds): 20-24 us per 15-word query, measured on the 2-core development machine, which
was a fifth of the event loop's time per request with a near-free model. Words repeat
across requests, so for a tokenizer whose pipeline is BERT's (BertNormalizer,
BertPreTokenizer, WordPiece, a special-token template) a text made only of printable
ASCII characters is cut into words here and each word's ids come from a cache: about
2 us per query.

Why the ids are the Rust tokenizer's, exactly:
- on printable ASCII (0x20-0x7e) BertNormalizer only lowercases (if set): clean_text
  touches control characters and \\t \\n \\r, accent stripping and CJK spacing touch
  non-ASCII characters, and there are none;
- BertPreTokenizer splits at whitespace (here: spaces) and makes each punctuation
  character a word of its own, and every printable ASCII character that is not a
  letter, digit or space is punctuation to it;
- WordPiece sees each word alone, so a word's ids do not depend on its neighbours;
  a word not yet cached is tokenized by the Rust tokenizer itself;
- the post-processor adds the same special ids around every single text ([CLS] ...
  [SEP]), learned once by encoding probes.
Anything else gets None and goes to the Rust tokenizer: a character outside printable
ASCII, a text containing an added token's content (such as "[SEP]", matched before
normalization there), or a tokenizer with another pipeline.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tokenizers import Tokenizer

CACHE_WORDS = 1 << 16  # cleared when full: bounded memory, and the hot words return
MAX_ADDED_TOKENS = 32  # more than this to look for in every text: not worth it


class AsciiWordPiece:
    def __init__(self, tokenizer: Tokenizer, lowercase: bool, max_word_chars: int) -> None:
        self._tok = tokenizer
        self._lower = lowercase
        self._max_word = max_word_chars
        alnum = "a-z0-9" if lowercase else "A-Za-z0-9"
        self._words = re.compile(f"[{alnum}]+|[^{alnum} ]").findall
        self._added = [
            t.content.lower() for t in tokenizer.get_added_tokens_decoder().values() if t.content
        ]
        self._cache: dict[str, list[int]] = {}
        # The special ids around a single text, from probes: [CLS] + ids + [SEP] for BERT.
        self._head: list[int] = []
        self._tail: list[int] = []
        for i, probe in enumerate(("a", "hello world", "x , y")):
            full = tokenizer.encode(probe, add_special_tokens=True).ids
            bare = tokenizer.encode(probe, add_special_tokens=False).ids
            n = len(bare)
            at = next(j for j in range(len(full) - n + 1) if full[j : j + n] == bare)
            head, tail = full[:at], full[at + len(bare) :]
            if i == 0:
                self._head, self._tail = head, tail
            elif (head, tail) != (self._head, self._tail):
                raise ValueError("the post-processor's special ids depend on the text")

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> AsciiWordPiece | None:
        """The fast path for `tokenizer` (padding and truncation off), or None if its
        pipeline is not BERT's."""
        cfg: dict[str, Any] = json.loads(tokenizer.to_str())
        norm = cfg.get("normalizer") or {}
        model = cfg.get("model") or {}
        post = cfg.get("post_processor") or {}
        if (
            norm.get("type") != "BertNormalizer"
            or (cfg.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer"
            or model.get("type") != "WordPiece"
            or post.get("type") not in ("TemplateProcessing", "BertProcessing")
            or len(tokenizer.get_added_tokens_decoder()) > MAX_ADDED_TOKENS
        ):
            return None
        try:
            return cls(
                tokenizer,
                lowercase=bool(norm.get("lowercase", True)),
                max_word_chars=int(model.get("max_input_chars_per_word", 100)),
            )
        except (ValueError, StopIteration):
            return None

    def encode(self, text: str) -> list[int] | None:
        """Ids with special tokens, as `Tokenizer.encode(text).ids`; None if this text
        must go to the Rust tokenizer."""
        if not (text.isascii() and text.isprintable()):
            return None
        lowered = text.lower()
        for added in self._added:  # in any case: superset of what the tokenizer matches
            if added in lowered:
                return None
        if self._lower:
            text = lowered
        cache = self._cache
        out = list(self._head)
        for word in self._words(text):
            ids = cache.get(word)
            if ids is None:
                ids = self._piece(word)
            out += ids
        out += self._tail
        return out

    def _piece(self, word: str) -> list[int]:
        ids: list[int] = self._tok.encode(word, add_special_tokens=False).ids
        if len(word) <= self._max_word:  # longer ones are all [UNK]: not worth a slot
            if len(self._cache) >= CACHE_WORDS:
                self._cache.clear()
            self._cache[word] = ids
        return ids
