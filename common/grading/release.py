"""`effdl release`: the student repository, built from the instructors' one and checked before it ships.

The release is every file of the course that git tracks (or would track), except each assignment's
`tests/hidden/` and `mutants/` and the repository tests that need them (INSTRUCTOR_TESTS), with every
solution block in `assignments/*/src/` replaced by its `NotImplementedError` stub (or by its starter text, in a
bug hunt, without the block's hint) and every instructors-only
block of a Markdown file dropped (the README's TA and instructor sections), so that the student README and
the release's own test suite hold there. It starts a fresh git history, so nothing of the instructors'
commits travels. Then it checks its own output: no solution marker and no run of three lines from a
solution survives, nothing withheld is present, and every public test fails with `NotImplementedError`
(never with an import error).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from common.errors import EffdlError
from common.grading.manifest import assignment_names, load_assignment, require_hidden_tests
from common.grading.public import run_public_tests, starter_problems
from common.grading.solutions import SOLUTION_SUFFIXES, find_blocks, has_markers, starter_source
from common.weeks import REPO_ROOT


class ReleaseError(EffdlError):
    """The release could not be built, or failed one of its own checks."""


@dataclass
class ReleaseReport:
    out_dir: Path
    files: int
    stubs: int
    # assignment -> public tests failing as they must
    public_tests: dict[str, int] = field(default_factory=dict)
    # assignment -> what they fail with (NotImplementedError from stubs, AssertionError in a bug hunt)
    public_failures: dict[str, str] = field(default_factory=dict)


# The repository's own tests that need what the release leaves out (hidden tests, mutants, the reference):
# the graders' self-tests, the checks of the release itself, and the test of week 9's W8A8 benchmark script
# (it runs the reference GEMM). The rest is the student repository's suite.
INSTRUCTOR_TESTS = frozenset(
    {"tests/test_assignments.py", "tests/test_release.py", "tests/test_inference_w8a8_benchmark.py"}
)

# Markdown between these lines (each alone on its line) is for TAs and instructors: the release drops it.
BEGIN_INSTRUCTORS = "<!-- BEGIN INSTRUCTORS ONLY -->"
END_INSTRUCTORS = "<!-- END INSTRUCTORS ONLY -->"


def _withheld(path: PurePosixPath) -> bool:
    """Whether a course file stays in the instructor repository: a grader, a mutant, a test that needs them."""
    if str(path) in INSTRUCTOR_TESTS:
        return True
    parts = path.parts
    if len(parts) < 3 or parts[0] != "assignments":
        return False
    return parts[2] == "mutants" or parts[2:4] == ("tests", "hidden")


def _is_solution_source(path: PurePosixPath) -> bool:
    return (
        len(path.parts) > 3
        and path.parts[0] == "assignments"
        and path.parts[2] == "src"
        and path.suffix in SOLUTION_SUFFIXES
    )


def course_files(root: Path) -> list[PurePosixPath]:
    """Files git tracks or would track (not ignored) in the course repository."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=root, capture_output=True, check=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as error:
        raise ReleaseError(f"{root} must be a git checkout of the course to release it ({error})") from None
    return sorted(
        {PurePosixPath(p) for p in listing.stdout.decode().split("\0") if p and (root / p).is_file()}
    )


def student_markdown(text: str, where: str) -> str:
    """A Markdown file as students get it: each instructors-only block dropped with its marker lines, and
    with it one blank line of the two around it. Unpaired markers raise ReleaseError naming the line."""
    out: list[str] = []
    opened = 0  # the line number of the open block's BEGIN marker; 0 outside a block
    after_block = False
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        stripped = line.strip()
        if stripped == BEGIN_INSTRUCTORS:
            if opened:
                raise ReleaseError(
                    f"{where}:{number}: {BEGIN_INSTRUCTORS} inside the block opened at line {opened}"
                )
            opened = number
        elif stripped == END_INSTRUCTORS:
            if not opened:
                raise ReleaseError(
                    f"{where}:{number}: {END_INSTRUCTORS} without a {BEGIN_INSTRUCTORS} before it"
                )
            opened, after_block = 0, not out or not out[-1].strip()
        elif not opened:
            if stripped or not after_block:
                out.append(line)
            after_block = False
    if opened:
        raise ReleaseError(f"{where}:{opened}: {BEGIN_INSTRUCTORS} is never closed by {END_INSTRUCTORS}")
    return "".join(out)


WINDOW = 3  # consecutive lines: one line (`return total`) can recur by chance, three in a row from a solution do not


def _windows(text: str, size: int) -> set[tuple[str, ...]]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return {tuple(lines[i : i + size]) for i in range(len(lines) - size + 1)}


def _solution_windows(root: Path, files: list[PurePosixPath]) -> dict[tuple[str, ...], str]:
    """Runs of WINDOW non-blank lines inside solution blocks (the whole block if it is shorter), with origins.

    One-line blocks are left out: a single line is too likely to recur elsewhere by chance. A block that ships
    starter text leaves out the runs the starter has too (a bug fix keeps most of the lines around it)."""
    windows: dict[tuple[str, ...], str] = {}
    for path in filter(_is_solution_source, files):
        text = (root / path).read_text()
        for block in find_blocks(text, str(path)):
            body = "\n".join(block.body)
            size = min(WINDOW, sum(1 for line in block.body if line.strip()))
            shipped = _windows("\n".join(block.starter or ()), size)
            for window in _windows(body, size) - shipped if size >= 2 else ():
                windows.setdefault(window, f"{path}:{block.begin_line}")
    return windows


def build_release(out_dir: Path, root: Path = REPO_ROOT, check: bool = True) -> ReleaseReport:
    """Write the student repository to `out_dir` (which must be new or empty) and check it."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ReleaseError(f"{out_dir} exists and is not empty; give --out a new folder")
    for name in assignment_names(root / "assignments"):  # a student repository has no grader to withhold
        require_hidden_tests(load_assignment(root / "assignments" / name), "effdl release")
    files = course_files(root)
    released = [path for path in files if not _withheld(path)]
    stubs = 0
    for path in released:
        (out_dir / path).parent.mkdir(parents=True, exist_ok=True)
        stubs += _write_released(root / path, out_dir / path, path)
    _fresh_history(out_dir)
    report = ReleaseReport(out_dir, len(released), stubs)
    if check:
        check_release(out_dir, _solution_windows(root, files), report)
    return report


def _write_released(source: Path, target: Path, path: PurePosixPath) -> int:
    """Write one course file as students get it; return how many solution blocks it stubbed."""
    if _is_solution_source(path):
        text = source.read_text()
        target.write_text(starter_source(text, str(path)))
        blocks = len(find_blocks(text, str(path)))
    elif path.suffix == ".md":
        target.write_text(student_markdown(source.read_text(), str(path)))
        blocks = 0
    else:
        shutil.copy2(source, target)
        return 0
    shutil.copymode(source, target)
    return blocks


def _fresh_history(out_dir: Path) -> None:
    if shutil.which("git") is None:
        return
    author = ["-c", "user.name=Efficient Deep Learning Systems", "-c", "user.email=course@example.invalid"]
    for args in (
        ["init", "-q", "-b", "main"],
        ["add", "-A"],
        [*author, "commit", "-q", "-m", "Course release"],
    ):
        subprocess.run(["git", *args], cwd=out_dir, check=True, capture_output=True)


def check_release(out_dir: Path, solution_windows: dict[tuple[str, ...], str], report: ReleaseReport) -> None:
    """Raise ReleaseError unless the tree is safe to give to students and its starter fails as it should."""
    problems = []
    for path in sorted(
        p for p in out_dir.rglob("*") if p.is_file() and ".git" not in p.relative_to(out_dir).parts
    ):
        relative = PurePosixPath(path.relative_to(out_dir).as_posix())
        if _withheld(relative):
            problems.append(f"{relative}: for instructors only (a grader, a mutant or their tests)")
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        if _is_solution_source(relative) and has_markers(text):
            problems.append(f"{relative}: a solution marker survived")
        sizes = {len(w) for w in solution_windows}
        found = set().union(*(_windows(text, size) for size in sizes)) if sizes else set()
        leaked = sorted({solution_windows[w] for w in found & solution_windows.keys()})
        problems += [f"{relative}: contains solution code from {origin}" for origin in leaked[:3]]
    if problems:
        raise ReleaseError("the release is not safe to publish:\n  " + "\n  ".join(problems[:20]))
    for public in sorted(out_dir.glob("assignments/*/tests/public")):
        name = public.parent.parent.name
        report.public_tests[name] = _check_public_tests(public.parent.parent)
        report.public_failures[name] = load_assignment(public.parent.parent).starter_failure


def _check_public_tests(assignment_dir: Path) -> int:
    """Run the released public tests; each must fail as the starter's tests must (`NotImplementedError` for
    stubs, `AssertionError` for a bug hunt's starter). Returns how many there are."""
    cases = run_public_tests(assignment_dir)
    if not cases:
        raise ReleaseError(
            f"{assignment_dir.name}: no public tests were collected (or they did not run at all)"
        )
    failure = load_assignment(assignment_dir).starter_failure
    problems = starter_problems(cases, failure)
    if problems:
        raise ReleaseError(
            f"{assignment_dir.name}: released public tests must fail only with {failure}:\n  "
            + "\n  ".join(problems[:10])
        )
    return len(cases)
