"""User-facing errors.

A DuodiffError carries a message meant for the person who ran the command: it names the bad
value and what is allowed. The CLI prints it as a single line and exits with status 2; library
callers (the tests, the workflow) can catch it like any exception.
"""

import math


class DuodiffError(Exception):
    """Bad input or an unusable file, explained in one line."""

    exit_code = 2  # the CLI's exit status (a training run stopped by a signal: 128 + its number)


def is_int(value) -> bool:
    """An int that is not a bool (YAML's and Python's True is an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a float that is not a bool (finiteness is the caller's to ask)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require(condition: bool, message: str) -> None:
    """Raise DuodiffError(message) unless condition holds."""
    if not condition:
        raise DuodiffError(message)


def check_choice(name: str, value, allowed) -> None:
    allowed = list(allowed)
    require(value in allowed, f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def check_positive(name: str, value) -> None:
    require(value is not None and value > 0, f"{name} must be a positive number; got {value!r}")


def check_range(name: str, value, low, high) -> None:
    require(
        value is not None and low <= value <= high,
        f"{name} must be in [{low}, {high}]; got {value!r}",
    )


def check_int(name: str, value, minimum: int) -> None:
    """An int (not a bool) >= minimum."""
    kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    require(is_int(value) and value >= minimum, f"{name} must be {kind}; got {value!r}")


def check_number(name: str, value, low, high, low_open=False, high_open=False) -> None:
    """A finite int or float (not a bool) in [low, high], either end open."""
    ok = is_number(value) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    require(ok, f"{name} must be a number in {interval}; got {value!r}")
