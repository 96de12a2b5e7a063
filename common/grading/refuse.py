"""Refuse to import modules a task forbids, in a rank of the grader's hub, with a message that says why.

A scenario calls `refuse_imports(modules, advice)` in each rank before the submission is imported: a student
who reaches for a forbidden library then meets the rule as a clear ModuleNotFoundError. It states the rule; it
does not enforce it. It runs in the submission's own interpreter, which can take the finder off
sys.meta_path or exec the library's source; what enforces a rule is a task the library cannot answer, and
what the grader observes from outside.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Sequence

__all__ = ["refuse_imports"]


def _blocked(name: str, modules: Sequence[str]) -> bool:
    return any(name == blocked or name.startswith(blocked + ".") for blocked in modules)


class _Refuse(importlib.abc.MetaPathFinder):
    """A finder first on sys.meta_path that refuses `modules` and their submodules, with `advice`."""

    def __init__(self, modules: Sequence[str], advice: str) -> None:
        self.modules, self.advice = tuple(modules), advice

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 (importlib's protocol)
        if _blocked(name, self.modules):
            raise ModuleNotFoundError(f"{name} is off limits {self.advice}", name=name)
        return None


def refuse_imports(modules: Sequence[str], advice: str) -> None:
    """Make `modules` (and their submodules) unimportable in this process; the error reads
    "<module> is off limits <advice>". Call it in a forked rank: the hub's process stays unchanged.

    torch may have imported some of them already (torch._dynamo imports parts of torch.distributed.tensor):
    they are dropped from sys.modules and from their parent package, so `import` has to find them again.
    """
    if not any(isinstance(f, _Refuse) and f.modules == tuple(modules) for f in sys.meta_path):
        sys.meta_path.insert(0, _Refuse(modules, advice))
    for name in [name for name in sys.modules if _blocked(name, modules)]:
        del sys.modules[name]
    for blocked in modules:
        parent, _, child = blocked.rpartition(".")
        if parent in sys.modules and child in vars(sys.modules[parent]):
            delattr(sys.modules[parent], child)
