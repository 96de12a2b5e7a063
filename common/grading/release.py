"""`effdl release`: the student repository, built from the instructors' one and checked before it ships.

The release is every file of the course that git tracks (or would track), except each assignment's
`tests/hidden/` and `mutants/`, with every solution block in `assignments/*/src/` replaced by its
`NotImplementedError` stub. It starts a fresh git history, so nothing of the instructors' commits travels.
Then it checks its own output: no solution marker and no run of three lines from a solution survives, no
hidden test is present, and every public test fails with `NotImplementedError` (never with an import error).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from common.errors import EffdlError
from common.grading.public import run_public_tests, starter_problems
from common.grading.solutions import find_blocks, has_markers, starter_source
from common.weeks import REPO_ROOT


class ReleaseError(EffdlError):
    """The release could not be built, or failed one of its own checks."""


@dataclass
class ReleaseReport:
    out_dir: Path
    files: int
    stubs: int
    public_tests: dict[str, int] = field(
        default_factory=dict
    )  # assignment -> public tests failing as they must


def _withheld(path: PurePosixPath) -> bool:
    parts = path.parts
    if len(parts) < 3 or parts[0] != "assignments":
        return False
    return parts[2] == "mutants" or parts[2:4] == ("tests", "hidden")


def _is_solution_source(path: PurePosixPath) -> bool:
    return (
        len(path.parts) > 3
        and path.parts[0] == "assignments"
        and path.parts[2] == "src"
        and path.suffix == ".py"
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


WINDOW = 3  # consecutive lines: one line (`return total`) can recur by chance, three in a row from a solution do not


def _windows(text: str, size: int) -> set[tuple[str, ...]]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return {tuple(lines[i : i + size]) for i in range(len(lines) - size + 1)}


def _solution_windows(root: Path, files: list[PurePosixPath]) -> dict[tuple[str, ...], str]:
    """Runs of WINDOW non-blank lines inside solution blocks (the whole block if it is shorter), with origins.

    One-line blocks are left out: a single line is too likely to recur elsewhere by chance."""
    windows: dict[tuple[str, ...], str] = {}
    for path in filter(_is_solution_source, files):
        text = (root / path).read_text()
        for block in find_blocks(text, str(path)):
            body = "\n".join(block.body)
            size = min(WINDOW, sum(1 for line in block.body if line.strip()))
            for window in _windows(body, size) if size >= 2 else ():
                windows.setdefault(window, f"{path}:{block.begin_line}")
    return windows


def build_release(out_dir: Path, root: Path = REPO_ROOT, check: bool = True) -> ReleaseReport:
    """Write the student repository to `out_dir` (which must be new or empty) and check it."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ReleaseError(f"{out_dir} exists and is not empty; give --out a new folder")
    files = course_files(root)
    stubs = 0
    for path in files:
        if _withheld(path):
            continue
        target = out_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if _is_solution_source(path):
            text = (root / path).read_text()
            stubs += len(find_blocks(text, str(path)))
            target.write_text(starter_source(text, str(path)))
            shutil.copymode(root / path, target)
        else:
            shutil.copy2(root / path, target)
    _fresh_history(out_dir)
    report = ReleaseReport(out_dir, sum(1 for p in files if not _withheld(p)), stubs)
    if check:
        check_release(out_dir, _solution_windows(root, files), report)
    return report


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
            problems.append(f"{relative}: hidden tests or mutants must not be released")
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
        report.public_tests[public.parent.parent.name] = _check_public_tests(public.parent.parent)


def _check_public_tests(assignment_dir: Path) -> int:
    """Run the released public tests; each must fail with NotImplementedError. Returns how many there are."""
    cases = run_public_tests(assignment_dir)
    if not cases:
        raise ReleaseError(
            f"{assignment_dir.name}: no public tests were collected (or they did not run at all)"
        )
    problems = starter_problems(cases)
    if problems:
        raise ReleaseError(
            f"{assignment_dir.name}: released public tests must fail only with NotImplementedError:\n  "
            + "\n  ".join(problems[:10])
        )
    return len(cases)
