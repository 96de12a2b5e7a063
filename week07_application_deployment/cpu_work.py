"""A CPU-bound pure-Python function, for the seminar's measurement of the GIL.

It lives in a module, not in a notebook cell, because the seminar also runs it in fresh interpreter processes,
and a fresh process can only run what it can import by name: the same reason `uvicorn --workers 4` takes
the application as a string ("module:app") rather than as an object.
"""

from __future__ import annotations

__all__ = ["busy_loop", "busy_loop_expected"]


def busy_loop(n: int) -> int:
    """Sum of i*i for i < n, one bytecode-interpreted step at a time: the thread holds the GIL throughout."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    total = 0
    for i in range(n):
        total += i * i
    return total


def busy_loop_expected(n: int) -> int:
    """What busy_loop(n) returns, in closed form: (n-1) n (2n-1) / 6."""
    return (n - 1) * n * (2 * n - 1) // 6
