"""Typed reads of fields from a decoded JSON body, each failure naming the field.

JSON gives ``True`` where a number is expected as easily as ``1``; bool is a subclass
of int in Python, so every check here says explicitly whether a bool is welcome.
A field that is absent or ``null`` reads as None: OpenAI's clients send ``null`` for
"unset", and the API treats both the same.
"""

from __future__ import annotations

from typing import Any

from engine.errors import InvalidRequestError
from engine.sampling_params import shown

# JSON integers are unbounded; OpenAI's and vLLM's integer fields are 64-bit. Bounding
# them here keeps 300-digit numbers out of the range checks (and their messages).
INT64_MIN, INT64_END = -(2**63), 2**63


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(v), type(v).__name__)


def number(body: dict[str, Any], name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise InvalidRequestError(name, f"must be a number, got {_type_name(v)}")
    try:
        return float(v)
    except OverflowError:  # an integer past float's range: 1e309 written out
        raise InvalidRequestError(name, f"must be a finite number, got {shown(v)}") from None


def integer(body: dict[str, Any], name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():  # 16.0 is what some clients send for 16
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequestError(name, f"must be an integer, got {_type_name(v)}")
    if not INT64_MIN <= v < INT64_END:
        raise InvalidRequestError(name, f"must be a 64-bit integer, got {shown(v)}")
    return v


def boolean(body: dict[str, Any], name: str) -> bool | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise InvalidRequestError(name, f"must be a boolean, got {_type_name(v)}")
    return v


def string(body: dict[str, Any], name: str) -> str | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise InvalidRequestError(name, f"must be a string, got {_type_name(v)}")
    return v


def obj(body: dict[str, Any], name: str) -> dict[str, Any] | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, dict):
        raise InvalidRequestError(name, f"must be an object, got {_type_name(v)}")
    return v


def stop_strings(body: dict[str, Any], name: str = "stop") -> tuple[str, ...]:
    """``stop``: a string or an array of strings (SamplingParams checks count and size)."""
    v = body.get(name)
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return tuple(v)
    raise InvalidRequestError(name, "must be a string or an array of strings")


def token_ids(v: Any) -> list[int] | None:
    """``v`` as a list of token ids, or None if it is not a non-empty array of 64-bit
    integers (the caller decides whether something else is acceptable there; the
    vocabulary check comes later)."""
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool)
                                         and INT64_MIN <= t < INT64_END for t in v):
        return list(v)
    return None


def refuse(body: dict[str, Any], unsupported: dict[str, Any]) -> None:
    """400 for a field set to anything but its no-op value: silently ignoring, say,
    ``echo`` or ``tools`` would hand the client an answer to a question it did not ask."""
    for name, noop in unsupported.items():
        v = body.get(name)
        if v is not None and v != noop:
            raise InvalidRequestError(name, "is not supported by this server")
