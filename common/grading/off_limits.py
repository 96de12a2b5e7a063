"""Refuse, in the submission's worker, the modules of the course library that a task asks students to write.

The course library is released and importable in the sandbox, and some tasks ask for what it already has
(week 5: the tensor-parallel layers; week 9: speculative decoding). A scenario calls `refuse_imports` before
it imports the submission: from then on, importing those modules raises ModuleNotFoundError with the task's
reason, where a student who tries meets it.

That refusal states the rule; it does not enforce it. It runs in the submission's own interpreter, which can
take the finder off sys.meta_path or exec the library's source. What enforces the rule is the task's shape:
an interface the library does not answer, observations the trusted side checks (see each assignment's
scenarios and mutants).
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Sequence


def _blocked(name: str, modules: Sequence[str]) -> bool:
    return any(name == blocked or name.startswith(blocked + ".") for blocked in modules)


class _RefuseImports(importlib.abc.MetaPathFinder):
    """A finder first on sys.meta_path that refuses `modules` (and their submodules) with `reason`."""

    def __init__(self, modules: tuple[str, ...], reason: str) -> None:
        self.modules, self.reason = modules, reason

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 (importlib's protocol)
        if _blocked(name, self.modules):
            raise ModuleNotFoundError(f"{name} is off limits in this task: {self.reason}", name=name)
        return None


def refuse_imports(modules: Sequence[str], reason: str) -> None:
    """Make `modules` unimportable in this process, saying `reason`.

    Parts of them imported already (torch._dynamo imports some of torch.distributed.tensor) are dropped from
    sys.modules and from their parent package, so `import` has to find them again, and the finder says no.
    """
    modules = tuple(modules)
    if not any(isinstance(f, _RefuseImports) and f.modules == modules for f in sys.meta_path):
        sys.meta_path.insert(0, _RefuseImports(modules, reason))
    for name in [name for name in sys.modules if _blocked(name, modules)]:
        del sys.modules[name]
    for blocked in modules:
        parent, _, child = blocked.rpartition(".")
        if parent in sys.modules and child in vars(sys.modules[parent]):
            delattr(sys.modules[parent], child)
