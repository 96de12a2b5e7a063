"""Bug-hunt assignments: starter-text solution blocks, planting bugs back, and commands run in fresh sandboxes."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from common.grading.faults import CommandDidNotStartError
from common.grading.manifest import ManifestError, load_assignment
from common.grading.public import PublicCase, starter_problems
from common.grading.release import _solution_windows, _windows
from common.grading.solutions import (
    SolutionMarkerError,
    find_blocks,
    has_markers,
    inject_bugs,
    planted_bugs,
    reference_source,
    starter_source,
)
from common.grading.suites import IsolatedSettings, TreeError, run_isolated

BUGGY = '''\
import torch


def noisy(x0: torch.Tensor) -> torch.Tensor:
    """x0 plus standard normal noise."""
    # BEGIN SOLUTION: noise_distribution: uniform noise
    noise = torch.randn_like(x0)
    # STARTER
    # noise = torch.rand_like(x0)
    # END SOLUTION
    if x0.numel():
        # BEGIN SOLUTION: scale: the noise is halved in a loop
        scale = 1.0
        # STARTER
        # scale = 1.0
        # for _ in range(1):
        #     scale /= 2
        #
        # END SOLUTION
        noise = noise * scale
    return x0 + noise


def logged(x: int) -> int:
    # BEGIN SOLUTION: log_call: nothing is logged
    print(x)
    # STARTER
    # END SOLUTION
    return x


def stub(x: int) -> int:
    # BEGIN SOLUTION: stub: return x
    return x
    # END SOLUTION
'''


def test_a_starter_text_block_ships_its_starter_and_nothing_of_its_hint() -> None:
    starter = starter_source(BUGGY, "buggy.py")
    assert "noise = torch.rand_like(x0)" in starter and "randn_like" not in starter
    assert "        scale = 1.0\n        for _ in range(1):\n            scale /= 2\n\n" in starter
    assert "print(x)" not in starter and "def logged(x: int) -> int:\n    return x\n" in starter
    assert 'raise NotImplementedError("stub: return x")' in starter
    assert not has_markers(starter) and "uniform" not in starter and "halved" not in starter
    compile(starter, "buggy.py", "exec")


def test_the_reference_drops_the_starter_text_and_bugs_can_be_planted_back_one_at_a_time() -> None:
    reference = reference_source(BUGGY, "buggy.py")
    assert "randn_like" in reference and "rand_like(" not in reference and "scale /= 2" not in reference
    assert "print(x)" in reference and "STARTER" not in reference
    assert planted_bugs(BUGGY, "buggy.py") == ["noise_distribution", "scale", "log_call"]
    one = inject_bugs(BUGGY, "buggy.py", ["noise_distribution"])
    assert "noise = torch.rand_like(x0)" in one and "print(x)" in one and "scale /= 2" not in one
    assert "return x\n" in one.split("def stub")[1], "a stub block keeps the reference when bugs are planted"
    assert inject_bugs(BUGGY, "buggy.py", ["not_here"]) == reference, "a bug of another file changes nothing"
    assert [b.bug for b in find_blocks(BUGGY, "buggy.py")] == [
        "noise_distribution",
        "scale",
        "log_call",
        None,
    ]


@pytest.mark.parametrize(
    "source, where, message",
    [
        ("    # BEGIN SOLUTION: b: x\n    y = 1\n    # STARTER\n    y = 2\n    # END SOLUTION\n", "a.py",
         "a.py:4: a starter line must be a comment at the block's indentation"),
        ("# BEGIN SOLUTION: no id here\ny = 1\n# STARTER\n# y = 2\n# END SOLUTION\n", "a.py",
         "a.py:1: a block with starter text needs a bug id"),
        ("# BEGIN SOLUTION: b: x\ny = 1\n# STARTER\n# STARTER\n# END SOLUTION\n", "a.py", "a.py:4: a second STARTER"),
        ("# BEGIN SOLUTION: stages\nstages: {}\n# END SOLUTION\n", "dvc.yaml",
         "dvc.yaml:1: outside Python a block needs a `# STARTER` part"),
    ],
)  # fmt: skip
def test_broken_starter_blocks_are_reported_with_their_line(source: str, where: str, message: str) -> None:
    with pytest.raises(SolutionMarkerError, match=message.replace("(", r"\(")):
        starter_source(source, where)


def test_a_yaml_file_can_hold_a_starter_block() -> None:
    text = "# comment\n# BEGIN SOLUTION: pipeline: none\nstages:\n  a: {cmd: x}\n# STARTER\n# stages: {}\n# END SOLUTION\n"
    assert starter_source(text, "src/dvc.yaml") == "# comment\nstages: {}\n"
    assert reference_source(text, "src/dvc.yaml") == "# comment\nstages:\n  a: {cmd: x}\n"


def test_the_release_leak_check_ignores_lines_the_starter_ships_too(tmp_path: Path) -> None:
    path = tmp_path / "assignments" / "hunt" / "src" / "pkg" / "mod.py"
    path.parent.mkdir(parents=True)
    path.write_text(
        "def f(a, b):\n    # BEGIN SOLUTION: wrong_sign: subtracts\n    x = a + 1\n    y = b + 2\n    z = x + y\n"
        "    return z\n    # STARTER\n    # x = a + 1\n    # y = b + 2\n    # z = x - y\n    # return z\n"
        "    # END SOLUTION\n"
    )
    windows = _solution_windows(tmp_path, [Path("assignments/hunt/src/pkg/mod.py")])
    shipped = _windows(starter_source(path.read_text(), "mod.py"), 3)
    assert windows and not set(windows) & shipped
    assert ("y = b + 2", "z = x + y", "return z") in windows


def test_the_starter_kind_is_read_from_the_manifest(tmp_path: Path) -> None:
    from grading_toy import write_toy_assignment

    root = write_toy_assignment(tmp_path)
    assert load_assignment(root).starter_failure == "NotImplementedError"
    manifest = root / "assignment.toml"
    manifest.write_text(manifest.read_text().replace('package = "toy"', 'package = "toy"\nstarter = "bugs"'))
    assert load_assignment(root).starter_failure == "AssertionError"
    manifest.write_text(manifest.read_text().replace('starter = "bugs"', 'starter = "stubs and bugs"'))
    with pytest.raises(ManifestError, match="field `starter` must be one of"):
        load_assignment(root)


def test_a_buggy_starters_public_tests_must_fail_with_an_assertion() -> None:
    cases = [PublicCase("a", "failed", "AssertionError: Var[x_t] = 0.8"), PublicCase("b", "passed")]
    assert starter_problems(cases, "AssertionError") == ["b passed"]
    assert starter_problems(cases[:1]) == ["a fails with 'AssertionError: Var[x_t] = 0.8'"]


# ------------------------------------------------------------------------------------------ isolated runs
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the grading sandbox runs on Linux")


@pytest.fixture
def settings(tmp_path: Path) -> IsolatedSettings:
    return IsolatedSettings(workdir=tmp_path / "runs", cache=tmp_path / "cache")


@linux
def test_a_run_reports_its_exit_status_and_outbox_and_sees_only_its_tree(settings: IsolatedSettings) -> None:
    script = (
        "import os, sys; open(sys.argv[1] + '/seen.txt', 'w').write(open('/submission/src/pkg/data.txt').read()"
        " + ' ' + str(os.getuid())); sys.exit(3)"
    )
    run = run_isolated({"pkg/data.txt": b"chosen"}, [sys.executable, "-c", script, "{outbox}"], 60, settings)
    assert run.returncode == 3 and run.stopped == "" and run.files == {"seen.txt": b"chosen 65534"}
    again = run_isolated(
        {"pkg/data.txt": b"chosen"}, [sys.executable, "-c", script, "{outbox}"], 60, settings
    )
    assert again.cached and again.files == run.files and again.returncode == 3


@linux
def test_every_run_gets_a_fresh_sandbox(settings: IsolatedSettings) -> None:
    """What one run leaves in /tmp is gone in the next: a suite cannot tell its second run from its first."""
    script = "import os, sys; seen = os.path.exists('/tmp/marker'); open('/tmp/marker', 'w'); sys.exit(1 if seen else 0)"
    codes = [
        run_isolated({f"run{i}": b""}, [sys.executable, "-c", script], 60, settings).returncode
        for i in range(2)
    ]
    assert codes == [0, 0]


@linux
def test_a_run_past_its_time_limit_is_killed_with_its_processes(settings: IsolatedSettings) -> None:
    start = time.monotonic()
    run = run_isolated({"a": b""}, ["sh", "-c", "sleep 300 & sleep 300"], 2, settings)
    assert run.returncode is None and run.stopped == "time limit" and time.monotonic() - start < 30
    assert not list((settings.cache or Path()).glob("*.json")), "a run stopped at a limit is never cached"


@linux
def test_a_run_that_starts_too_many_processes_is_stopped(tmp_path: Path) -> None:
    settings = IsolatedSettings(workdir=tmp_path, max_processes=16)
    run = run_isolated({"a": b""}, ["sh", "-c", "for i in $(seq 60); do sleep 30 & done; wait"], 60, settings)
    assert run.stopped == "process limit" and run.returncode is None


def test_a_tree_path_outside_the_tree_is_refused(settings: IsolatedSettings) -> None:
    for path in ("../escape.py", "/etc/passwd", "a/../../b"):
        with pytest.raises(TreeError):
            run_isolated({path: b""}, ["true"], 10, settings)


@linux
def test_without_the_sandbox_a_run_works_in_its_own_folders(tmp_path: Path) -> None:
    """`effdl grade --no-sandbox`: the same placeholders name host folders, and the run starts in its own tmp."""
    settings = IsolatedSettings(workdir=tmp_path / "runs", sandboxed=False)
    script = "import os, sys; open(sys.argv[2] + '/where', 'w').write(os.getcwd() + ' ' + open(sys.argv[1] + '/a').read())"
    run = run_isolated({"a": b"tree"}, [sys.executable, "-c", script, "{src}", "{outbox}"], 60, settings)
    cwd, content = run.files["where"].decode().split()
    assert run.returncode == 0 and content == "tree" and cwd.startswith(str(tmp_path / "runs"))
    assert not list((tmp_path / "runs").iterdir()), "each run's folder is removed after it"


@linux
def test_a_command_that_cannot_start_is_the_machines_fault_and_never_cached(
    settings: IsolatedSettings,
) -> None:
    """The exec fails after the sandbox started: a failing run would be a test failure, which it is not."""
    with pytest.raises(CommandDidNotStartError, match="exec failed"):
        run_isolated({"a": b""}, ["/no/such/command"], 60, settings)
    assert not list((settings.cache or Path()).glob("*.json"))


@linux
def test_the_command_cannot_write_to_the_launchers_status_pipe(settings: IsolatedSettings) -> None:
    """A command that writes to every descriptor it might have cannot turn its run into a machine fault."""
    script = (
        "import os, resource\n"
        "for fd in range(3, 256):\n"
        "    try: os.write(fd, b'forged')\n"
        "    except OSError: pass\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    run = run_isolated({"a": b""}, [sys.executable, "-c", script], 60, settings)
    assert run.returncode == 0 and run.output.split()[-1] == str(settings.max_open_files)


@linux
def test_repeats_are_runs_of_their_own_and_a_cached_run_must_fit_the_time_left(
    settings: IsolatedSettings,
) -> None:
    script = "import os, sys; open(sys.argv[1] + '/nonce', 'w').write(os.urandom(8).hex())"
    argv = [sys.executable, "-c", script, "{outbox}"]
    first, second = (run_isolated({"a": b""}, argv, 60, settings, repeat=r) for r in (0, 1))
    assert not second.cached and first.files["nonce"] != second.files["nonce"]
    assert run_isolated({"a": b""}, argv, 60, settings, repeat=1).files == second.files
    # The caller has less time left than the cached run took: it runs again, within that time.
    short = run_isolated({"a": b""}, argv, 60, settings, repeat=1, budget_s=first.duration_s / 1000)
    assert not short.cached and short.stopped == "time limit"
