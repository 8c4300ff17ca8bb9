"""User-facing errors.

A DuodiffError carries a message meant for the person who ran the command: it names the bad
value and what is allowed. The CLI prints it as a single line and exits with status 2; library
callers (the tests, the workflow) can catch it like any exception.
"""


class DuodiffError(Exception):
    """Bad input or an unusable file, explained in one line."""

    exit_code = 2  # the CLI's exit status (a training run stopped by a signal: 128 + its number)


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
    require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, f"{name} must be {kind}; got {value!r}")
