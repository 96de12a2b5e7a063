"""The syllabus registry and the `effdl` command line: help everywhere, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from common import cli, slides, weeks
from common.weeks import ALL_WEEKS, SYLLABUS, UnknownWeekError, Week, get_week

SUBCOMMANDS = [
    ["env"], ["seminar"], ["slides"], ["check"], ["bench"], ["bench", "timers"], ["test"],
    ["grade"], ["selftest"], ["release"], ["bench", "kernels"], ["bench", "pipelines"],
    ["bench", "allreduce"], ["bench", "ddp"], ["bench", "large-models"], ["bench", "quantization"],
    ["bench", "sharded-memory"], ["bench", "speculative"],
]  # fmt: skip


def run_effdl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "common.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("alias", ["week01_intro", "week01", "01", "1", "week01_intro/"])
def test_week_aliases(alias: str) -> None:
    assert get_week(alias).name == "week01_intro"


def test_unknown_week_lists_valid_weeks() -> None:
    with pytest.raises(UnknownWeekError) as error:
        get_week("week42_magic")
    for week in ALL_WEEKS:
        assert week.name in str(error.value)


def test_main_help_shows_commands_and_examples() -> None:
    result = run_effdl("--help")
    assert result.returncode == 0
    for command in ("env", "seminar", "slides", "check", "bench", "test", "examples:"):
        assert command in result.stdout


@pytest.mark.parametrize("args", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(args: list[str]) -> None:
    result = run_effdl(*args, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: effdl" in result.stdout


def test_grade_help_shows_an_example_session() -> None:
    result = run_effdl("grade", "--help")
    assert "effdl grade week03_fast_pipelines submissions/" in result.stdout
    assert "--jobs" in result.stdout and "--gpus" in result.stdout and "needs GPU runner" in result.stdout


def test_unknown_assignment_is_one_line_not_a_traceback() -> None:
    result = run_effdl("selftest", "week42_magic")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("effdl: error: 'week42_magic' matches no assignment; known assignments: ")
    assert "week03_fast_pipelines" in result.stderr and result.stderr.count("\n") == 1


def test_unknown_week_is_one_line_not_a_traceback() -> None:
    result = run_effdl("seminar", "week42_magic")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "unknown week 'week42_magic'; valid weeks: week01_intro" in result.stderr


def test_missing_marp_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(slides, "MARP", tmp_path / "no-marp")
    assert cli.main(["slides", "week01_intro", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("effdl: error: the Marp CLI is not installed: run `npm ci`")
    assert err.count("\n") == 1


def test_missing_python_package_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def needs_a_missing_package(args) -> int:
        raise ModuleNotFoundError("No module named 'nbclient.exceptions'", name="nbclient.exceptions")

    monkeypatch.setattr(cli, "cmd_env", needs_a_missing_package)
    assert cli.main(["env"]) == 2
    err = capsys.readouterr().err
    assert "'nbclient.exceptions' is missing; run `uv sync`" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("module", ["common.no_such_module", "effdl_package_that_does_not_exist"])
def test_an_import_bug_is_not_reported_as_a_missing_package(
    module: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def imports_a_module_that_does_not_exist(args) -> int:
        __import__(module)
        return 0

    monkeypatch.setattr(cli, "cmd_env", imports_a_module_that_does_not_exist)
    with pytest.raises(ModuleNotFoundError, match=module):
        cli.main(["env"])
    assert "uv sync" not in capsys.readouterr().err


def test_course_packages_are_the_dependencies_of_the_environment() -> None:
    import re
    import tomllib

    from common.weeks import REPO_ROOT

    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    distributions = {re.match(r"[A-Za-z0-9_.-]+", d).group().lower() for d in dependencies}
    import_names = {  # where the names differ
        "pillow": "PIL", "pytest-xdist": "xdist", "hydra-core": "hydra",
        "grpcio": "grpc", "grpcio-tools": "grpc_tools", "grpcio-health-checking": "grpc_health",
    }  # fmt: skip
    assert {import_names.get(d, d.replace("-", "_")) for d in distributions} == cli.COURSE_PACKAGES


def test_record_refuses_a_small_run(capsys) -> None:
    assert cli.main(["seminar", "week01_intro", "--small", "--record"]) == 2
    assert "--full on a GPU" in capsys.readouterr().err


def test_a_planned_week_says_so_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path, capsys
) -> None:
    planned = Week(*SYLLABUS[-1], root=tmp_path)  # in the syllabus, no seminar written
    monkeypatch.setattr(weeks, "ALL_WEEKS", (planned,))
    assert cli.main(["seminar", planned.name[:6]]) == 2
    out, err = capsys.readouterr()
    assert "Running" not in out
    assert planned.name in err and "has no seminar yet: it is planned, not written" in err


def test_unknown_week_lists_written_weeks_apart_from_planned_ones(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    course = tuple(Week(name, title, root=tmp_path) for name, title in SYLLABUS[:3])
    monkeypatch.setattr(weeks, "ALL_WEEKS", course)
    for week in course:
        week.dir.mkdir()
    with pytest.raises(UnknownWeekError) as error:
        get_week("week42_magic")
    assert "planned" not in str(error.value), "every week has its folder: none is planned"
    course[2].dir.rmdir()  # a week in progress has a folder (code, a README) and counts as written
    with pytest.raises(UnknownWeekError) as error:
        get_week("week42_magic")
    written, planned = str(error.value).split(" (planned, not written yet: ")
    assert written.endswith(f"valid weeks: {course[0].name}, {course[1].name}")
    assert planned == f"{course[2].name})"


def test_key_results_are_flagged_on_a_busy_machine_or_full_sizes_on_a_cpu(
    monkeypatch: pytest.MonkeyPatch, capsys, tmp_path
) -> None:
    import types

    import torch

    from common import notebooks

    fake_run = types.SimpleNamespace(path=tmp_path / "run.ipynb", duration_s=1.0, summary="speedup: 2.0x")
    monkeypatch.setattr(notebooks, "execute", lambda *args, **kwargs: fake_run)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cli, "machine_load", lambda: 4.0 * (os.cpu_count() or 1))
    assert cli.main(["seminar", "week01_intro", "--full", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    warning = out.index("warning: full sizes on a CPU")
    assert warning < out.index("Running week01_intro")
    results = out.index("speedup: 2.0x")
    assert out.index("note: full sizes on a CPU") > results
    assert out.index("note: the machine was busy (load average") > results


def test_full_sizes_on_a_cpu_are_no_warning_for_a_week_meant_for_a_cpu(
    monkeypatch: pytest.MonkeyPatch, capsys, tmp_path
) -> None:
    """Week 4's full size is 4 gloo ranks on a CPU: a real run, so no warning, --record is allowed, and the
    load its own ranks leave behind is not taken for other work."""
    import types

    import torch

    from common import notebooks

    fake_run = types.SimpleNamespace(path=tmp_path / "run.ipynb", duration_s=1.0, summary="ranks: 4")
    recorded = []
    monkeypatch.setattr(notebooks, "execute", lambda week, **kwargs: fake_run)
    monkeypatch.setattr(notebooks, "record", lambda run: recorded.append(run) or tmp_path / "seminar.ipynb")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loads = iter([0.0, 4.0 * (os.cpu_count() or 1)])  # idle before; after, the load of the run's own ranks
    monkeypatch.setattr(cli, "machine_load", lambda: next(loads))
    monkeypatch.setattr(cli, "REPO_ROOT", tmp_path)
    assert cli.main(["seminar", "week04", "--full", "--record", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and "note:" not in out and recorded == [fake_run]
    assert cli.main(["seminar", "week04", "--small", "--record"]) == 2
    assert "use it with --full on a CPU or a GPU" in capsys.readouterr().err


def test_env_reports_versions() -> None:
    result = run_effdl("env")
    assert result.returncode == 0, result.stderr
    for name in ("torch", "triton", "numpy", "GPU", "marp"):
        assert name in result.stdout


def test_test_command_runs_tests_and_every_seminar_under_nbval() -> None:
    command = cli.test_command(["-k", "bench"])
    assert command[1:3] == ["-m", "pytest"]
    assert "--nbval-lax" in command and "tests" in command
    for week in ALL_WEEKS:
        if week.has_seminar:
            assert f"{week.name}/seminar.ipynb" in command
    assert command[-2:] == ["-k", "bench"]


def test_test_subcommand_passes_pytest_options_through(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    monkeypatch.setattr(cli, "cmd_test", lambda args: seen.setdefault("args", args.pytest_args) and 0)
    cli.main(["test", "-x", "-k", "bench", "tests/test_weeks_and_cli.py"])
    assert seen["args"] == ["-x", "-k", "bench", "tests/test_weeks_and_cli.py"]


def test_other_subcommands_refuse_unknown_options() -> None:
    result = run_effdl("slides", "--no-such-option")
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-option" in result.stderr


# ---------------------------------------------------------------------------------------------------
# effdl check: the command calls common.check; the checks and their table are tested without running them
# ---------------------------------------------------------------------------------------------------


def test_check_command_calls_the_course_check(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from common import check

    seen = []
    monkeypatch.setattr(check, "check_course", lambda out_dir: seen.append(out_dir) or 1)
    assert cli.main(["check", "--out", str(tmp_path)]) == 1
    assert cli.main(["check"]) == 1
    assert seen == [tmp_path, None]


def test_check_covers_every_seminar_deck_and_grader(tmp_path) -> None:
    from common.check import course_checks
    from common.grading.manifest import assignment_names, find_assignment
    from common.weeks import weeks_with_seminar, weeks_with_slides

    names: dict[str, list[str]] = {}
    for check in course_checks(tmp_path):
        names.setdefault(check.kind, []).append(check.name)
    assert names["seminar (small)"] == [week.name for week in weeks_with_seminar()]
    assert names["slides"] == [week.name for week in weeks_with_slides()]
    # Every grader here; none in the student repository, which has no hidden tests to run.
    graders = [name for name in assignment_names() if find_assignment(name).has_hidden_tests]
    assert names.get("grader self-test", []) == graders


def test_check_table_shows_each_result_and_the_exit_status(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import io

    from rich.console import Console

    from common import check
    from common.errors import EffdlError

    def broken_deck() -> str:
        raise EffdlError("the deck has 3 slides, expected 4")

    passing = check.Check("week01_intro", "slides", lambda: "12 slides")
    failing = check.Check("week03_fast_pipelines", "slides", broken_deck)
    for checks, status in (([passing], 0), ([passing, failing], 1)):
        out = io.StringIO()
        monkeypatch.setattr(check, "course_checks", lambda out_dir, checks=checks: checks)
        assert check.check_course(tmp_path, Console(file=out, width=200)) == status
    table = out.getvalue()
    assert "effdl check (2 checks; outputs in" in table
    assert "12 slides" in table and "FAILED" in table and "expected 4" in table


def test_check_piped_at_80_columns_logs_progress_wraps_and_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Piped (no terminal: no spinner) and 80 columns wide: a line per finished check, long paths and
    messages wrapped rather than cut, student-looking markup printed as text, the scratch folder removed."""
    import io

    from rich.console import Console

    from common import check
    from common.errors import EffdlError

    long_path = "/a/very/long/path/to/the/outputs/of/a/course/check/week03_fast_pipelines_seminar.ipynb"
    scratch = []

    def failing() -> str:
        raise EffdlError("[bold]cell 7[/bold] failed: " + long_path)

    def checks(out_dir):
        scratch.append(out_dir)
        assert out_dir.is_dir()
        return [check.Check("week01_intro", "seminar (small)", lambda: long_path),
                check.Check("week03_fast_pipelines", "slides", failing)]  # fmt: skip

    monkeypatch.setattr(check, "course_checks", checks)
    out = io.StringIO()
    assert check.check_course(None, Console(file=out, width=80)) == 1
    text = out.getvalue()
    assert "[1/2] week01_intro, seminar (small): ok" in text
    assert "[2/2] week03_fast_pipelines, slides: FAILED" in text
    assert "…" not in text
    unwrapped = "".join(line.strip(" │┃|") for line in text.splitlines())
    assert long_path.replace("/", "") in unwrapped.replace("/", "").replace(" ", "")
    assert "[bold]cell 7[/bold]" in text
    assert "outputs removed; keep them with --out DIR" in text
    assert not scratch[0].exists()


def test_selftest_summary_says_what_was_proven_or_what_is_wrong() -> None:
    from common.grading.selftest import SelftestFailedError, Verdict, summary

    # summary() reads only each verdict's variant and problems, not the graded result.
    proven = [Verdict(name, "", result=None) for name in ("reference", "starter", "no_scale", "off_by_one")]  # type: ignore[arg-type]
    assert summary(proven) == "reference full, starter 0, 2 mutants caught"
    wrong = Verdict("no_causal_mask", "loses points on causal", None, ["not caught by causal (3/3)"])  # type: ignore[arg-type]
    with pytest.raises(SelftestFailedError, match=r"^no_causal_mask: not caught by causal \(3/3\)$"):
        summary([*proven, wrong])
