"""Argument checks shared by every package of freezesched (it imports nothing of ours).

Every public entry point validates its input eagerly and raises ``TypeError`` (wrong type)
or ``ValueError`` (right type, wrong value) with a message that names the argument, the
rule and the value; these helpers keep that wording the same everywhere.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection

__all__ = ["MAX_TICK", "check_choice", "check_int", "check_tick", "describe"]

#: The largest tick (and the largest integer argument of a schedule): ``2**53 - 1``, the
#: largest integer a float64 holds exactly. Every schedule is exact up to it.
MAX_TICK = 2**53 - 1


def describe(value: object) -> str:
    """``repr`` of ``value`` and its type name, for error messages.

    Examples:
        >>> describe(3.0)
        '3.0 (float)'
    """
    text = repr(value)
    if len(text) > 120:
        text = text[:117] + "..."
    return f"{text} ({type(value).__name__})"


def check_int(value: object, name: str, *, minimum: int = 0, maximum: int = MAX_TICK) -> int:
    """Return ``value`` as an ``int`` if it is an integer in ``[minimum, maximum]``.

    ``bool`` is rejected although it is an ``int`` subclass: ``True`` as a tick or a count
    is almost always a bug.

    Raises:
        TypeError: ``value`` is not an integer.
        ValueError: ``value`` is out of range.

    Examples:
        >>> check_int(4, "rho", minimum=1)
        4
        >>> check_int(0, "rho", minimum=1)
        Traceback (most recent call last):
        ...
        ValueError: rho must be an int in [1, 2**53 - 1], got 0
    """
    top = "2**53 - 1" if maximum == MAX_TICK else str(maximum)
    rule = f"{name} must be an int in [{minimum}, {top}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{rule}, got {describe(value)}")
    number = int(value)
    if not minimum <= number <= maximum:
        raise ValueError(f"{rule}, got {value!r}")
    return number


def check_tick(t: object, name: str = "t") -> int:
    """Validate a tick: an ``int`` (or NumPy integer) in ``[0, MAX_TICK]``; not a ``bool``.

    Args:
        t: The tick to validate.
        name: The argument name used in error messages.

    Returns:
        ``t`` as a Python ``int``.

    Raises:
        TypeError: ``t`` is not an integer.
        ValueError: ``t`` is negative or above :data:`MAX_TICK`.

    Examples:
        >>> check_tick(3)
        3
        >>> check_tick(-1)
        Traceback (most recent call last):
        ...
        ValueError: t must be an int in [0, 2**53 - 1], got -1
    """
    return check_int(t, name, minimum=0, maximum=MAX_TICK)


def check_choice(value: object, name: str, choices: Collection[str]) -> str:
    """Return ``value`` if it is one of the strings in ``choices``; ``ValueError`` otherwise.

    Examples:
        >>> check_choice("eval", "bn", ("eval", "train"))
        'eval'
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {describe(value)}")
    return value
