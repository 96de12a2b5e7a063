"""The student repository that `effdl release` builds from this one, checked where students get it.

The release is built once per test run. Its whole test command takes as long as this repository's, more
than CI can spend twice, so CI checks here what can break only in the release (instructors run the whole
command in the release before publishing it; README, "For instructors"):

- nothing of the instructors' is left: hidden tests, mutants, solution code, the tests that need them, history;
- every test file it ships imports, and no public test is among them: its own test command, collected;
- its READMEs have no TA or instructor section; the `effdl` commands of its README exist there and none needs
  the graders; the repository tests of the README (tests/test_repo.py: quickstart, CI command, links) pass;
- each assignment's public tests, run as the README says, fail with `NotImplementedError` and nothing else;
- its CI's lint (`ruff check .`) passes on the stubbed sources;
- the commands that need the graders answer in one line that they are for the instructor repository.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.grading.manifest import assignment_names, load_assignment
from common.grading.public import read_junit, starter_problems
from common.grading.release import (
    BEGIN_INSTRUCTORS,
    END_INSTRUCTORS,
    INSTRUCTOR_TESTS,
    ReleaseError,
    ReleaseReport,
    build_release,
)
from common.weeks import REPO_ROOT

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="the release runs its public tests in the grader's fork server",
)
ASSIGNMENTS = assignment_names()
INSTRUCTOR_COMMANDS = ("selftest", "grade", "release")  # they need the graders, which the release leaves out
# `effdl test`'s pytest command with extra arguments, without its setup of the slide tool (an `npm ci`).
RUN_TEST_COMMAND = (
    "import subprocess, sys\n"
    "from common.cli import test_command\n"
    "sys.exit(subprocess.call(test_command(sys.argv[1:])))"
)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> ReleaseReport:
    """The student repository, built once (`--dist loadfile` keeps this file's tests on one worker). Every test
    that uses it is marked `slow`: the first one waits for the build."""
    return build_release(tmp_path_factory.mktemp("release") / "student")


def run_in(release: ReleaseReport, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    """`python ARGS` in the release, importing the release's `common` rather than this repository's."""
    env = {**os.environ, "PYTHONPATH": str(release.out_dir)}
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(
        [sys.executable, *args],
        cwd=release.out_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_the_files_the_release_withholds_exist() -> None:
    missing = sorted(path for path in INSTRUCTOR_TESTS if not (REPO_ROOT / path).is_file())
    assert not missing, f"release.py withholds {missing}, which do not exist: update INSTRUCTOR_TESTS"


@pytest.mark.slow
def test_release_is_safe_and_its_public_tests_fail_with_not_implemented(release: ReleaseReport) -> None:
    out = release.out_dir
    assert release.stubs > 0 and set(release.public_tests) == set(ASSIGNMENTS)
    assert all(count > 0 for count in release.public_tests.values())
    for name in ASSIGNMENTS:
        assert not (out / "assignments" / name / "tests" / "hidden").exists()
        assert not (out / "assignments" / name / "mutants").exists()
        assert (out / "assignments" / name / "tests" / "public").is_dir()
        hidden_names = {
            p.name for p in (REPO_ROOT / "assignments" / name / "tests" / "hidden").glob("test_*.py")
        }
        assert not any(p.name in hidden_names for p in out.rglob("*.py"))
    assert not [path for path in INSTRUCTOR_TESTS if (out / path).exists()]
    leftover = [p for p in out.glob("assignments/*/src/**/*.py") if "BEGIN SOLUTION" in p.read_text()]
    assert leftover == []
    log = subprocess.run(
        ["git", "log", "--oneline"], cwd=out, capture_output=True, text=True, check=True
    ).stdout
    assert len(log.splitlines()) == 1, "the release starts a fresh history"
    assert (out / "common" / "grading" / "harness.py").is_file() and (out / "README.md").is_file()


def test_release_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("students' work")
    with pytest.raises(ReleaseError, match="exists and is not empty"):
        build_release(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "students' work"


@pytest.mark.slow
def test_every_test_file_the_release_ships_imports(release: ReleaseReport) -> None:
    """The release's own test command (`effdl test`), collected: every test module imports, every notebook
    parses. Running it takes as long as this repository's suite."""
    result = run_in(release, "-c", RUN_TEST_COMMAND, "--collect-only", "-q", "-n", "0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shipped = sorted(path.relative_to(release.out_dir) for path in release.out_dir.glob("tests/test_*.py"))
    assert shipped, "the release ships no tests"
    assert not [path for path in shipped if f"{path.as_posix()}::" not in result.stdout]
    # The public tests fail there by design: students run them per assignment, the suite leaves them out.
    assert "assignments/" not in result.stdout, "the release's test command collects public tests"


@pytest.mark.slow
@pytest.mark.parametrize("readme", ["README.md", "assignments/README.md"])
def test_the_release_readmes_have_no_ta_or_instructor_sections(release: ReleaseReport, readme: str) -> None:
    text = (release.out_dir / readme).read_text()
    headings = re.findall(r"^#+ (.+)$", text, re.MULTILINE)
    assert not [h for h in headings if re.search(r"\bTAs?\b|instructor", h, re.IGNORECASE)], headings
    assert BEGIN_INSTRUCTORS not in text and END_INSTRUCTORS not in text
    assert "NotImplementedError" in text, "the students' part says how the public tests fail at first"


@pytest.mark.slow
def test_the_student_readme_shows_only_effdl_commands_that_work_in_the_release(
    release: ReleaseReport,
) -> None:
    text = (release.out_dir / "README.md").read_text()
    assert {"Quickstart", "Syllabus", "For students"} <= set(re.findall(r"^## (.+)$", text, re.MULTILINE))
    commands = sorted(set(re.findall(r"\beffdl ([a-z]+)", text)))
    assert {"seminar", "test", "env"} <= set(commands), commands
    assert not set(commands) & set(INSTRUCTOR_COMMANDS), f"{commands} need the graders, not released"
    for command in commands:
        result = run_in(release, "-m", "common", command, "--help")
        assert result.returncode == 0 and "usage: effdl" in result.stdout, (command, result.stderr)


@pytest.mark.slow
def test_the_readme_promises_hold_in_the_release(release: ReleaseReport) -> None:
    """tests/test_repo.py in the release: quickstart of two commands, CI runs the test command, links exist."""
    result = run_in(release, "-m", "pytest", "tests/test_repo.py", "-q", "-p", "no:cacheprovider")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_the_release_passes_the_lint_of_its_ci(release: ReleaseReport) -> None:
    """.ci/run lints before it tests; the stubs must not leave, say, the solution's imports flagged."""
    result = run_in(release, "-m", "ruff", "check", ".", "--no-cache")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_public_tests_run_as_students_do_fail_as_the_starter_must(
    release: ReleaseReport, name: str, tmp_path: Path
) -> None:
    """The students' command from the repository root (README, "For students"), with the release's config:
    `NotImplementedError` from the stubs, or, in a bug hunt, `AssertionError` from the planted bugs."""
    junit = tmp_path / "public.xml"
    public = f"assignments/{name}/tests/public"
    result = run_in(release, "-m", "pytest", public, "-p", "no:cacheprovider", f"--junitxml={junit}")
    cases = read_junit(junit)
    assert result.returncode == 1 and cases, result.stdout[-3000:] + result.stderr[-3000:]
    failure = load_assignment(release.out_dir / "assignments" / name).starter_failure
    assert starter_problems(cases, failure) == []


@pytest.mark.slow
@pytest.mark.parametrize("command", INSTRUCTOR_COMMANDS)
def test_instructor_commands_say_in_one_line_that_they_need_the_instructor_repository(
    release: ReleaseReport, command: str, tmp_path: Path
) -> None:
    args = {
        "selftest": [ASSIGNMENTS[0]],
        "grade": [ASSIGNMENTS[0], str(tmp_path), "--out", str(tmp_path / "grades")],
        "release": ["--out", str(tmp_path / "again")],
    }[command]
    result = run_in(release, "-m", "common", command, *args)
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"effdl: error: `effdl {command}` is for the instructor repository: ")
    assert not (tmp_path / "again").exists()
