"""Tokenization with prompts and explicit truncation, on a bare fast tokenizer.

The common case (nothing too long) is one `encode_batch` call that runs in Rust with
the GIL released. Only over-long inputs are encoded again, truncated to leave room for
the special tokens, and post-processed, so truncation keeps [CLS]/[SEP] in place.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from tokenizers import Encoding, Tokenizer

from embedsvc.engine.wordpiece import AsciiWordPiece
from embedsvc.errors import PayloadTooLargeError, ValidationError


@dataclass(frozen=True)
class TokenInfo:
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        self._tok = tokenizer
        self.max_length = max_length
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._n_special = tokenizer.num_special_tokens_to_add(False)
        self._special_ids = {
            i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special
        }
        # Ids only: the fast variant (tokenizers >= 0.21) skips the character offsets,
        # about 15% of the work for short texts.
        self._encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        # Plain ASCII text with a BERT tokenizer: word by word from a cache (wordpiece.py).
        self._ascii = AsciiWordPiece.for_tokenizer(tokenizer)

    def encode(
        self,
        texts: list[str],
        *,
        prefix: str,
        truncate: bool,
        direction: str,
        param: str,
    ) -> list[list[int]]:
        """Token ids (with special tokens) of `prefix + text` for each text."""
        full = [prefix + t for t in texts] if prefix else texts
        return self.fit(
            self.encode_full(full),
            full,
            prefix=prefix,
            truncate=truncate,
            direction=direction,
            param=param,
        )

    def encode_full(self, full: list[str]) -> list[list[int]]:
        """Token ids with special tokens, untruncated: one call for many requests' texts."""
        ascii_ = self._ascii
        if ascii_ is None:
            return [e.ids for e in self._encode_batch(full, add_special_tokens=True)]
        out: list[list[int]] = []
        rest: list[int] = []  # texts for the Rust tokenizer
        for i, text in enumerate(full):
            ids = ascii_.encode(text)
            if ids is None:
                rest.append(i)
                ids = []
            out.append(ids)
        if rest:
            encoded = self._encode_batch([full[i] for i in rest], add_special_tokens=True)
            for i, enc in zip(rest, encoded, strict=True):
                out[i] = enc.ids
        return out

    def fit(
        self,
        ids: list[list[int]],
        full: list[str],
        *,
        prefix: str = "",
        truncate: bool,
        direction: str,
        param: str,
        limit: int | None = None,
    ) -> list[list[int]]:
        """Check one request's encoded texts (`full` = `prefix` + text) against the length
        limit (the model's, or `limit`: a ColBERT model's query or document length);
        truncate or refuse.

        Only over-long inputs are encoded again, truncated to leave room for the special
        tokens, and post-processed, so truncation keeps [CLS]/[SEP] in place. Truncating
        from the left keeps the prompt too: [CLS] + prompt + the text's tail + [SEP]."""
        limit = limit or self.max_length
        too_long = [i for i, x in enumerate(ids) if len(x) > limit]
        if not too_long:
            return ids
        if not truncate:
            i = too_long[0]
            where = f"{param}[{i}]" if len(ids) > 1 else param
            bound = "this model's limit" if limit == self.max_length else "the limit"
            raise ValidationError(
                f"{where} has {len(ids[i])} tokens (including prompt and special tokens), "
                f"more than {bound} of {limit}; shorten it or send truncate=true",
                param=param,
            )
        ids = list(ids)
        keep = max(limit - self._n_special, 1)
        raw = self._tok.encode_batch([full[i] for i in too_long], add_special_tokens=False)
        for i, enc in zip(too_long, raw, strict=True):
            if direction == "left" and prefix:
                enc = _keep_prompt(enc, len(prefix), keep)
            else:
                enc.truncate(keep, direction=direction)
            ids[i] = self._tok.post_process(enc, add_special_tokens=True).ids
        return ids

    def check_ids(
        self, seqs: list[list[int]], *, truncate: bool, direction: str, param: str
    ) -> list[list[int]]:
        """Validate caller-supplied token ids: in vocabulary, within the length limit."""
        out = []
        for i, seq in enumerate(seqs):
            where = f"{param}[{i}]" if len(seqs) > 1 else param
            if not seq:
                raise ValidationError(f"{where} is an empty list of token ids", param=param)
            bad = next((t for t in seq if t < 0 or t >= self.vocab_size), None)
            if bad is not None:
                raise ValidationError(
                    f"{where} has token id {bad}, outside this model's vocabulary "
                    f"[0, {self.vocab_size})",
                    param=param,
                )
            if len(seq) > self.max_length:
                if not truncate:
                    raise ValidationError(
                        f"{where} has {len(seq)} tokens, more than this model's limit of "
                        f"{self.max_length}; shorten it or send truncate=true",
                        param=param,
                    )
                seq = self._truncate_ids(seq, direction)
            out.append(list(seq))
        return out

    def _truncate_ids(self, seq: list[int], direction: str) -> list[int]:
        """Cut the interior, keep a leading and a trailing special id ([CLS] ... [SEP],
        <s> ... </s>) where the sequence has them: the same ids the text path gives."""
        lead = 1 if seq[0] in self._special_ids else 0
        trail = 1 if seq[-1] in self._special_ids else 0
        room = max(self.max_length - lead - trail, 1)
        body = seq[lead : len(seq) - trail]
        body = body[:room] if direction == "right" else body[-room:]
        return seq[:lead] + body + seq[len(seq) - trail :]

    def tokens(
        self, texts: list[str], *, prefix: str, add_special_tokens: bool, max_tokens: int
    ) -> list[list[TokenInfo]]:
        """Per-token detail for /tokenize; offsets are in characters of the prefixed text.
        More than `max_tokens` in all is refused before any record is made."""
        full = [prefix + t for t in texts] if prefix else texts
        encodings = self._tok.encode_batch(full, add_special_tokens=add_special_tokens)
        total = sum(len(enc) for enc in encodings)
        if total > max_tokens:
            raise PayloadTooLargeError(
                f"inputs has {total} tokens in total, more than max_request_tokens "
                f"({max_tokens}); send fewer or shorter inputs per request",
                param="inputs",
            )
        result = []
        for enc in encodings:
            row = []
            for tid, tok, special, (start, stop) in zip(
                enc.ids, enc.tokens, enc.special_tokens_mask, enc.offsets, strict=True
            ):
                is_special = bool(special)
                row.append(
                    TokenInfo(
                        id=tid,
                        text=tok,
                        special=is_special,
                        start=None if is_special else start,
                        stop=None if is_special else stop,
                    )
                )
            result.append(row)
        return result

    def decode(self, seqs: list[list[int]], *, skip_special_tokens: bool) -> list[str]:
        for seq in seqs:
            bad = next((t for t in seq if t < 0 or t >= self.vocab_size), None)
            if bad is not None:
                raise ValidationError(
                    f"ids has token id {bad}, outside this model's vocabulary "
                    f"[0, {self.vocab_size})",
                    param="ids",
                )
        return self._tok.decode_batch(seqs, skip_special_tokens=skip_special_tokens)


def _keep_prompt(enc: Encoding, prefix_chars: int, keep: int) -> Encoding:
    """`enc` (prompt + text, no special tokens) cut to `keep` tokens from the left without
    cutting the prompt: its tokens (those starting inside the prefix) and then the text's
    last tokens. A prompt that fills the budget on its own is cut like any text."""
    n_prompt = sum(1 for start, _ in enc.offsets if start < prefix_chars)
    if n_prompt >= keep:
        enc.truncate(keep, direction="left")
        return enc
    head, tail = copy.deepcopy(enc), enc
    head.truncate(n_prompt, direction="right")
    tail.truncate(keep - n_prompt, direction="left")
    return Encoding.merge([head, tail], growing_offsets=False)
