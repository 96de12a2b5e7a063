"""The pytest plugin that runs inside a submission's sandbox (`pytest -p common.grading.plugin`).

It reports to the grader through the channel the sandbox supervisor created, one JSON line per event, each
carrying the token it read (once) from the token pipe. It is loaded before any test module, so before any
student code, and it guards the report against the usual tricks:

- a test counts as passed only if pytest says so *and* the test function itself ran to its end (the plugin
  wraps every test function), so patching pytest's runner to skip tests gains nothing;
- the functions and classes of pytest, the plugin, `builtins`, `math`, `torch.testing`, `numpy.testing` and
  `hypothesis` are fingerprinted before collection and checked after collection and after every test: a
  submission that monkeypatches them loses every remaining test, with a message that says why;
- exiting early (`sys.exit`, `os._exit(0)`) just stops the reports: the grader counts every expected test
  that was not reported as failed.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from common.grading.sandbox import GPU_MEMORY_ENV, RESULT_FD_ENV, TOKEN_FD_ENV

MESSAGE_CHARS = 600
_WATCHED_MODULES = ("builtins", "math", "pytest", "torch.testing", "numpy.testing", "hypothesis", __name__)


def _fingerprint() -> dict[str, int]:
    """id() of every function and class (and of their attributes) in the watched modules."""
    prints: dict[str, int] = {}
    names = [m for m in list(sys.modules) if m in _WATCHED_MODULES or m.startswith("_pytest.")]
    for module_name in names:
        module = sys.modules.get(module_name)
        for attr, value in list(vars(module).items()):
            if callable(value):
                prints[f"{module_name}.{attr}"] = id(value)
                if isinstance(value, type) and value.__module__ == module_name:
                    for member, member_value in list(vars(value).items()):
                        if callable(member_value) or isinstance(
                            member_value, (property, staticmethod, classmethod)
                        ):
                            prints[f"{module_name}.{attr}.{member}"] = id(member_value)
    return prints


def _changed(before: dict[str, int], after: dict[str, int]) -> list[str]:
    return sorted(name for name, ident in before.items() if after.get(name) != ident)


def _is_infrastructure_fault(error: BaseException) -> str | None:
    """A failure caused by the machine, not the submission: a port in use, GPU memory taken by another process."""
    if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
        return f"port in use: {error}"
    if type(error).__name__ == "OutOfMemoryError" and "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            ours = torch.cuda.memory_reserved()
            others = total - free - ours
            if others > total // 4:
                return f"CUDA out of memory while other processes held {others / 2**30:.1f} GiB of the GPU"
    return None


class GraderReporter:
    """Collects outcomes per test and writes them to the grader's channel."""

    def __init__(self, send: Callable[[dict[str, Any]], None]) -> None:
        self._send = send
        self._completed: set[str] = set()
        self._failures: dict[str, tuple[str, str | None]] = {}
        self._before = _fingerprint()
        self._tampered: list[str] = []

    # ------------------------------------------------------------------ helpers
    def _check_integrity(self, when: str) -> None:
        if self._tampered:
            return
        changed = _changed(self._before, _fingerprint())
        if changed:
            self._tampered = changed
            self._send({"kind": "tampered", "when": when, "changed": changed[:20]})

    def _wrap(self, nodeid: str, function: Callable[..., Any]) -> Callable[..., Any]:
        completed = self._completed

        def run_test_function(*args: Any, **kwargs: Any) -> Any:
            result = function(*args, **kwargs)
            completed.add(nodeid)
            return result

        run_test_function.__wrapped__ = function  # type: ignore[attr-defined]
        return run_test_function

    # ------------------------------------------------------------------ hooks
    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            if isinstance(item, pytest.Function):
                item.obj = self._wrap(item.nodeid, item.obj)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self._send({"kind": "collected", "nodeids": [item.nodeid for item in session.items]})
        self._check_integrity("collection")

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self._send(
                {
                    "kind": "collect_error",
                    "path": report.nodeid,
                    "message": str(report.longrepr)[-MESSAGE_CHARS:],
                }
            )

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self._send({"kind": "start", "nodeid": nodeid})

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
        outcome = yield
        report = outcome.get_result()
        if report.failed and item.nodeid not in self._failures:
            error = call.excinfo.value if call.excinfo else None
            text = f"{type(error).__name__}: {error}" if error is not None else str(report.longrepr)
            infra = _is_infrastructure_fault(error) if error is not None else None
            where = "" if call.when == "call" else f" (in test {call.when})"
            self._failures[item.nodeid] = (text[:MESSAGE_CHARS] + where, infra)

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        self._check_integrity(f"after {nodeid}")
        failure = self._failures.get(nodeid)
        if self._tampered:
            passed, message, infra = (
                False,
                f"the submission modified the test environment: {', '.join(self._tampered[:3])}",
                None,
            )
        elif failure:
            passed, (message, infra) = False, failure
        elif nodeid in self._completed:
            passed, message, infra = True, "", None
        else:
            passed, message, infra = (
                False,
                "the test function did not run to its end (skipped or interrupted)",
                None,
            )
        self._send({"kind": "result", "nodeid": nodeid, "passed": passed, "message": message, "infra": infra})

    def pytest_sessionfinish(self, exitstatus: int) -> None:
        self._send({"kind": "finished", "exitstatus": int(exitstatus)})


def _limit_gpu_memory() -> None:
    budget = os.environ.get(GPU_MEMORY_ENV)
    if not budget:
        return
    import torch

    for index in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, int(budget) / total), index)


def pytest_configure(config: pytest.Config) -> None:
    result_fd, token_fd = os.environ.get(RESULT_FD_ENV), os.environ.get(TOKEN_FD_ENV)
    if result_fd is None or token_fd is None:
        raise pytest.UsageError("common.grading.plugin runs only inside the grader's sandbox")
    token = os.read(int(token_fd), 4096).decode()
    os.close(int(token_fd))
    write, dumps, fd = (
        os.write,
        json.dumps,
        int(result_fd),
    )  # bound now, before any student code can patch them

    def send(message: dict[str, Any]) -> None:
        write(fd, (dumps({**message, "token": token, "time": time.time()}) + "\n").encode())

    for module in ("torch.testing", "numpy.testing", "hypothesis"):  # fingerprint them before students run
        try:
            __import__(module)
        except ImportError:
            pass
    _limit_gpu_memory()
    config.pluginmanager.register(GraderReporter(send), "effdl-grader-reporter")
