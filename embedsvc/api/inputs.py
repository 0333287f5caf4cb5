"""Parsing of the `inputs`/`input` field shared by both dialects."""

from __future__ import annotations

from typing import Any

from embedsvc.engine import Texts, TokenIds
from embedsvc.errors import ValidationError

SHAPES = "a string, a list of strings, a list of token ids, or a list of token-id lists"


def parse_inputs(value: Any, param: str) -> Texts | TokenIds:
    """The texts or the token-id sequences `value` holds."""
    if isinstance(value, str):
        _check_text(value, param)
        return Texts([value])
    if not isinstance(value, list):
        raise ValidationError(f"{param} must be {SHAPES}; got {_kind(value)}", param=param)
    if not value:
        return Texts([])
    if all(isinstance(v, str) for v in value):
        for i, v in enumerate(value):
            _check_text(v, f"{param}[{i}]")
        return Texts(list(value))
    if all(_is_int(v) for v in value):
        return TokenIds([list(value)])
    if all(isinstance(v, list) for v in value):
        for i, seq in enumerate(value):
            bad = next((v for v in seq if not _is_int(v)), None)
            if bad is not None or not seq:
                what = "is empty" if not seq else f"contains {_kind(bad)}"
                raise ValidationError(
                    f"{param}[{i}] {what}; a token-id list holds integers", param=param
                )
        return TokenIds([list(s) for s in value])
    cats = [type(v).__name__ for v in value]
    i = next((k for k, c in enumerate(cats) if c != cats[0]), 0)
    raise ValidationError(
        f"{param} must be {SHAPES}; {param}[{i}] is {_kind(value[i])}", param=param
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"a number ({v!r})"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _check_text(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(
            f"{param} contains an unpaired UTF-16 surrogate (\\ud800-\\udfff), which is not "
            "valid text",
            param=param,
        ) from None
