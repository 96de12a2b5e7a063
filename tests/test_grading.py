"""The grading harness's parts on their own: manifests, solution blocks, intake, reports, the sandbox."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from grading_toy import REFERENCE, write_toy_assignment

from common.grading import wire
from common.grading.batch import SubmissionResult
from common.grading.checker import explain
from common.grading.client import expect
from common.grading.faults import (
    GpuBusyError,
    ProcessLimitError,
    ReferenceRunError,
    SubmissionRaised,
    TimeLimitError,
    WorkerDidNotStartError,
    WrongTypeError,
    grading_run_pids,
    parse_gpu_holders,
)
from common.grading.harness import CaseOutcome, GraderSetupError, GradingContext, TaskResult
from common.grading.intake import Submission, SubmissionNotFoundError, read_submission
from common.grading.manifest import ManifestError, UnknownAssignmentError, find_assignment, load_assignment
from common.grading.release import BEGIN_INSTRUCTORS, END_INSTRUCTORS
from common.grading.reports import results_json, write_gradebook
from common.grading.sandbox import SandboxSpec
from common.grading.session import Session, WorkerLimits
from common.grading.solutions import (
    SolutionMarkerError,
    apply_mutant,
    find_blocks,
    reference_source,
    starter_source,
)


@pytest.fixture
def toy(tmp_path: Path):
    return load_assignment(write_toy_assignment(tmp_path))


# ------------------------------------------------------------------------------------------------ manifest
def test_the_toy_manifest_parses(toy) -> None:
    assert [t.id for t in toy.tasks] == ["add", "mul"]
    assert toy.max_points == 3
    assert toy.task("mul").partial_credit == "all_or_nothing"
    assert toy.mutants[0].targets == ("add",)
    assert toy.task("add").selects("tests/hidden/test_add.py::test_add_matches_python[1-2]")
    assert not toy.task("add").selects("tests/hidden/test_mul.py::test_mul_small_numbers")


@pytest.mark.parametrize(
    "edit, message",
    [
        (("points = 2\n", ""), "missing required field `points`"),
        (('partial_credit = "all_or_nothing"', 'partial_credit = "most"'), "field `partial_credit` must be one of"),
        (("points = 2\n", "points = -1\n"), "field `points` must be > 0"),
        (('tests = ["tests/hidden/test_add.py"]', 'tests = ["tests/public/test_public.py"]'), "not a path under tests/hidden/"),
        (('tests = ["tests/hidden/test_add.py"]', 'tests = ["tests/hidden/test_addition.py"]'), "not a path under tests/hidden/"),
        (('submit = ["toy/ops.py"]', 'submit = ["toy/missing.py"]'), "field `submit` entry 'toy/missing.py'"),
        (("points = 2\n", 'points = "two"\n'), "field `points` must be int or float"),
    ],
)  # fmt: skip
def test_a_malformed_manifest_names_the_field(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    root = write_toy_assignment(tmp_path)
    manifest = root / "assignment.toml"
    manifest.write_text(manifest.read_text().replace(*edit, 1))
    with pytest.raises(ManifestError, match=message.replace("[", r"\[").replace("(", r"\(")) as error:
        load_assignment(root)
    assert "assignment.toml" in str(error.value)


def test_a_mutant_with_an_unknown_target_is_refused(tmp_path: Path) -> None:
    root = write_toy_assignment(tmp_path)
    mutant = root / "mutants" / "add_off_by_one.toml"
    mutant.write_text(mutant.read_text().replace('targets = ["add"]', 'targets = ["div"]'))
    with pytest.raises(
        ManifestError, match=r"add_off_by_one.toml: field `targets` names unknown tasks \['div'\]"
    ):
        load_assignment(root)


def test_without_hidden_tests_the_manifest_loads_and_grading_refuses_in_one_line(toy, tmp_path: Path) -> None:
    # The student repository: manifests are released, hidden tests and mutants are not.
    from common.grading.grade import grade
    from common.grading.manifest import InstructorOnlyError
    from common.grading.selftest import selftest

    shutil.rmtree(toy.root / "tests" / "hidden")
    shutil.rmtree(toy.root / "mutants")
    released = load_assignment(toy.root)
    assert not released.has_hidden_tests and released.tasks == toy.tasks and released.mutants == ()
    for command, run in (
        ("grade", lambda: grade(released, [tmp_path], tmp_path / "out")),
        ("selftest", lambda: selftest(released)),
    ):
        with pytest.raises(InstructorOnlyError) as error:
            run()
        assert str(error.value) == (
            f"`effdl {command}` is for the instructor repository: toy_assignment has no hidden tests here "
            "(tests/hidden/ is not released to students)"
        )
    assert not (tmp_path / "out").exists()


def test_an_unknown_assignment_lists_the_known_ones(tmp_path: Path) -> None:
    write_toy_assignment(tmp_path)
    with pytest.raises(
        UnknownAssignmentError, match="'week99' matches no assignment; known assignments: toy_assignment"
    ):
        find_assignment("week99", tmp_path)
    assert find_assignment("toy", tmp_path).name == "toy_assignment"


# ------------------------------------------------------------------------------------------ solution blocks
def test_the_starter_keeps_signatures_and_docstrings_and_raises_the_hint() -> None:
    starter = starter_source(REFERENCE, "ops.py")
    assert (
        'def add(a: int, b: int) -> int:\n    """Return a + b."""\n    raise NotImplementedError("add: return'
        in starter
    )
    assert "total = a + b" not in starter and "SOLUTION" not in starter
    namespace: dict = {}
    exec(starter, namespace)
    with pytest.raises(NotImplementedError, match="mul: return the product of a and b"):
        namespace["mul"](2, 3)


def test_the_reference_keeps_the_code_and_drops_the_markers() -> None:
    reference = reference_source(REFERENCE, "ops.py")
    namespace: dict = {}
    exec(reference, namespace)
    assert namespace["add"](2, 3) == 5 and namespace["mul"](2, 3) == 6
    assert "SOLUTION" not in reference
    assert [b.hint for b in find_blocks(REFERENCE, "ops.py")] == [
        "add: return the sum of a and b",
        "mul: return the product of a and b",
    ]


@pytest.mark.parametrize(
    "source, message",
    [
        ("def f():\n    # BEGIN SOLUTION: f\n    return 1\n", "ops.py:2: BEGIN SOLUTION is never closed"),
        ("def f():\n    return 1\n    # END SOLUTION\n", "ops.py:3: END SOLUTION without a BEGIN"),
        ("def f():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION\n", "ops.py:2: BEGIN SOLUTION needs a hint"),
        ("def f():\n    # BEGIN SOLUTION: a\n    # BEGIN SOLUTION: b\n", "ops.py:3: BEGIN SOLUTION inside the block opened at line 2"),
    ],
)  # fmt: skip
def test_broken_markers_are_reported_with_their_line(source: str, message: str) -> None:
    with pytest.raises(SolutionMarkerError, match=message):
        starter_source(source, "ops.py")


def test_a_mutant_whose_text_is_not_unique_is_refused(toy) -> None:
    files = {"toy/ops.py": reference_source(REFERENCE, "ops.py")}
    assert "a + b + 1" in apply_mutant(files, toy.mutants[0])["toy/ops.py"]
    with pytest.raises(SolutionMarkerError, match="occurs 2 times"):
        apply_mutant({"toy/ops.py": files["toy/ops.py"] * 2}, toy.mutants[0])


# -------------------------------------------------------------------------------------------------- intake
def _zip(path: Path, entries: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in entries.items():
            archive.writestr(name, text)
    return path


def test_a_declared_file_is_found_at_its_path_or_by_its_unique_name(toy, tmp_path: Path) -> None:
    nested = read_submission(
        _zip(tmp_path / "a.zip", {"alice/toy/ops.py": "x = 1", "alice/notes.md": ""}), toy
    )
    flat = read_submission(_zip(tmp_path / "b.zip", {"ops.py": "x = 2"}), toy)
    assert nested.files == {"toy/ops.py": b"x = 1"} and nested.ignored == ["alice/notes.md"]
    assert flat.files == {"toy/ops.py": b"x = 2"} and flat.refused is None


def test_intake_refuses_and_names_bad_entries(toy, tmp_path: Path) -> None:
    absolute = read_submission(_zip(tmp_path / "abs.zip", {"/etc/cron.d/x": "", "ops.py": ""}), toy)
    big = read_submission(_zip(tmp_path / "big.zip", {"ops.py": "#" * (toy.max_file_kb * 1024 + 1)}), toy)
    twice = read_submission(_zip(tmp_path / "twice.zip", {"a/ops.py": "", "b/ops.py": ""}), toy)
    assert "'/etc/cron.d/x' (path outside the submission)" in absolute.refused
    assert "over the 262144-byte limit" in big.refused
    assert "toy/ops.py is ambiguous" in twice.refused


def _patch_zip(path: Path, offset_of: str, value: bytes, count: int = 2) -> Path:
    """Overwrite a field in the local header and the central directory entry of the zip's only member."""
    data = bytearray(path.read_bytes())
    local, central = data.index(b"PK\x03\x04"), data.index(b"PK\x01\x02")
    offsets = {"flags": (local + 6, central + 8), "method": (local + 8, central + 10)}[offset_of]
    for offset in offsets[:count]:
        data[offset : offset + len(value)] = value
    path.write_bytes(bytes(data))
    return path


def test_an_unreadable_zip_refuses_that_submission_with_a_reason(toy, tmp_path: Path) -> None:
    """A bad CRC, a password or an unknown compression method used to raise out of intake and stop the batch."""
    corrupt = _zip(tmp_path / "crc.zip", {"ops.py": "def add(a, b): return a + b\n"})
    data = bytearray(corrupt.read_bytes())
    data[data.index(b"def add")] ^= 0x01  # one flipped bit in the stored data: the CRC no longer matches
    corrupt.write_bytes(bytes(data))
    encrypted = _patch_zip(_zip(tmp_path / "locked.zip", {"ops.py": "x = 1"}), "flags", b"\x01\x00")
    exotic = _patch_zip(_zip(tmp_path / "aes.zip", {"ops.py": "x = 1"}), "method", b"\x63\x00")  # 99: AES
    assert "'ops.py' cannot be read (BadZipFile: Bad CRC-32" in read_submission(corrupt, toy).refused
    assert "'ops.py' (encrypted: submit it without a password)" in read_submission(encrypted, toy).refused
    assert "compression method 99" in read_submission(exotic, toy).refused


def test_a_refused_submission_shows_needs_gpu_runner_like_the_others(tmp_path: Path) -> None:
    from common.grading.batch import grade_batch

    root = write_toy_assignment(tmp_path / "course")
    manifest = root / "assignment.toml"
    manifest.write_text(manifest.read_text().replace('id = "mul"', 'id = "mul"\ngpus = 1'))
    assignment = load_assignment(root)
    context = GradingContext(assignment, tmp_path, tmp_path, {}, gpu_count=0)
    refused = read_submission(_zip(tmp_path / "r.zip", {"/abs/ops.py": ""}), assignment)
    (result,) = grade_batch(context, [refused], gpus=[])
    by_task = {t.task.id: (t.status, t.score) for t in result.tasks}
    assert by_task == {"add": ("graded", 0.0), "mul": ("needs GPU runner", None)}


def test_student_text_is_printed_as_text_not_markup(toy, tmp_path: Path) -> None:
    from rich.console import Console

    from common.grading.reports import print_table

    name = "[/bold][link=file:///etc/passwd]eve"
    submission = read_submission(_zip(tmp_path / "e.zip", {"[red]notes[/x].md": "", "ops.py": ""}), toy, name)
    result = SubmissionResult(submission)
    result.tasks = [TaskResult(task, "graded", 0.0) for task in toy.tasks]
    console = Console(record=True, width=200)
    print_table([result], console)
    text = console.export_text()
    assert name in text and "[red]notes[/x].md" in text


def test_tables_stay_readable_at_80_columns(tmp_path: Path) -> None:
    # A TA's terminal, or any pipe (rich assumes 80 columns there): every total, task and note must show
    # in full, on lines that fit.
    from rich.console import Console

    from common.grading.reports import print_table
    from common.grading.selftest import Verdict, _print

    week03 = find_assignment("week03_fast_pipelines")
    note = "refused: zip entry 'x/../../etc/passwd' escapes the submission folder"
    results = []
    for name, refused in (("a_student_with_a_rather_long_submission_folder_name", None), ("bob", note)):
        tasks = [
            TaskResult(t, "needs GPU runner", None) if t.gpus else TaskResult(t, "graded", t.points / 2)
            for t in week03.tasks
        ]
        results.append(SubmissionResult(Submission(name, tmp_path, refused=refused), tasks, duration_s=23.4))
    console = Console(record=True, width=80)
    print_table(results, console)
    _print(
        [Verdict("scaler_steps_on_inf", "loses points on loss_scaling", results[0])],
        list(week03.tasks),
        console,
    )
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    rows = [line.split("│")[1:-1] for line in text.splitlines() if line.startswith("│")]
    submission_rows, selftest_rows = rows[:-3], rows[-3:]  # the verdict wraps onto 3 lines

    def column(rows: list[list[str]], index: int, joiner: str = " ") -> str:
        return joiner.join(row[index].strip() for row in rows if row[index].strip())

    assert column(submission_rows, 0, "") == "a_student_with_a_rather_long_submission_folder_namebob"
    assert column(submission_rows, -2) == "4.5/9 4.5/9" and column(submission_rows, -1) == "23 s 23 s"
    assert column(selftest_rows, -1) == "ok (loses points on loss_scaling)"
    flat = " ".join(text.split())
    assert f"bob: {note}" in flat and "GPU: needs a GPU runner" in flat
    assert all(f"{n} {t.id}" in flat for n, t in enumerate(week03.tasks, 1))


def test_a_missing_file_is_graded_as_the_stub_and_noted(toy, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    submission = read_submission(tmp_path / "empty", toy)
    assert submission.missing == ["toy/ops.py"] and "graded as the starter stub" in submission.notes[0]
    with pytest.raises(SubmissionNotFoundError, match="no such file or folder"):
        read_submission(tmp_path / "nope", toy)


# ------------------------------------------------------------------------------------------------- reports
def test_results_json_follows_gradescope_and_never_scores_an_ungraded_task(toy, tmp_path: Path) -> None:
    submission = read_submission(_zip(tmp_path / "s.zip", {"ops.py": ""}), toy)
    graded = TaskResult(
        toy.task("add"),
        "graded",
        2 / 3 * 2,
        [CaseOutcome("t::a", True), CaseOutcome("t::b", False, "AssertionError: no")],
    )
    ungraded = TaskResult(
        toy.task("mul"), "needs GPU runner", None, detail="needs 1 GPU(s); this machine has none"
    )
    result = SubmissionResult(submission, [graded, ungraded], duration_s=3.21)
    report = results_json(result)
    assert report["score"] == pytest.approx(4 / 3, abs=1e-3) and report["execution_time"] == 3.2
    add, mul = report["tests"]
    assert (
        add["max_score"] == 2 and add["status"] == "failed" and "FAIL b: AssertionError: no" in add["output"]
    )
    assert "score" not in mul and mul["output"].startswith("needs GPU runner: not graded here.")
    assert report["extra_data"]["ungraded_tasks"] == ["mul"]
    json.dumps(report)  # serialisable as is
    rows = write_gradebook([result], tmp_path / "book.csv").read_text().splitlines()
    assert rows[1].startswith("s,1.3333,needs GPU runner,1.3333,2,")


# ------------------------------------------------------------------------------------------ wire, client
def test_data_crosses_the_wire_with_its_exact_types() -> None:
    value = {"ints": [1, -2, 2**70], "float": 0.5, "nan": math.nan, "flag": True, "none": None, "text": "é",
             ("a", 1): (1.0, [2]), "t": torch.arange(6, dtype=torch.int16).reshape(2, 3),
             "empty": torch.zeros(0, 4), "half": torch.tensor([1.5], dtype=torch.bfloat16)}  # fmt: skip
    back = wire.decode(json.loads(json.dumps(wire.encode(value))))
    assert back.keys() == value.keys() and back["ints"] == [1, -2, 2**70] and type(back["flag"]) is bool
    assert type(back[("a", 1)]) is tuple and back[("a", 1)] == (1.0, [2]) and math.isnan(back["nan"])
    for key in ("t", "empty", "half"):
        assert type(back[key]) is torch.Tensor and back[key].dtype == value[key].dtype
        assert torch.equal(back[key], value[key])


class _Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize(
    "value, kind",
    [(object(), "builtins.object"), ([1, {2}], "builtins.set"), (torch.zeros(2).as_subclass(_Subclass), "_Subclass"),
     (True.__class__.__mro__, "builtins.type"), (torch.zeros(2, dtype=torch.complex64), "complex64")],
)  # fmt: skip
def test_anything_but_data_is_refused_by_the_sender(value, kind: str) -> None:
    with pytest.raises(wire.NotData, match=kind):
        wire.encode(value)


@pytest.mark.parametrize(
    "data, message",
    [({"$pickle": "gASV"}, "unknown tag"), ({"a": 1, "b": 2}, "one-key tagged object"),
     ({"$tensor": {"dtype": "float32", "shape": [2], "data": "AAAA"}}, "needs 8 bytes, got 3"),
     ({"$tensor": {"dtype": "object", "shape": [1], "data": ""}}, "known dtype"),
     ({"$handle": 3}, "unknown tag"), ({"$dict": [[[1], 2]]}, "not hashable")],
)  # fmt: skip
def test_malformed_data_is_refused_by_the_receiver(data, message: str) -> None:
    with pytest.raises(wire.WireError, match=message):
        wire.decode(data)


def test_results_must_have_exactly_the_expected_type() -> None:
    assert expect([[1, 2], []], list[list[int]], "f") == [[1, 2], []]
    assert expect({"a": (1, 2.0)}, dict[str, tuple[int, float]], "f") == {"a": (1, 2.0)}
    for value, spec, where in [
        ([[1, True]], list[list[int]], "the result[0][1] is a bool, expected int"),
        ([(1, 2)], list[list[int]], "the result[0] is a tuple, expected list"),
        (1, float, "the result is a int, expected float"),
        ({"a": None}, dict[str, int | float], "the result['a'] is None, expected int | float"),
    ]:
        with pytest.raises(WrongTypeError, match=re.escape(f"f returned a wrong type: {where}")):
            expect(value, spec, "f")


def test_only_what_the_checker_observes_is_an_infrastructure_fault() -> None:
    assert explain(WorkerDidNotStartError("bwrap: cannot mount"))[1] == "bwrap: cannot mount"
    reference = "the grader's FSDP2 run on 2 ranks failed: rank 0 of 2 raised RuntimeError: gloo"
    assert explain(ReferenceRunError(reference)) == (
        reference,
        reference,
    )  # the checker's run: never 0 points
    assert "port in use" in explain(OSError(errno.EADDRINUSE, "Address already in use"))[1]
    raised = SubmissionRaised("add", ["OSError", "Exception"], "OSError", "[Errno 98] Address already in use")
    assert explain(raised) == ("add raised OSError: [Errno 98] Address already in use", None)
    assert explain(AssertionError("x" * 5000))[0] == "x" * 600
    assert (
        explain(ExceptionGroup("two", [AssertionError("first"), GpuBusyError("GPU 1 is held")]))[1]
        == "GPU 1 is held"
    )


def test_gpu_holders_are_read_from_nvidia_smi() -> None:
    gpus = "0, GPU-aaa\n1, GPU-bbb\n"
    apps = "GPU-bbb, 4242, 30000\nGPU-aaa, 77, 300\nGPU-bbb, 99, [N/A]\n"
    assert parse_gpu_holders(gpus, apps) == {0: [(77, 300)], 1: [(4242, 30000)]}


def test_the_grading_run_itself_never_counts_as_another_gpu_holder() -> None:
    # The checker and the processes that started it (a TA's pytest that used the GPU before grading, as
    # `pytest -m gpu` does) are the grading run; a sibling or a stranger is not.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        pids = grading_run_pids()
        assert {os.getpid(), os.getppid()} <= pids and child.pid not in pids and 1 not in pids
    finally:
        child.kill()
        child.wait()


# ------------------------------------------------------------------------------------------------- sandbox
@pytest.fixture
def probe_src(tmp_path: Path) -> Path:
    """A package `probe` whose functions look around the sandbox and misbehave on request."""
    (tmp_path / "src" / "probe").mkdir(parents=True)
    (tmp_path / "src" / "probe" / "__init__.py").write_text(
        "import os, subprocess, sys, time\n\n\n"
        "def look():\n"
        "    return {'uid': os.getuid(), 'env': sorted(os.environ), 'pids': sorted(p for p in os.listdir('/proc') if p.isdigit()),\n"
        "            'root': sorted(os.listdir('/')), 'shadow': os.path.exists('/etc/shadow'),\n"
        "            'net': sorted(os.listdir('/sys/class/net')) if os.path.exists('/sys/class/net') else None}\n\n\n"
        "def detach_and_hang(marker):\n"
        "    subprocess.Popen(['setsid', 'sleep', '300', marker])\n    time.sleep(300)\n\n\n"
        "def fork(n):\n    for _ in range(n):\n        if os.fork() == 0:\n            time.sleep(60)\n            os._exit(0)\n"
        "        time.sleep(0.002)\n    time.sleep(60)\n\n\n"
        "def reach_the_template():\n"
        "    try:\n        open(f'/proc/{os.getppid()}/mem', 'rb').close()\n        mem = 'opened'\n"
        "    except OSError as error:\n        mem = type(error).__name__\n"
        "    planted = []\n"
        "    for folder in sys.path:\n"
        "        try:\n            open(os.path.join(folder or '.', 'planted.py'), 'w').close()\n            planted.append(folder)\n"
        "        except OSError:\n            pass\n"
        "    return {'mem': mem, 'planted': planted}\n"
    )
    return tmp_path / "src"


def _session(src: Path, max_processes: int = 64) -> Session:
    session = Session(SandboxSpec(src=src, scratch=src.parent / "scratch"), max_processes=max_processes)
    session.spawn(WorkerLimits(address_space_bytes=8 * 2**30), "/tmp/task")
    return session


def _call(session: Session, target: str, *args, timeout_s: float = 60) -> dict:
    return session.exchange(
        {"op": "call", "id": 1, "target": {"import": target}, "args": wire.encode(list(args))}, timeout_s
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the grading sandbox runs on Linux")
def test_the_sandbox_sees_nothing_of_the_machine(probe_src: Path) -> None:
    session = _session(probe_src)
    try:
        seen = wire.decode(_call(session, "probe:look")["value"])
    finally:
        session.kill()
    assert seen["uid"] == 65534 and seen["shadow"] is False
    assert set(seen["env"]) <= {"PATH", "HOME", "TMPDIR", "USER", "LANG", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE",
        "PYTHONHASHSEED", "PYTHONUNBUFFERED", "XDG_CACHE_HOME", "MPLCONFIGDIR", "MPLBACKEND", "TRITON_CACHE_DIR",
        "TORCHINDUCTOR_CACHE_DIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_ARENA_MAX",
        "CUDA_VISIBLE_DEVICES", "LC_CTYPE", "PWD"}  # fmt: skip
    assert len(seen["pids"]) <= 4, (
        f"the sandbox sees other processes: {seen['pids']}"
    )  # init, template, worker, the zygote ranks are forked from
    assert "home" not in seen["root"] and "etc" in seen["root"] and "assignments" not in seen["root"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the grading sandbox runs on Linux")
def test_a_worker_can_neither_rewrite_the_template_nor_plant_a_module(probe_src: Path) -> None:
    """The template outlives every task of a submission, and hosts the hub of distributed tasks' workers."""
    session = _session(probe_src)
    try:
        seen = wire.decode(_call(session, "probe:reach_the_template")["value"])
    finally:
        session.kill()
    assert seen == {"mem": "PermissionError", "planted": []}, seen


def test_binds_below_tmp_land_on_top_of_the_sandboxs_tmpfs(tmp_path: Path) -> None:
    """A checkout or environment under /tmp (CI's fresh clones) stays visible: /tmp is mounted first."""
    from common.grading.sandbox import command

    argv = command(SandboxSpec(src=tmp_path, scratch=tmp_path), channel_fd=3)
    assert argv.index("--tmpfs") < min(i for i, arg in enumerate(argv) if arg in ("--ro-bind", "--symlink"))


def test_folders_that_pth_files_add_are_bound_but_never_the_repository(tmp_path: Path) -> None:
    """A runner's PyTorch linked in by a .pth file must be visible in the sandbox; the course repository (an
    editable install's .pth, or a folder holding it) must not, or the hidden tests would be in view."""
    from common.grading.sandbox import _pth_folders
    from common.weeks import REPO_ROOT

    runner_torch = tmp_path / "runner" / "site-packages"
    runner_torch.mkdir(parents=True)
    site_dir = tmp_path / "venv-site"
    site_dir.mkdir()
    lines = [str(runner_torch), str(REPO_ROOT), str(REPO_ROOT.parent), str(REPO_ROOT / "common"),
             "import os; os.environ", "# a comment", str(tmp_path / "missing"), ""]  # fmt: skip
    (site_dir / "links.pth").write_text("\n".join(lines) + "\n")
    assert _pth_folders([str(site_dir), str(tmp_path / "no-such-site")]) == {str(runner_torch.resolve())}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the grading sandbox runs on Linux")
def test_a_timeout_kills_processes_that_detach(probe_src: Path) -> None:
    marker = f"effdl-sandbox-test-{secrets.token_hex(4)}"
    session = _session(probe_src)
    start = time.monotonic()
    with pytest.raises(TimeLimitError):
        _call(session, "probe:detach_and_hang", marker, timeout_s=3)
    assert time.monotonic() - start < 60 and not session.alive
    alive = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.strip()
    assert alive == "", f"processes survived the sandbox: {alive}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the grading sandbox runs on Linux")
def test_a_run_with_too_many_processes_is_stopped(probe_src: Path) -> None:
    session = _session(probe_src, max_processes=32)
    with pytest.raises(ProcessLimitError, match="more than 32 processes"):
        _call(session, "probe:fork", 200, timeout_s=50)
    assert session.process_limit_hit and not session.alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the grading sandbox runs on Linux")
def test_a_sandbox_that_does_not_start_is_the_machines_fault(tmp_path: Path) -> None:
    with pytest.raises(WorkerDidNotStartError, match="the sandbox did not start"):
        Session(SandboxSpec(src=tmp_path / "missing", scratch=tmp_path))


def test_a_checker_run_past_its_deadline_is_killed(tmp_path: Path) -> None:
    from common.grading.forkserver import run_pytest

    (tmp_path / "test_slow.py").write_text(
        "import time\n\n\ndef test_fast():\n    pass\n\n\ndef test_slow():\n    time.sleep(120)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    argv = ["-q", "-p", "no:cacheprovider", "test_slow.py"]
    assert run_pytest([*argv, "-k", "fast"], tmp_path, env, tmp_path / "fast.log", timeout_s=120) == 0
    start = time.monotonic()
    assert run_pytest(argv, tmp_path, env, tmp_path / "slow.log", timeout_s=2) is None
    assert time.monotonic() - start < 60 and "1 passed" in (tmp_path / "fast.log").read_text()


def test_without_bwrap_grading_stops_with_the_fix(
    toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.grading import sandbox

    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(
        GraderSetupError,
        match=r"bubblewrap \(bwrap\) is not installed.*apt-get install bubblewrap.*--no-sandbox",
    ):
        GradingContext.prepare(toy, tmp_path / "work", gpu_count=0)


def test_hidden_tests_that_import_the_submission_do_not_collect(toy, tmp_path: Path) -> None:
    (toy.root / "tests" / "hidden" / "test_add.py").write_text(
        "from toy.ops import add\n\n\ndef test_add():\n    assert add(1, 2) == 3\n"
    )
    with pytest.raises(GraderSetupError, match="must not import the submission"):
        GradingContext.prepare(toy, tmp_path / "work", gpu_count=0)


def test_a_setup_that_fails_leaves_no_temporary_folder(
    toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (toy.root / "tests" / "hidden" / "test_add.py").write_text("import toy.ops\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(GraderSetupError):
        GradingContext.prepare(toy, gpu_count=0)
    assert list(scratch.iterdir()) == []


@pytest.mark.slow
def test_an_unsandboxed_grade_says_so_in_every_report(toy, tmp_path: Path, monkeypatch) -> None:
    from common.grading.grade import grade
    from common.grading.sandbox import UNSANDBOXED

    (tmp_path / "alice" / "toy").mkdir(parents=True)
    (tmp_path / "alice" / "toy" / "ops.py").write_text(reference_source(REFERENCE, "ops.py"))
    monkeypatch.chdir(tmp_path)  # relative paths, as a TA types them (`--out out`)
    (result,) = grade(toy, [Path("alice")], Path("out"), gpus=[], sandboxed=False)
    assert result.score == 3
    assert json.loads((tmp_path / "out" / "alice" / "results.json").read_text())["output"].startswith(
        UNSANDBOXED
    )
    assert UNSANDBOXED in (tmp_path / "out" / "gradebook.csv").read_text()


# ------------------------------------------------------------------------------------------------- release
def _toy_course(root: Path) -> Path:
    """A course repository holding only the toy assignment, committed to git as `effdl release` expects."""
    write_toy_assignment(root / "assignments")
    (root / "README.md").write_text(
        f"# Toy course\n\n{BEGIN_INSTRUCTORS}\nGrade with care.\n{END_INSTRUCTORS}\n\nHi.\n"
    )
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def test_release_stubs_the_toy_and_its_public_test_fails_with_not_implemented(tmp_path: Path) -> None:
    from common.grading.release import build_release

    report = build_release(tmp_path / "out", root=_toy_course(tmp_path / "course"))
    released = tmp_path / "out" / "assignments" / "toy_assignment"
    assert report.stubs == 2 and report.public_tests == {"toy_assignment": 1}
    assert not (released / "tests" / "hidden").exists() and not (released / "mutants").exists()
    assert "raise NotImplementedError" in (released / "src" / "toy" / "ops.py").read_text()
    assert (tmp_path / "out" / "README.md").read_text() == "# Toy course\n\nHi.\n"


def test_the_student_markdown_drops_instructor_blocks_and_refuses_unpaired_markers() -> None:
    from common.grading.release import ReleaseError, student_markdown

    text = (
        f"# Course\n\nFor all.\n\n{BEGIN_INSTRUCTORS}\n## For TAs\n\nGrade.\n{END_INSTRUCTORS}\n\n## Layout\n"
    )
    assert student_markdown(text, "README.md") == "# Course\n\nFor all.\n\n## Layout\n"
    indented = f"1. Run it.\n   {BEGIN_INSTRUCTORS}\n   Here it passes.\n   {END_INSTRUCTORS}\n2. Submit.\n"
    assert student_markdown(indented, "README.md") == "1. Run it.\n2. Submit.\n"
    for broken, message in (
        (f"x\n{BEGIN_INSTRUCTORS}\ny\n", "README.md:2: .* is never closed by"),
        (f"x\n{END_INSTRUCTORS}\n", "README.md:2: .* without a"),
        (f"{BEGIN_INSTRUCTORS}\n{BEGIN_INSTRUCTORS}\n", "README.md:2: .* inside the block opened at line 1"),
    ):
        with pytest.raises(ReleaseError, match=message):
            student_markdown(broken, "README.md")


def test_a_course_without_hidden_tests_is_not_released_again(tmp_path: Path) -> None:
    from common.grading.manifest import InstructorOnlyError
    from common.grading.release import build_release

    course = _toy_course(tmp_path / "course")
    shutil.rmtree(course / "assignments" / "toy_assignment" / "tests" / "hidden")
    with pytest.raises(InstructorOnlyError, match="^`effdl release` is for the instructor repository: "):
        build_release(tmp_path / "out", root=course)
    assert not (tmp_path / "out").exists()


def test_release_refuses_solution_code_copied_elsewhere(tmp_path: Path) -> None:
    from common.grading.release import ReleaseError, build_release

    course = _toy_course(tmp_path / "course")
    (course / "cheatsheet.py").write_text("def add(a, b):\n    total = a + b\n    return total\n")
    with pytest.raises(
        ReleaseError,
        match=r"cheatsheet.py: contains solution code from assignments/toy_assignment/src/toy/ops.py:3",
    ):
        build_release(tmp_path / "out", root=course)


def test_a_submission_that_breaks_intake_is_refused_and_the_rest_are_read(
    toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.grading import grade as grade_module

    def read(path: Path, assignment, name: str):
        if name == "odd":
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return read_submission(path, assignment, name)

    monkeypatch.setattr(grade_module, "read_submission", read)
    odd = grade_module.read_or_refuse(_zip(tmp_path / "odd.zip", {"ops.py": ""}), toy, "odd")
    fine = grade_module.read_or_refuse(_zip(tmp_path / "fine.zip", {"ops.py": "x = 1"}), toy, "fine")
    assert odd.refused.startswith("refused: unreadable (UnicodeDecodeError:") and fine.refused is None
    with pytest.raises(SubmissionNotFoundError):
        grade_module.read_or_refuse(tmp_path / "typo.zip", toy, "typo")


def test_a_program_runs_in_the_warm_server_as_python_c_would(tmp_path: Path) -> None:
    from common.grading.forkserver import run_python

    def run(code: str, timeout_s: float = 60) -> tuple[int | None, str]:
        output = tmp_path / "output.log"
        status = run_python(textwrap.dedent(code), tmp_path, {"PATH": "/usr/bin:/bin"}, output, timeout_s)
        return status, output.read_text()

    # Its own __main__ (pickle finds a class defined there), its name, argv and working folder; threads
    # joined and atexit handlers run at exit.
    status, out = run(
        """
        import atexit, os, pickle, sys, threading, time
        class Point:
            pass
        assert pickle.loads(pickle.dumps(Point())).__class__.__name__ == "Point"
        assert __name__ == "__main__" and sys.argv == ["-c"] and sys.path[0] == ""
        print(os.path.basename(os.getcwd()), sorted(os.environ))
        atexit.register(lambda: print("atexit ran", flush=True))
        threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished", flush=True))).start()
        """
    )
    assert status == 0, out
    assert f"{tmp_path.name} ['PATH']" in out
    assert out.index("thread finished") < out.index("atexit ran")
    status, out = run("import torch\nraise ValueError('bad block')\n")
    assert status == 1 and 'File "<string>", line 2' in out and "ValueError: bad block" in out
    assert run("import sys\nsys.exit(3)\n")[0] == 3
    assert run("import sys\nsys.exit('a message')\n") == (1, "a message\n")
    assert run("import time\ntime.sleep(120)\n", timeout_s=2)[0] is None
    # At the deadline the processes the program started die with it (a slide that launches ranks, say).
    status, out = run(
        """
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(child.pid, flush=True)
        time.sleep(120)
        """,
        timeout_s=3,
    )
    assert status is None
    child = int(out.split()[0])
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child), "the program's child outlived the program's deadline"


def _running(pid: int) -> bool:
    """Whether pid is a live process (not gone, not a zombie that nobody has reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")
