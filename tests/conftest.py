"""Shared pytest configuration for `gpu` tests.

- Where there is no CUDA GPU, `gpu` tests are skipped, so the CPU suite runs anywhere.
- `pytest -m gpu` is how a TA checks a GPU runner, so there "all skipped" would be a false green: a run that
  selects only GPU tests on a machine without one stops at once with one line saying so.
- Under xdist's `--dist loadfile` (as `effdl test` runs it) a file's tests stay on one worker, so that
  module-scoped fixtures are built once, except the grader self-tests (a minute or two each): they spread
  over the workers, instead of queueing on the worker that got their file, and they go out first. xdist
  would hand them out last (it orders files by their number of tests), and a worker takes up to three at a
  time: the run then ended on one worker's self-tests while the other had nothing left.
- Under xdist, each worker gets its share of the cores for torch's intra-op threads: by default every worker
  would take all of them, and on CI's two cores two workers of two threads each made tiny ops far slower.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

NO_GPU_REASON = "needs a CUDA GPU; run `pytest -m gpu` on a GPU runner"


def selects_only_gpu_tests(markexpr: str) -> bool:
    """Whether a `-m` expression keeps a test marked only `gpu` and drops a test with no marks."""
    if not markexpr or not re.fullmatch(r"[\w\s()]+", markexpr):
        return False  # no -m, or an expression with arguments: leave it to pytest

    def keeps(marks: set[str]) -> bool:
        python = re.sub(r"\b(?!and\b|or\b|not\b)(\w+)\b", lambda m: str(m.group(1) in marks), markexpr)
        return bool(eval(python, {"__builtins__": {}}))  # only True/False/and/or/not/parentheses remain

    return keeps({"gpu"}) and not keeps(set())


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: the controller has checked already
        workers = int(config.workerinput.get("workercount", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
        return
    if selects_only_gpu_tests(config.option.markexpr) and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"-m {config.option.markexpr!r} selects GPU tests, but torch {torch.__version__} sees no CUDA GPU "
            "on this machine (torch.cuda.is_available() is False): run it on a GPU runner"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason=NO_GPU_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


SPREAD_TESTS = ("tests/test_assignments.py::test_selftest_on_cpu[",)


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadfile`, but each test of SPREAD_TESTS is a unit of its own."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FilesWithSpreadTests(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return nodeid if nodeid.startswith(SPREAD_TESTS) else super()._split_scope(nodeid)

        spread_first = False  # the queue is built once, before its first unit goes out

        def _assign_work_unit(self, node) -> None:
            if not self.spread_first:
                spread = [scope for scope in self.workqueue if scope.startswith(SPREAD_TESTS)]
                for scope in reversed(spread):  # to the front of the queue, in collection order
                    self.workqueue.move_to_end(scope, last=False)
                self.spread_first = True
            super()._assign_work_unit(node)

    return FilesWithSpreadTests(config, log)


@pytest.fixture(scope="session")
def week07_model(tmp_path_factory: pytest.TempPathFactory, worker_id: str):
    """A tiny week-7 classifier, trained and exported once per test run and shared by the xdist workers
    (the first worker to get the lock trains it; the others wait and reuse the file)."""
    from filelock import FileLock

    from week07_application_deployment.train import TrainConfig, export, train

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # the run's folder, shared by its workers
    path = root / "week07_classifier.pt2"
    with FileLock(f"{path}.lock"):
        if not path.is_file():
            config = TrainConfig(channels=8, width=32, steps=40)
            model, stats = train(config)
            assert stats["held_out_accuracy"] >= 0.95, (
                f"the tiny test model did not learn the gratings: {stats}"
            )
            export(model, config, path, stats)
    return path
