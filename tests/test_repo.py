"""Repository-level promises: the README's commands, CI running them, local links, and a light repo."""

from __future__ import annotations

import re
import subprocess

import pytest

from common.weeks import ALL_WEEKS, IN_PROGRESS, REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()
MAX_FILE_BYTES = 5 * 2**20


def quickstart_commands() -> list[str]:
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_quickstart_is_exactly_two_commands() -> None:
    commands = quickstart_commands()
    assert len(commands) == 2
    assert all("\n" not in command for command in commands)
    assert "effdl seminar week01_intro" in commands[0] and "effdl test" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert f"'{quickstart_commands()[1]}'" in ci


def test_syllabus_lists_every_week() -> None:
    table = README.split("## Syllabus", 1)[1]
    for week in ALL_WEEKS:
        number = int(week.name[4:6])
        assert re.search(rf"^\| {number} \|", table, re.MULTILINE), week.name


@pytest.mark.parametrize(
    "markdown", sorted(REPO_ROOT.glob("*.md")) + sorted(REPO_ROOT.glob("week*/README.md"))
)
def test_local_links_exist(markdown) -> None:
    for target in re.findall(r"\]\(([^)#\s]+)", markdown.read_text()):
        if not re.match(r"^[a-z]+:", target):
            assert (markdown.parent / target).exists(), f"{markdown.name} links to missing {target}"


def test_weeks_have_the_same_shape() -> None:
    for week in ALL_WEEKS:
        if week.dir.exists():
            paths = (week.readme, week.seminar_py, week.seminar_ipynb, week.slides_md)
            if week.name in IN_PROGRESS:  # code first, seminar and slides later: a README says what is there
                paths = (week.readme,)
            for path in paths:
                assert path.is_file(), f"{week.name} is missing {path.relative_to(REPO_ROOT)}"


def test_weeks_in_progress_are_listed_only_until_they_are_complete() -> None:
    for name in IN_PROGRESS:
        week = next(week for week in ALL_WEEKS if week.name == name)
        assert not (week.has_seminar and week.has_slides), (
            f"{name} has its seminar and slides now: remove it from common.weeks.IN_PROGRESS"
        )


def test_no_tracked_file_is_over_5_mb() -> None:
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    for name in filter(None, tracked.stdout.split("\0")):
        path = REPO_ROOT / name
        if path.is_file():
            assert path.stat().st_size <= MAX_FILE_BYTES, f"{name} is over 5 MB"
