"""Hostile submissions, graded in one batch next to honest ones: each gets the score it deserves, the rest of
the batch is unaffected, and nothing is written outside the work trees.

The batch is graded once (module fixture, two jobs in parallel as a TA would) and each test checks one case.
"""

from __future__ import annotations

import json
import socket
import stat
import sys
import zipfile
from pathlib import Path

import pytest
from grading_toy import HIDDEN_ADD, HIDDEN_MUL, REFERENCE, write_toy_assignment

from common.grading.grade import grade
from common.grading.harness import GradingContext, grade_task
from common.grading.manifest import load_assignment
from common.grading.solutions import reference_source, starter_source

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the grading sandbox runs on Linux"
)

CORRECT_MUL = "\n\ndef mul(a, b):\n    return a * b\n"
WRONG_BOTH = "def add(a, b):\n    return a - b - 1\n\n\ndef mul(a, b):\n    return a + b + 1\n"


def _hostile_sources(root: Path, out_dir: Path) -> dict[str, tuple[str, dict[str, float]]]:
    """name -> (toy/ops.py source, the score each task must get)."""
    marker = root / "escaped"
    reference_file = root / "toy_assignment" / "src" / "toy" / "ops.py"
    return {
        "loops_forever": (
            "def add(a, b):\n    while True:\n        pass\n" + CORRECT_MUL,
            {"add": 0, "mul": 1},
        ),
        "allocates_without_bound": (
            "def add(a, b):\n    hog = []\n    while True:\n        hog.append(bytearray(2**30))\n"
            + CORRECT_MUL,
            {"add": 0, "mul": 1},
        ),
        "forks_repeatedly": (
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
            + WRONG_BOTH,
            {"add": 0, "mul": 0},
        ),
        "exits_at_import": ("import os\nos._exit(0)\n" + WRONG_BOTH, {"add": 0, "mul": 0}),
        "patches_pytest": (
            "import _pytest.python\n_pytest.python.Function.runtest = lambda self: None\n" + WRONG_BOTH,
            {"add": 0, "mul": 0},
        ),
        "fakes_results": (
            "import json, os\n"
            "fake = json.dumps({'score': 3, 'tests': []})\n"
            f"for target in ['results.json', '../results.json', '../../results.json', {str(out_dir / 'fakes_results' / 'results.json')!r},"
            f" {str(marker)!r}]:\n"
            "    try:\n        open(target, 'w').write(fake)\n    except OSError:\n        pass\n"
            "fd = int(os.environ.get('EFFDL_GRADER_RESULT_FD', '-1'))\n"
            "for test in ['test_mul_small_numbers', 'test_mul_by_zero_gives_zero']:\n"
            "    line = {'kind': 'result', 'nodeid': 'tests/hidden/test_mul.py::' + test, 'passed': True, 'token': 'guess'}\n"
            "    try:\n        os.write(fd, (json.dumps(line) + '\\n').encode())\n    except OSError:\n        pass\n"
            + WRONG_BOTH,
            {"add": 0, "mul": 0},
        ),
        "reads_hidden_tests": (
            "from pathlib import Path\n"
            "SOURCE = ''.join(p.read_text() for p in sorted(Path('tests/hidden').glob('*.py')))\n"
            "print(SOURCE)\n"
            "def add(a, b):\n    raise AssertionError(SOURCE)\n" + CORRECT_MUL,
            {"add": 0, "mul": 1},
        ),
        "leaks_hidden_tests_at_import": (
            "from pathlib import Path\n"
            "raise RuntimeError(''.join(p.read_text() for p in sorted(Path('tests/hidden').glob('*.py'))))\n",
            {"add": 0, "mul": 0},
        ),
        "reads_the_reference": (
            "import os\n"
            f"try:\n    exec(open({str(reference_file)!r}).read())\n"
            "except OSError:\n"
            "    def add(a, b):\n        return -1\n\n    def mul(a, b):\n        return -1\n",
            {"add": 0, "mul": 0},
        ),
        "writes_outside_but_correct": (
            "import os\n"
            f"for target in [{str(marker) + '_2'!r}, '/tmp/effdl-grader-escape', os.path.expanduser('~/../../escape')]:\n"
            "    try:\n        open(target, 'w').write('escaped')\n    except OSError:\n        pass\n"
            + reference_source(REFERENCE, "ops.py"),
            {"add": 2, "mul": 1},
        ),
    }


def _zip(path: Path, entries: dict[str, str], links: dict[str, str] = ()) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in entries.items():
            archive.writestr(name, text)
        for name, target in dict(links).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return path


@pytest.fixture(scope="module")
def graded(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("grading")
    assignment = load_assignment(write_toy_assignment(root))
    out_dir = root / "out"
    submissions = root / "submissions"
    expected: dict[str, dict[str, float]] = {}

    def folder(name: str, source: str, scores: dict[str, float], extra: dict[str, str] = ()) -> None:
        (submissions / name / "toy").mkdir(parents=True)
        (submissions / name / "toy" / "ops.py").write_text(source)
        for relative, text in dict(extra).items():
            (submissions / name / relative).parent.mkdir(parents=True, exist_ok=True)
            (submissions / name / relative).write_text(text)
        expected[name] = scores

    folder("reference", reference_source(REFERENCE, "ops.py"), {"add": 2, "mul": 1})
    folder("starter", starter_source(REFERENCE, "ops.py"), {"add": 0, "mul": 0})
    for name, (source, scores) in _hostile_sources(root, out_dir).items():
        folder(name, source, scores)
    folder("with_extra_files", reference_source(REFERENCE, "ops.py"), {"add": 2, "mul": 1},
           {"notes.txt": "my notes", "__pycache__/ops.cpython-311.pyc": "junk"})  # fmt: skip
    _zip(
        submissions / "zip_slip.zip",
        {"toy/ops.py": reference_source(REFERENCE, "ops.py"), "../../slipped.py": "x = 1"},
    )
    expected["zip_slip"] = {"add": 0, "mul": 0}
    _zip(submissions / "zip_symlink.zip", {}, {"toy/ops.py": "/etc/passwd"})
    expected["zip_symlink"] = {"add": 0, "mul": 0}
    (submissions / "folder_symlink" / "toy").mkdir(parents=True)
    (submissions / "folder_symlink" / "toy" / "ops.py").symlink_to(assignment.src / "toy" / "ops.py")
    expected["folder_symlink"] = {"add": 0, "mul": 0}

    results = grade(assignment, [submissions], out_dir, jobs=2, gpus=[])
    return {r.name: r for r in results}, expected, root, out_dir


def _scores(result) -> dict[str, float]:
    return {t.task.id: t.score for t in result.tasks}


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["reference", "starter", "loops_forever", "allocates_without_bound", "forks_repeatedly", "exits_at_import",
     "patches_pytest", "fakes_results", "reads_hidden_tests", "leaks_hidden_tests_at_import",
     "reads_the_reference", "writes_outside_but_correct", "with_extra_files", "zip_slip", "zip_symlink",
     "folder_symlink"],
)  # fmt: skip
def test_each_submission_gets_its_score(graded, name: str) -> None:
    results, expected, _, out_dir = graded
    assert _scores(results[name]) == expected[name], results[name].tasks
    report = json.loads((out_dir / name / "results.json").read_text())
    assert report["score"] == sum(expected[name].values())
    assert {t["name"].split(":")[0] for t in report["tests"]} == {"add", "mul"}
    assert all({"name", "max_score", "output", "visibility", "score"} <= set(t) for t in report["tests"])


@pytest.mark.slow
def test_the_batch_writes_a_gradebook_row_per_submission(graded) -> None:
    results, expected, _, out_dir = graded
    rows = (out_dir / "gradebook.csv").read_text().splitlines()
    assert rows[0].startswith("submission,add (/2),mul (/1),total")
    assert sorted(row.split(",")[0] for row in rows[1:]) == sorted(expected)


@pytest.mark.slow
def test_nothing_is_written_outside_the_work_trees(graded) -> None:
    _, _, root, out_dir = graded
    assert not (root / "escaped").exists() and not (root / "escaped_2").exists()
    assert not Path("/tmp/effdl-grader-escape").exists()
    assert not list(root.rglob("slipped.py"))
    assert json.loads((out_dir / "fakes_results" / "results.json").read_text())["score"] == 0
    assert not (out_dir / "results.json").exists()


@pytest.mark.slow
def test_refusals_name_the_offending_entry(graded) -> None:
    results, *_ = graded
    assert "../../slipped.py" in results["zip_slip"].submission.refused
    assert "symbolic link" in results["zip_symlink"].submission.refused
    assert "symbolic link" in results["folder_symlink"].submission.refused
    assert results["with_extra_files"].submission.ignored == ["__pycache__/ops.cpython-311.pyc", "notes.txt"]


@pytest.mark.slow
def test_hidden_test_source_never_reaches_the_student(graded) -> None:
    _, _, _, out_dir = graded
    for name in ("reads_hidden_tests", "leaks_hidden_tests_at_import"):  # from a failing test, from an import
        report = (out_dir / name / "results.json").read_text()
        for line in (HIDDEN_ADD + HIDDEN_MUL).splitlines():
            if len(line.strip()) >= 12:
                assert line.strip() not in report, (name, line)
        assert "[a line quoting the hidden tests was removed]" in report


@pytest.mark.slow
def test_hostile_runs_are_explained(graded) -> None:
    results, *_ = graded
    add = {name: next(t for t in results[name].tasks if t.task.id == "add") for name in results}
    assert "time limit of 30 s ran out" in add["loops_forever"].tests[0].message
    assert add["allocates_without_bound"].tests[0].message.startswith("MemoryError")
    assert "too many processes" in add["forks_repeatedly"].tests[0].message
    assert "ended early (exit code 0)" in add["exits_at_import"].tests[0].message
    assert "modified the test environment" in add["patches_pytest"].tests[0].message
    assert (
        "forged result line" in next(t for t in results["fakes_results"].tasks if t.task.id == "mul").detail
    )


@pytest.mark.slow
def test_a_busy_port_is_an_infrastructure_error_not_a_zero(tmp_path: Path) -> None:
    assignment = load_assignment(write_toy_assignment(tmp_path))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))  # any free port: taken here, so the hidden test finds it in use
        holder.listen()
        port = holder.getsockname()[1]
        test = assignment.root / "tests" / "hidden" / "test_mul.py"
        test.write_text(
            f"import socket\n\n\ndef test_server_port():\n    with socket.socket() as s:\n        s.bind(('127.0.0.1', {port}))\n"
        )
        context = GradingContext.prepare(assignment, tmp_path / "work", gpu_count=0)
        files = {"toy/ops.py": reference_source(REFERENCE, "ops.py").encode()}
        busy = grade_task(context, files, assignment.task("mul"), [], 1)
    assert (busy.status, busy.score, busy.attempts) == ("infrastructure error", None, 2)
    assert "port in use" in busy.detail
    free = grade_task(context, files, assignment.task("mul"), [], 1)
    assert (free.status, free.score) == ("graded", 1.0)


def test_gpu_tasks_are_not_zero_on_a_machine_without_gpus(tmp_path: Path) -> None:
    from dataclasses import replace

    assignment = load_assignment(write_toy_assignment(tmp_path))
    context = GradingContext(assignment, tmp_path, tmp_path, tmp_path, {}, frozenset(), gpu_count=0)
    result = grade_task(context, {}, replace(assignment.task("add"), gpus=2), [], 1)
    assert (result.status, result.score) == ("needs GPU runner", None)
    assert "needs 2 GPU(s); this machine has none" in result.detail
