"""One JSON guard for every JSON the project parses from outside: request bodies of both servers
(``corpora.serve``, ``agents.openai_server``) and the env's ``tool_call`` actions (``envs.actions``).

    from corpora.jsonguard import JSONGuardError, loads
    body = loads(raw, max_bytes=1 << 20)       # JSONGuardError (a ValueError) with a clear message

It lives in ``corpora``, the lowest layer, so that every package may import it. ``json.loads``
alone lets hostile input out as several exception types: ``RecursionError`` for deep nesting
(100,000 ``[``), ``ValueError`` for an integer of more than 4,300 digits, ``UnicodeDecodeError``
for bad bytes; it also accepts ``NaN`` and ``Infinity`` and turns ``1e999`` into ``inf``. Here
every such input gives one :class:`JSONGuardError`, and the limits are explicit:

* ``max_bytes``: the size of the text (bytes, or characters for a ``str``), checked first;
* ``max_depth``: nesting of arrays and objects (checked without recursion);
* ``max_int_digits``: digits in one integer literal (``10**30`` has 31);
* no ``NaN``/``Infinity`` and no float that overflows to infinity.

The cost stays linear: deep-nesting and long-integer checks run only when the text could break
them (it holds more brackets than ``max_depth``, or a run of more digits than allowed).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 64
MAX_INT_DIGITS = 64


class JSONGuardError(ValueError):
    """Input that is not JSON, or JSON over one of the guard's limits (the message says which)."""


def _reject_constant(name: str):
    raise JSONGuardError(f"{name} is not valid JSON (only finite numbers are allowed)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONGuardError(f"number {text[:40]!r} overflows a 64-bit float")
    return value


def _bounded_int(limit: int):
    def parse(text: str) -> int:
        digits = len(text) - (text[0] == "-")
        if digits > limit:
            raise JSONGuardError(f"integer with {digits} digits is over the limit of {limit} digits")
        return int(text)

    return parse


def depth(obj: Any) -> int:
    """Nesting depth of a parsed value (a scalar: 0, ``[]``: 1), without recursion."""
    best, stack = 0, [(obj, 1)]
    while stack:
        value, d = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        best = max(best, d)
        stack.extend((v, d + 1) for v in value if isinstance(v, (list, dict)))
    return best


def loads(data: bytes | bytearray | str, *, max_bytes: int = 1 << 20, max_depth: int = MAX_DEPTH,
          max_int_digits: int = MAX_INT_DIGITS) -> Any:
    """Parse ``data`` as JSON within the limits; :class:`JSONGuardError` for anything else.

    Never lets another exception out for any input of the accepted types (``MemoryError``
    aside, which ``max_bytes`` is there to prevent).
    """
    if not isinstance(data, (bytes, bytearray, str)):
        raise JSONGuardError(f"expected JSON text, got {type(data).__name__}")
    if len(data) > max_bytes:
        unit = "characters" if isinstance(data, str) else "bytes"
        raise JSONGuardError(f"JSON text of {len(data)} {unit} is over the limit of {max_bytes}")
    if isinstance(data, (bytes, bytearray)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONGuardError(f"JSON text is not UTF-8 (byte {exc.start})") from None
    else:
        text = data
    kwargs: dict = {"parse_constant": _reject_constant, "parse_float": _finite_float}
    if re.search(r"\d{%d}" % (max_int_digits + 1), text):  # only then pay for a Python-level int hook
        kwargs["parse_int"] = _bounded_int(max_int_digits)
    try:
        value = json.loads(text, **kwargs)
    except JSONGuardError:
        raise
    except json.JSONDecodeError as exc:
        raise JSONGuardError(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise JSONGuardError(f"JSON nested deeper than the limit of {max_depth}") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. int() over sys's digit limit
        raise JSONGuardError(f"invalid JSON value: {str(exc)[:200]}") from None
    if text.count("[") + text.count("{") > max_depth and depth(value) > max_depth:
        raise JSONGuardError(f"JSON nested deeper than the limit of {max_depth}")
    return value
