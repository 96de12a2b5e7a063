"""Hostile submissions, graded in one batch next to honest ones: each gets the score it deserves, the rest of
the batch is unaffected, and nothing leaves the sandbox.

One submission per attack. The attacks of the first grader's review, each of which scored points or leaked
there: forging verdicts from inside the test process (a reporter found through `gc`, test functions whose
`__code__` is swapped, a trace hook that rewrites the test wrapper's variables); results that grade
themselves (an `__eq__` that is always true, a tensor subclass that makes `torch.equal` true); reading the
hidden tests and smuggling them out encoded; reaching a server on the host's loopback; reading the TA's
environment and /etc/shadow; raising EADDRINUSE to be graded as an infrastructure fault. Most of them
"prove" their success by answering correctly only when the attack worked, so the score says whether it did.

The batch is graded once (module fixture, two jobs in parallel as a TA would) and each test checks one case.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import stat
import sys
import threading
import zipfile
from pathlib import Path

import pytest
from grading_toy import HIDDEN_ADD, HIDDEN_MUL, REFERENCE, write_toy_assignment

from common.grading.grade import grade
from common.grading.harness import GradingContext, grade_tasks, needs_gpu_runner
from common.grading.manifest import load_assignment
from common.grading.solutions import reference_source, starter_source

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the grading sandbox runs on Linux"
)

CORRECT_MUL = "\n\ndef mul(a, b):\n    return a * b\n"
WRONG_BOTH = "def add(a, b):\n    return a - b - 1\n\n\ndef mul(a, b):\n    return a + b + 1\n"
STUBS = (
    "\n\ndef add(a, b):\n    raise NotImplementedError\n\n\ndef mul(a, b):\n    raise NotImplementedError\n"
)
SECRET_NAME = "EFFDL_TA_SECRET_TOKEN"


def _hostile_sources(root: Path, out_dir: Path, port: int) -> dict[str, tuple[str, dict[str, float]]]:
    """name -> (toy/ops.py source, the score each task must get)."""
    marker = root / "escaped"
    reference_file = root / "toy_assignment" / "src" / "toy" / "ops.py"
    return {
        # ------------------------------------------------------------------ limits (the first review's)
        "loops_forever": (
            "def add(a, b):\n    while True:\n        pass\n" + CORRECT_MUL,
            {"add": 0, "mul": 1},
        ),
        # bytes(n) comes from calloc: mapped, never written, so the address-space limit is reached in a
        # fraction of a second. bytearray(n) writes each GiB first: 5 GiB took 19.8 s of page faults on a
        # 2-core runner, against the task's 20 s limit, and under load the time limit won the race.
        "allocates_without_bound": (
            "def add(a, b):\n    hog = []\n    while True:\n        hog.append(bytes(2**30))\n" + CORRECT_MUL,
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
            f"for target in ['results.json', '../results.json', '../../results.json', "
            f"{str(out_dir / 'fakes_results' / 'results.json')!r}, {str(marker)!r}]:\n"
            "    try:\n        open(target, 'w').write(fake)\n    except OSError:\n        pass\n"
            "for fd in range(3, 64):\n"
            '    try:\n        os.write(fd, b\'{"kind": "result", "passed": true}\\n\')\n    except OSError:\n'
            "        pass\n" + WRONG_BOTH,
            {"add": 0, "mul": 0},
        ),
        "reads_the_reference": (
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
        # ------------------------------------------------------- verdicts forged inside the test process
        "forges_the_reporter_through_gc": (
            "import gc\n\n\nclass Always(set):\n    def __contains__(self, item):\n        return True\n\n\n"
            "class Ignores(dict):\n    def __setitem__(self, key, value):\n        pass\n\n"
            "    def get(self, key, default=None):\n        return None\n\n\n"
            "for obj in gc.get_objects():\n"
            "    if type(obj).__name__ in ('GraderReporter', 'Checker'):\n"
            "        obj._completed, obj._passed, obj._failures = Always(), Always(), Ignores()\n" + STUBS,
            {"add": 0, "mul": 0},
        ),
        "swaps_the_tests_code": (
            "import gc, types\n\n\ndef _passes(*args, **kwargs):\n    return None\n\n\n"
            "def _swap():\n    for obj in gc.get_objects():\n"
            "        if isinstance(obj, types.FunctionType) and obj.__name__.startswith('test_'):\n"
            "            obj.__code__ = _passes.__code__\n\n\n"
            "def add(a, b):\n    _swap()\n    raise NotImplementedError\n\n\n"
            "def mul(a, b):\n    _swap()\n    raise NotImplementedError\n",
            {"add": 0, "mul": 0},
        ),
        "rewrites_the_test_wrapper_with_a_trace_hook": (
            "import sys, threading\n\n\ndef _passes(*args, **kwargs):\n    return None\n\n\n"
            "def _tracer(frame, event, arg):\n"
            "    if frame.f_code.co_name == 'run_test_function' or frame.f_code.co_name.startswith('test_'):\n"
            "        frame.f_locals['function'] = _passes\n    return None\n\n\n"
            "sys.settrace(_tracer)\nthreading.settrace(_tracer)\n" + STUBS,
            {"add": 0, "mul": 0},
        ),
        # ------------------------------------------------------------------ results that grade themselves
        "returns_objects_equal_to_anything": (
            "import torch\n\n\nclass AlwaysEqual:\n    def __eq__(self, other):\n        return True\n\n"
            "    __hash__ = object.__hash__\n\n\n"
            "class Agreeable(torch.Tensor):\n    @classmethod\n"
            "    def __torch_function__(cls, func, types, args=(), kwargs=None):\n"
            "        if func is torch.equal:\n            return True\n"
            "        return super().__torch_function__(func, types, args, kwargs or {})\n\n\n"
            "def add(a, b):\n    return AlwaysEqual()\n\n\n"
            "def mul(a, b):\n    if isinstance(a, torch.Tensor):\n        return torch.zeros_like(a).as_subclass(Agreeable)\n"
            "    return AlwaysEqual()\n",
            {"add": 0, "mul": 0},
        ),
        # ---------------------------------------------------------------------------- hidden tests kept in
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
        "leaks_hidden_tests_encoded": (
            "import base64, os\nfrom pathlib import Path\n\n\ndef _hidden():\n    found = []\n"
            "    for start in (Path.cwd(), Path(__file__).resolve().parent, Path('/proc/self/cwd')):\n"
            "        for folder in (start, *start.parents):\n"
            "            found += sorted((folder / 'tests' / 'hidden').glob('*.py'))\n"
            "    return ''.join(p.read_text() for p in found)\n\n\n"
            "ENCODED = base64.b64encode(_hidden().encode()).decode()\nprint(ENCODED)\n\n\n"
            "def add(a, b):\n    raise AssertionError(ENCODED)\n\n\n"
            "def mul(a, b):\n    raise ValueError(ENCODED)\n",
            {"add": 0, "mul": 0},
        ),
        "reaches_the_hosts_loopback": (
            "import socket\n\n\ndef _connected():\n    try:\n"
            f"        socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n        return True\n"
            "    except OSError:\n        return False\n\n\n"
            "def add(a, b):\n    return a + b if _connected() else a - b - 1\n" + CORRECT_MUL,
            {"add": 0, "mul": 1},
        ),
        # -------------------------------------------------------------------------- the TA's secrets
        "reads_the_tas_environment": (
            "import os\n\n\ndef _secret():\n"
            f"    if {SECRET_NAME!r} in os.environ:\n        return os.environ[{SECRET_NAME!r}]\n"
            "    for pid in os.listdir('/proc'):\n        try:\n"
            "            for entry in open(f'/proc/{pid}/environ', 'rb').read().split(b'\\0'):\n"
            f"                if entry.startswith({SECRET_NAME.encode() + b'='!r}):\n"
            "                    return entry.split(b'=', 1)[1].decode()\n"
            "        except OSError:\n            pass\n    return None\n\n\nSECRET = _secret()\nprint(SECRET)\n\n\n"
            "def add(a, b):\n    return a + b if SECRET else a - b - 1\n\n\n"
            "def mul(a, b):\n    raise ValueError(f'the secret is {SECRET}')\n",
            {"add": 0, "mul": 0},
        ),
        "reads_etc_shadow": (
            "def _shadow():\n    try:\n        return open('/etc/shadow').read()\n    except OSError:\n"
            "        return None\n\n\n"
            "def add(a, b):\n    return a + b if _shadow() is not None else a - b - 1\n" + CORRECT_MUL,
            {"add": 0, "mul": 1},
        ),
        # ------------------------------------------------------------ claiming an infrastructure fault
        "kills_its_template": (  # breaks the sandbox's machinery after its code ran: its own doing, not a fault
            "import os, signal\n\n\ndef add(a, b):\n    os.kill(os.getppid(), signal.SIGKILL)\n"
            "    return a + b\n" + CORRECT_MUL,
            {"add": 2, "mul": 1},
        ),
        "breaks_every_sandbox_at_import": (  # each call costs a new sandbox: charged to its own time limit
            "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos._exit(1)\n" + WRONG_BOTH,
            {"add": 0, "mul": 0},
        ),
        "raises_address_in_use": (
            "import errno\n\n\ndef add(a, b):\n    raise OSError(errno.EADDRINUSE, 'Address already in use')\n\n\n"
            "def mul(a, b):\n    raise OSError(errno.EADDRINUSE, 'Address already in use')\n",
            {"add": 0, "mul": 0},
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


class Listener:
    """A TCP server on the host's loopback that counts the connections it accepts."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()


@pytest.fixture(scope="module")
def graded(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("grading")
    assignment = load_assignment(write_toy_assignment(root))
    out_dir = root / "out"
    submissions = root / "submissions"
    expected: dict[str, dict[str, float]] = {}
    listener = Listener()
    secret = secrets.token_hex(16)

    def folder(name: str, source: str, scores: dict[str, float], extra: dict[str, str] = ()) -> None:
        (submissions / name / "toy").mkdir(parents=True)
        (submissions / name / "toy" / "ops.py").write_text(source)
        for relative, text in dict(extra).items():
            (submissions / name / relative).parent.mkdir(parents=True, exist_ok=True)
            (submissions / name / relative).write_text(text)
        expected[name] = scores

    folder("reference", reference_source(REFERENCE, "ops.py"), {"add": 2, "mul": 1})
    folder("starter", starter_source(REFERENCE, "ops.py"), {"add": 0, "mul": 0})
    for name, (source, scores) in _hostile_sources(root, out_dir, listener.port).items():
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

    os.environ[SECRET_NAME] = secret  # the TA's environment holds a secret while the batch is graded
    try:
        results = grade(assignment, [submissions], out_dir, jobs=2, gpus=[])
    finally:
        del os.environ[SECRET_NAME]
        listener.server.close()
    return {r.name: r for r in results}, expected, root, out_dir, listener, secret


def _scores(result) -> dict[str, float]:
    return {t.task.id: t.score for t in result.tasks}


def _messages(result, task: str) -> list[str]:
    return [o.message for t in result.tasks if t.task.id == task for o in t.tests]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["reference", "starter", "loops_forever", "allocates_without_bound", "forks_repeatedly", "exits_at_import",
     "patches_pytest", "fakes_results", "reads_the_reference", "writes_outside_but_correct",
     "forges_the_reporter_through_gc", "swaps_the_tests_code", "rewrites_the_test_wrapper_with_a_trace_hook",
     "returns_objects_equal_to_anything", "reads_hidden_tests", "leaks_hidden_tests_at_import",
     "leaks_hidden_tests_encoded", "reaches_the_hosts_loopback", "reads_the_tas_environment", "reads_etc_shadow",
     "kills_its_template", "breaks_every_sandbox_at_import", "raises_address_in_use", "with_extra_files", "zip_slip", "zip_symlink", "folder_symlink"],
)  # fmt: skip
def test_each_submission_gets_its_score(graded, name: str) -> None:
    results, expected, _, out_dir, *_ = graded
    assert all(t.status == "graded" for t in results[name].tasks), [
        (t.task.id, t.status, t.detail) for t in results[name].tasks
    ]
    assert _scores(results[name]) == expected[name], results[name].tasks
    report = json.loads((out_dir / name / "results.json").read_text())
    assert report["score"] == sum(expected[name].values())
    assert {t["name"].split(":")[0] for t in report["tests"]} == {"add", "mul"}
    assert all({"name", "max_score", "output", "visibility", "score"} <= set(t) for t in report["tests"])


@pytest.mark.slow
def test_the_batch_writes_a_gradebook_row_per_submission(graded) -> None:
    results, expected, _, out_dir, *_ = graded
    rows = (out_dir / "gradebook.csv").read_text().splitlines()
    assert rows[0].startswith("submission,add (/2),mul (/1),total")
    assert sorted(row.split(",")[0] for row in rows[1:]) == sorted(expected)


@pytest.mark.slow
def test_nothing_is_written_outside_the_sandbox(graded) -> None:
    _, _, root, out_dir, *_ = graded
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


def _base64_prefixes(text: str) -> list[str]:
    """base64 of the first bytes of `text` at each of the three alignments a copy inside a longer text can have."""
    data = text.encode()
    return [base64.b64encode(data[skip : skip + 30]).decode() for skip in range(3)]


@pytest.mark.slow
def test_hidden_test_source_never_reaches_the_student(graded) -> None:
    _, _, _, out_dir, *_ = graded
    hidden_lines = [
        line.strip() for line in (HIDDEN_ADD + HIDDEN_MUL).splitlines() if len(line.strip()) >= 12
    ]
    encoded = _base64_prefixes(HIDDEN_ADD) + _base64_prefixes(HIDDEN_MUL)
    for name in ("reads_hidden_tests", "leaks_hidden_tests_at_import", "leaks_hidden_tests_encoded"):
        report = (out_dir / name / "results.json").read_text()
        assert not [line for line in hidden_lines if line in report], (name, "a hidden line leaked")
        assert not [prefix for prefix in encoded if prefix in report], (name, "an encoded copy leaked")


@pytest.mark.slow
def test_a_failure_shows_the_checkers_message_and_a_short_excerpt(graded) -> None:
    results, *_ = graded
    for message in _messages(results["leaks_hidden_tests_encoded"], "add"):
        assert message.startswith("add raised AssertionError") and len(message) <= 300, message
    assert _messages(results["returns_objects_equal_to_anything"], "add")[0].startswith(
        "add returned an object of type toy.ops.AlwaysEqual, which is not data"
    )
    assert "which is not data" in _messages(results["returns_objects_equal_to_anything"], "mul")[2]


@pytest.mark.slow
def test_the_sandbox_has_no_network(graded) -> None:
    *_, listener, _ = graded
    assert listener.connections == 0


@pytest.mark.slow
def test_the_tas_environment_never_reaches_a_report(graded) -> None:
    _, _, _, out_dir, _, secret = graded
    for folder in out_dir.iterdir():
        for path in folder.glob("*") if folder.is_dir() else [folder]:
            assert secret not in path.read_text(errors="replace"), path
    assert "the secret is None" in (out_dir / "reads_the_tas_environment" / "results.json").read_text()


@pytest.mark.slow
def test_hostile_runs_are_explained(graded) -> None:
    results, *_ = graded
    add = {name: next(t for t in results[name].tasks if t.task.id == "add") for name in results}
    assert "time limit of 20 s ran out" in add["loops_forever"].tests[0].message
    assert add["loops_forever"].detail.endswith("time limit 20 s exceeded")
    assert add["allocates_without_bound"].tests[0].message.startswith("add raised MemoryError")
    assert "more than 64 processes" in add["forks_repeatedly"].tests[0].message
    assert "process ended (exit code 0)" in add["exits_at_import"].tests[0].message
    assert add["raises_address_in_use"].tests[0].message.startswith("add raised OSError: [Errno 98]")


@pytest.mark.slow
def test_a_port_taken_in_the_checker_is_an_infrastructure_error_not_a_zero(tmp_path: Path) -> None:
    """The checker (trusted) binds a port the machine holds: the harness saw it, so it is the machine's fault."""
    assignment = load_assignment(write_toy_assignment(tmp_path))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))  # any free port: taken here, so the checker finds it in use
        holder.listen()
        port = holder.getsockname()[1]
        test = assignment.root / "tests" / "hidden" / "test_mul.py"
        test.write_text(
            "import socket\n\n\ndef test_server_port(submission):\n"
            f"    with socket.socket() as s:\n        s.bind(('127.0.0.1', {port}))\n"
            "    assert submission.call('toy.ops:mul', 2, 3) == 6\n"
        )
        context = GradingContext.prepare(assignment, tmp_path / "work", gpu_count=0)
        files = {"toy/ops.py": reference_source(REFERENCE, "ops.py").encode()}
        (busy,) = grade_tasks(context, files, [assignment.task("mul")], [], 1)
    assert (busy.status, busy.score) == ("infrastructure error", None)
    assert "port in use" in busy.detail
    (free,) = grade_tasks(context, files, [assignment.task("mul")], [], 1)
    assert (free.status, free.score) == ("graded", 1.0)


def test_gpu_tasks_are_not_zero_on_a_machine_without_gpus(tmp_path: Path) -> None:
    from dataclasses import replace

    assignment = load_assignment(write_toy_assignment(tmp_path))
    result = needs_gpu_runner(replace(assignment.task("add"), gpus=2), 0)
    assert (result.status, result.score) == ("needs GPU runner", None)
    assert "needs 2 GPU(s); this machine has none" in result.detail
