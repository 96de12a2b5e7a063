"""A two-task toy assignment the grading tests build in a temporary folder (fast: no model, no GPU).

Task `add` (2 points, proportional, 3 parametrized tests) and task `mul` (1 point, all-or-nothing, 2 tests);
one public test; one mutant that breaks `add` only.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

MANIFEST = """\
[assignment]
title = "Toy"
package = "toy"
submit = ["toy/ops.py"]

[[task]]
id = "add"
title = "Addition"
points = 2
tests = ["tests/hidden/test_add.py"]
time_limit_s = 30
memory_mb = 6144

[[task]]
id = "mul"
title = "Multiplication"
points = 1
tests = ["tests/hidden/test_mul.py"]
partial_credit = "all_or_nothing"
time_limit_s = 30
memory_mb = 6144
"""

REFERENCE = '''\
def add(a: int, b: int) -> int:
    """Return a + b."""
    # BEGIN SOLUTION: add: return the sum of a and b
    total = a + b
    return total
    # END SOLUTION


def mul(a: int, b: int) -> int:
    """Return a * b."""
    # BEGIN SOLUTION: mul: return the product of a and b
    product = a * b
    return product
    # END SOLUTION
'''

HIDDEN_ADD = """\
import pytest
from toy.ops import add


@pytest.mark.parametrize("left, right", [(1, 2), (30, 12), (-7, 7)])
def test_add_matches_python(left, right):
    assert add(left, right) == left + right, "the hidden addition check failed"
"""

HIDDEN_MUL = """\
from toy.ops import mul


def test_mul_small_numbers():
    assert mul(3, 4) == 12


def test_mul_by_zero_gives_zero():
    assert mul(0, 5) == 0
"""

PUBLIC = """\
from toy.ops import add


def test_add_public():
    assert add(2, 2) == 4
"""

MUTANT = """\
description = "add is off by one"
targets = ["add"]

[[replace]]
file = "toy/ops.py"
old = "total = a + b"
new = "total = a + b + 1"
"""


def write_toy_assignment(root: Path) -> Path:
    """Create the toy assignment folder under `root` and return it."""
    folder = root / "toy_assignment"
    files = {
        "assignment.toml": MANIFEST,
        "README.md": "# Toy assignment\n",
        "src/toy/__init__.py": "",
        "src/toy/ops.py": REFERENCE,
        "tests/hidden/test_add.py": HIDDEN_ADD,
        "tests/hidden/test_mul.py": HIDDEN_MUL,
        "tests/public/test_public.py": PUBLIC,
        "mutants/add_off_by_one.toml": MUTANT,
    }
    for relative, text in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return folder
