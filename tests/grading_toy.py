"""A two-task toy assignment the grading tests build in a temporary folder (fast: no model, no GPU).

Task `add` (2 points, proportional, 3 parametrized tests) and task `mul` (1 point, all-or-nothing, 3 tests,
one of them on a tensor); one public test; one mutant that breaks `add` only. The hidden tests are written
as every hidden test is: in the trusted checker, through the `submission` fixture.
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
time_limit_s = 20
memory_mb = 6144

[[task]]
id = "mul"
title = "Multiplication"
points = 1
tests = ["tests/hidden/test_mul.py"]
partial_credit = "all_or_nothing"
time_limit_s = 20
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


@pytest.mark.parametrize("left, right", [(1, 2), (30, 12), (-7, 7)])
def test_add_matches_python(submission, left, right):
    total = submission.call("toy.ops:add", left, right, returns=int)
    assert total == left + right, "the hidden addition check failed"
"""

HIDDEN_MUL = """\
import torch


def test_mul_small_numbers(submission):
    assert submission.call("toy.ops:mul", 3, 4, returns=int) == 12, "mul(3, 4) must be 12"


def test_mul_by_zero_gives_zero(submission):
    assert submission.call("toy.ops:mul", 0, 5, returns=int) == 0, "mul(0, 5) must be 0"


def test_mul_scales_a_tensor(submission):
    x = torch.arange(6.0).reshape(2, 3)
    product = submission.call("toy.ops:mul", x, 2.0, returns=torch.Tensor)
    assert torch.equal(product, x * 2), "mul(x, 2.0) must double every element of x"
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
