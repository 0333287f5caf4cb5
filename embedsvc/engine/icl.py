"""Queries with in-context examples (BAAI/bge-en-icl), built as FlagEmbedding's
`FlagICLModel.encode_queries` builds them, so the vectors are the same:

1. the instruction and the query, `<instruct>{instruction}\\n<query>{query}` (the prompt
   or the instruction of the request, then the text), are tokenized without special
   tokens and cut to `query_max_tokens` less room for `<s>` and `\\n<response></s>`;
2. those tokens are decoded back to text (always: a decode does not always give back the
   text it came from, and the model was fed the decoded one);
3. the examples, each `<instruct>{instruct}\\n<query>{query}\\n<response>{response}`, joined
   by a blank line and followed by one, go before it, and `\\n<response>` after it;
4. that text is tokenized as any other (special tokens added).

Documents take none of this: a request without a prompt or an instruction is a document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from embedsvc.errors import ValidationError

EXAMPLE = "<instruct>{instruct}\n<query>{query}\n<response>{response}"
SEPARATOR = "\n\n"
SUFFIX = "\n<response>"
# What FlagICLModel leaves room for (Mistral's own begin and end tokens, as text).
BEGIN, END = "<s>", "</s>"

# (instruct, query, response)
Example = tuple[str, str, str]


def examples_prefix(examples: tuple[Example, ...]) -> str:
    if not examples:
        return ""
    parts = [EXAMPLE.format(instruct=i, query=q, response=r) for i, q, r in examples]
    return SEPARATOR.join(parts) + SEPARATOR


@dataclass
class IclQueries:
    tokenizer: Tokenizer  # bare: no padding, no truncation
    query_max_tokens: int
    clean_up_spaces: bool  # the folder's clean_up_tokenization_spaces (decoding)
    limit: int = field(init=False)  # tokens of instruction and query kept

    @classmethod
    def of(cls, tokenizer: Tokenizer, folder: str, query_max_tokens: int) -> IclQueries:
        try:
            config = json.loads((Path(folder) / "tokenizer_config.json").read_text("utf-8"))
        except (OSError, ValueError):
            config = {}
        clean = bool(config.get("clean_up_tokenization_spaces", False))
        return cls(tokenizer, query_max_tokens, clean)

    def __post_init__(self) -> None:
        room = len(self._ids(BEGIN)) + len(self._ids(SUFFIX + END))
        self.limit = self.query_max_tokens - room

    def build(
        self,
        queries: list[str],
        examples: tuple[Example, ...],
        *,
        truncate: bool,
        direction: str,
        param: str,
    ) -> list[str]:
        """The texts to tokenize for these queries (each its instruction and query)."""
        limit = self.limit
        out: list[str] = []
        prefix = examples_prefix(examples)
        encoded = self.tokenizer.encode_batch(queries, add_special_tokens=False)
        for i, ids in enumerate(e.ids for e in encoded):
            if len(ids) > limit:
                if not truncate:
                    where = f"{param}[{i}]" if len(queries) > 1 else param
                    raise ValidationError(
                        f"{where} has {len(ids)} tokens with its instruction, more than this "
                        f"model's query limit of {limit}; shorten it or send truncate=true",
                        param=param,
                    )
                ids = ids[-limit:] if direction == "left" else ids[:limit]
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            if self.clean_up_spaces:
                text = clean_up_spaces(text)
            out.append(prefix + text + SUFFIX)
        return out

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)


def clean_up_spaces(text: str) -> str:
    """transformers' clean_up_tokenization, which a decode applies when the tokenizer's
    configuration asks for it."""
    for before, after in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
        (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):  # fmt: skip
        text = text.replace(before, after)
    return text
