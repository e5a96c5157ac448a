"""Checks of the numbers and ids users pass in (the API, the CLI and the server alike).

Every check raises :class:`~semdb.errors.InvalidArgumentError` with one line naming the argument,
so that a string where a number belongs, a float where a count belongs, or a number too large for
the store (SQLite and PostgreSQL hold 64-bit integers) is the user's error, never a ``TypeError``
or ``OverflowError`` from deep inside.
"""

from __future__ import annotations

import math
import numbers

from semdb.errors import InvalidArgumentError

MAX_INTEGER = 2**63 - 1  # SQLite INTEGER and PostgreSQL BIGINT: no stored id or size is larger


def whole_number(value: object, name: str, *, low: int, high: int = MAX_INTEGER) -> int:
    """``value`` as an ``int`` in ``[low, high]``; a bool, a float or a string is refused, not truncated."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"{name} must be a whole number, got {value!r}")
    number = int(value)
    if not low <= number <= high:
        raise InvalidArgumentError(f"{name} must be between {low} and {high}, got {number}")
    return number


def real_number(value: object, name: str) -> float:
    """``value`` as a finite ``float``; a bool or a string is refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise InvalidArgumentError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def image_id(value: object) -> int:
    """A stored image id as an ``int`` (any whole number: one that cannot exist is simply not found)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"an image id must be a whole number, got {value!r}")
    return int(value)


def storable_id(value: int) -> bool:
    """Whether ``value`` can be a stored image id at all (ids start at 1 and fit in 64 bits)."""
    return 1 <= value <= MAX_INTEGER
