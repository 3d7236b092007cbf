"""Untrusted values become typed values here, in one place for every front-end.

What arrives in a request (a JSON value, a msgpack value, a header, a query parameter) is checked
by one of these functions before any code relies on its type: each returns the typed value or
raises ``BadInput`` with a message that names the field. Nothing here allocates from a declared
size. The traps they close, each found by fuzzing:

- ``str.isdigit()`` accepts "²" and "١" but ``int()`` refuses them: digits are ASCII digits here;
- ``int()`` of thousands of digits raises (or costs quadratic time): numbers have at most
  ``MAX_DIGITS`` digits;
- Python's JSON reader accepts ``NaN`` and ``Infinity``, which no JSON writer may echo: refused;
- numpy cannot represent more than 64 dimensions: shapes have at most ``MAX_DIMS``;
- ``np.dtype()`` parses arbitrary strings: dtypes come from a fixed table.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from modelport.errors import BadInput

MAX_DIGITS = 18  # every such number fits an int64
MAX_DIMS = 32  # numpy's own limit is 64; no image model comes near either
MAX_LABEL_CHARS = 128  # version labels and other short names

# Wire dtype names -> dtypes: numpy's short codes ("f4", what ``wire.tensor_to_wire`` writes)
# and full names ("float32"), for the numeric types a model can take or give.
_DTYPES = {
    key: np.dtype(code)
    for code in ("?", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8")
    for key in (np.dtype(code).str.lstrip("<>=|"), np.dtype(code).name)
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def ascii_digits(text: str) -> bool:
    return 0 < len(text) <= MAX_DIGITS and text.isascii() and text.isdigit()


def integer(value: Any, field: str, *, minimum: int = 0, maximum: int | None = None,
            input_name: str | None = None) -> int:
    """An integer given as a number or as a string of ASCII digits, within bounds."""
    if isinstance(value, str) and ascii_digits(value):
        value = int(value)
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise BadInput(f"{field} must be an integer {bounds}, got {show(value)}", input_name=input_name)
    return value


def optional_integer(value: Any, field: str, **bounds: Any) -> int | None:
    return None if value is None else integer(value, field, **bounds)


def positive_number(value: Any, field: str) -> float:
    """A finite number above zero (a timeout, a delay)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise BadInput(f"{field} must be a number, got {show(value)}") from None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        value = float(value) if value < 2 ** 1023 else math.inf  # past float's range: refused below
    if not isinstance(value, float) or not math.isfinite(value) or value <= 0:
        raise BadInput(f"{field} must be a finite number above 0, got {show(value)}")
    return value


def version(value: Any, field: str = "version") -> int | str | None:
    """A version reference: a number (ASCII digits), a label (a short string), or None for "latest"."""
    if value is None or value == "":
        return None
    if _is_int(value):
        return integer(value, field)
    if isinstance(value, str):
        if value.isascii() and value.isdigit():
            return integer(value, field)
        if len(value) <= MAX_LABEL_CHARS:
            return value
    raise BadInput(f"{field} must be a version number or a label of at most {MAX_LABEL_CHARS} characters, "
                   f"got {show(value)}")


def mapping(value: Any, field: str, *, input_name: str | None = None) -> dict:
    """An optional JSON object (``parameters``): absent is empty."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadInput(f"{field} must be an object, got {type(value).__name__}", input_name=input_name)
    return value


def flag(value: Any, field: str, default: bool = False) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadInput(f"{field} must be true or false, got {show(value)}")
    return value


def string(value: Any, field: str, *, max_chars: int = MAX_LABEL_CHARS, input_name: str | None = None) -> str:
    if not isinstance(value, str) or len(value) > max_chars:
        raise BadInput(f"{field} must be a string of at most {max_chars} characters, got {show(value)}",
                       input_name=input_name)
    return value


def request_id(value: Any, field: str = "id") -> str | int:
    """An id to echo: a string or an integer (never a float: NaN and Infinity cannot be written back)."""
    if isinstance(value, str) or (_is_int(value) and abs(value) < 2 ** 63):
        return value
    raise BadInput(f"{field} must be a string or an integer, got {show(value)}")


def shape(value: Any, field: str, *, input_name: str | None = None) -> tuple[int, ...]:
    """A tensor shape: 1 to ``MAX_DIMS`` non-negative integers. Their product is not allocated here."""
    if (not isinstance(value, (list, tuple)) or not 0 < len(value) <= MAX_DIMS
            or not all(_is_int(d) and 0 <= d < 2 ** 63 for d in value)):
        raise BadInput(f"{field} must be a list of 1 to {MAX_DIMS} non-negative integers, got {show(value)}",
                       input_name=input_name)
    return tuple(value)


def dtype(value: Any, field: str, *, input_name: str | None = None) -> np.dtype:
    """A numeric dtype by name ("float32" or numpy's "f4"), native byte order."""
    found = _DTYPES.get(value) if isinstance(value, str) else None
    if found is None:
        raise BadInput(f"{field}: unknown dtype {show(value)}; expected one of {', '.join(sorted(_DTYPES))}",
                       input_name=input_name)
    return found


def content_length(raw: str, field: str, limit: int) -> int:
    """A byte count from a header: ASCII digits, at most ``limit``."""
    if not ascii_digits(raw) or int(raw) > limit:
        raise BadInput(f"{field} = {show(raw)} must be a number of bytes from 0 to {limit}")
    return int(raw)


def json_body(body: bytes, what: str = "request body") -> Any:
    """Parse JSON, refusing the non-standard constants NaN, Infinity and -Infinity."""
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise BadInput(f"{what}: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:  # includes JSONDecodeError and the int-digits limit
        raise BadInput(f"{what}: not valid JSON: {exc}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def show(value: Any, limit: int = 40) -> str:
    """A value for an error message, cut short: never echo a megabyte back."""
    if _is_int(value) and value.bit_length() > 64:
        return "an integer too large"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
