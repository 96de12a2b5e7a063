"""`assignment.toml` and `mutants/*.toml`: what an assignment asks for and how it is graded.

A malformed manifest is an instructor's mistake found before any student is graded, so every problem is
reported with the file and the field that is wrong. The student repository ships the manifests without
`tests/hidden/`: there they load (students read `submit`), and the commands that grade refuse in one line.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import EffdlError
from common.weeks import REPO_ROOT

ASSIGNMENTS_DIR = REPO_ROOT / "assignments"
PARTIAL_CREDIT_RULES = ("proportional", "all_or_nothing")
# What the student's starter is: stubs that raise NotImplementedError, or a working program with planted bugs.
STARTER_KINDS = {"stubs": "NotImplementedError", "bugs": "AssertionError"}
_ID = re.compile(r"^[a-z0-9_]+$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class ManifestError(EffdlError):
    """An `assignment.toml` or mutant file that cannot be used; the message names the file and field."""


class UnknownAssignmentError(EffdlError):
    """An assignment name that matches no folder under `assignments/`."""


class InstructorOnlyError(EffdlError):
    """A command that needs an assignment's grader (`tests/hidden/`), which the student repository lacks."""


@dataclass(frozen=True)
class Task:
    """One graded part of an assignment: a selection of hidden tests worth some points."""

    id: str
    title: str
    points: float
    tests: tuple[str, ...]  # pytest paths or node ids, relative to the assignment folder
    time_limit_s: float = 120.0
    memory_mb: int = (
        8192  # address space of a CPU task (torch alone maps ~3 GB), GPU memory budget of a GPU task
    )
    gpus: int = 0
    partial_credit: str = "proportional"

    def selects(self, nodeid: str) -> bool:
        """Whether a collected test id belongs to this task's selection (a folder, a file or a test)."""
        return any(
            nodeid == sel
            or nodeid.startswith(sel + "::")  # every test of a file, or of a class
            or nodeid.startswith(sel + "[")  # every parametrized case of a test
            or nodeid.startswith(sel.rstrip("/") + "/")  # every file of a folder
            for sel in self.tests
        )


@dataclass(frozen=True)
class Replacement:
    """Replace the one occurrence of `old` with `new` in a submitted file of the reference solution."""

    file: str
    old: str
    new: str


@dataclass(frozen=True)
class Mutant:
    """A known-wrong variant of the reference that the hidden tests of `targets` must reject."""

    name: str
    description: str
    targets: tuple[str, ...]
    replacements: tuple[Replacement, ...]


@dataclass(frozen=True)
class Assignment:
    """An assignment folder and its parsed manifest."""

    name: str
    root: Path
    title: str
    package: str
    submit: tuple[str, ...]  # paths relative to src/
    tasks: tuple[Task, ...]
    mutants: tuple[Mutant, ...] = field(default=())
    max_file_kb: int = 256
    # Modules the worker template imports once per sandbox, besides torch.
    worker_preload: tuple[str, ...] = ()
    starter: str = "stubs"  # a key of STARTER_KINDS

    @property
    def starter_failure(self) -> str:
        """The exception each public test must fail with on the starter."""
        return STARTER_KINDS[self.starter]

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def hidden_tests(self) -> Path:
        """The grader's tests: in the instructor repository only (`effdl release` leaves them out)."""
        return self.root / "tests" / "hidden"

    @property
    def has_hidden_tests(self) -> bool:
        return self.hidden_tests.is_dir()

    @property
    def max_points(self) -> float:
        return sum(task.points for task in self.tasks)

    def task(self, task_id: str) -> Task:
        for task in self.tasks:
            if task.id == task_id:
                return task
        raise KeyError(task_id)


def _get(
    table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...
) -> Any:
    """table[key] checked against `kind`, or a ManifestError that names `where.key`."""
    if key not in table:
        if default is ...:
            raise ManifestError(f"{where}: missing required field `{key}`")
        return default
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ManifestError(f"{where}: field `{key}` must be {expected}, got {value!r}")
    return value


def _str_list(table: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    values = _get(table, key, list, where)
    if not values or not all(isinstance(v, str) and v for v in values):
        raise ManifestError(f"{where}: field `{key}` must be a non-empty list of strings, got {values!r}")
    return tuple(values)


def _parse_task(raw: dict[str, Any], where: str, root: Path) -> Task:
    task_id = _get(raw, "id", str, where)
    where = f"{where} (id {task_id!r})"
    if not _ID.match(task_id):
        raise ManifestError(f"{where}: field `id` must match [a-z0-9_]+")
    task = Task(
        id=task_id,
        title=_get(raw, "title", str, where, task_id),
        points=float(_get(raw, "points", (int, float), where)),
        tests=_str_list(raw, "tests", where),
        time_limit_s=float(_get(raw, "time_limit_s", (int, float), where, 120.0)),
        memory_mb=_get(raw, "memory_mb", int, where, 8192),
        gpus=_get(raw, "gpus", int, where, 0),
        partial_credit=_get(raw, "partial_credit", str, where, "proportional"),
    )
    if task.points <= 0:
        raise ManifestError(f"{where}: field `points` must be > 0, got {task.points}")
    if task.time_limit_s <= 0 or task.memory_mb <= 0 or task.gpus < 0:
        raise ManifestError(f"{where}: `time_limit_s` and `memory_mb` must be > 0 and `gpus` >= 0")
    if task.partial_credit not in PARTIAL_CREDIT_RULES:
        raise ManifestError(
            f"{where}: field `partial_credit` must be one of {PARTIAL_CREDIT_RULES}, got {task.partial_credit!r}"
        )
    released = not (root / "tests" / "hidden").is_dir()  # a student repository: no grader to point into
    for selection in task.tests:
        path = selection.split("::", 1)[0]
        if not path.startswith("tests/hidden") or not (released or (root / path).exists()):
            raise ManifestError(
                f"{where}: field `tests` entry {selection!r} is not a path under tests/hidden/"
            )
    return task


def _parse_mutant(path: Path, submit: tuple[str, ...], task_ids: set[str]) -> Mutant:
    where = str(path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ManifestError(f"{where}: not valid TOML: {error}") from None
    targets = _str_list(raw, "targets", where)
    unknown = sorted(set(targets) - task_ids)
    if unknown:
        raise ManifestError(
            f"{where}: field `targets` names unknown tasks {unknown}; tasks are {sorted(task_ids)}"
        )
    replacements = []
    for i, item in enumerate(_get(raw, "replace", list, where)):
        item_where = f"{where} [[replace]] #{i + 1}"
        if not isinstance(item, dict):
            raise ManifestError(f"{item_where}: must be a table with `file`, `old`, `new`")
        file = _get(item, "file", str, item_where)
        if file not in submit:
            raise ManifestError(f"{item_where}: field `file` {file!r} is not a submitted file {list(submit)}")
        replacements.append(
            Replacement(file, _get(item, "old", str, item_where), _get(item, "new", str, item_where))
        )
    if not replacements:
        raise ManifestError(f"{where}: needs at least one [[replace]] table")
    return Mutant(path.stem, _get(raw, "description", str, where), targets, tuple(replacements))


def load_assignment(root: Path) -> Assignment:
    """Parse `root/assignment.toml` and `root/mutants/*.toml`, checking every field."""
    manifest = root / "assignment.toml"
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: no such file (every assignment folder needs one)")
    try:
        raw = tomllib.loads(manifest.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ManifestError(f"{manifest}: not valid TOML: {error}") from None
    head = _get(raw, "assignment", dict, str(manifest))
    where = f"{manifest} [assignment]"
    package = _get(head, "package", str, where)
    submit = _str_list(head, "submit", where)
    for path in submit:
        if path.startswith("/") or ".." in Path(path).parts or not (root / "src" / path).is_file():
            raise ManifestError(f"{where}: field `submit` entry {path!r} is not a file under src/")
    task_tables = _get(raw, "task", list, str(manifest))
    tasks = tuple(_parse_task(t, f"{manifest} [[task]] #{i + 1}", root) for i, t in enumerate(task_tables))
    ids = [t.id for t in tasks]
    if len(set(ids)) != len(ids):
        raise ManifestError(f"{manifest}: task ids must be unique, got {ids}")
    mutants = tuple(
        _parse_mutant(path, submit, set(ids)) for path in sorted((root / "mutants").glob("*.toml"))
    )
    preload = _get(head, "worker_preload", list, where, [])
    if not all(isinstance(name, str) and _MODULE.match(name) for name in preload):
        raise ManifestError(
            f"{where}: field `worker_preload` must be a list of module names, got {preload!r}"
        )
    starter = _get(head, "starter", str, where, "stubs")
    if starter not in STARTER_KINDS:
        raise ManifestError(
            f"{where}: field `starter` must be one of {sorted(STARTER_KINDS)}, got {starter!r}"
        )
    return Assignment(
        name=root.name,
        root=root,
        title=_get(head, "title", str, where, root.name),
        package=package,
        submit=submit,
        tasks=tasks,
        mutants=mutants,
        max_file_kb=_get(head, "max_file_kb", int, where, 256),
        worker_preload=tuple(preload),
        starter=starter,
    )


def require_hidden_tests(assignment: Assignment, command: str) -> None:
    """Raise InstructorOnlyError, in one line, where `command` cannot run: the assignment has no grader here."""
    if not assignment.has_hidden_tests:
        raise InstructorOnlyError(
            f"`{command}` is for the instructor repository: {assignment.name} has no hidden tests here "
            "(tests/hidden/ is not released to students)"
        )


def assignment_names(assignments_dir: Path = ASSIGNMENTS_DIR) -> list[str]:
    """Every folder under `assignments/` that has an `assignment.toml`, sorted."""
    return sorted(p.parent.name for p in assignments_dir.glob("*/assignment.toml"))


def find_assignment(name: str, assignments_dir: Path = ASSIGNMENTS_DIR) -> Assignment:
    """An assignment by folder name, a unique prefix of it (`week03`), or a path to its folder."""
    as_path = Path(name)
    if (as_path / "assignment.toml").is_file():
        return load_assignment(as_path.resolve())
    names = assignment_names(assignments_dir)
    matches = [n for n in names if n == name] or [n for n in names if n.startswith(name)]
    if len(matches) != 1:
        known = ", ".join(names) or "none"
        what = "matches several" if matches else "matches no"
        raise UnknownAssignmentError(f"{name!r} {what} assignment; known assignments: {known}")
    return load_assignment(assignments_dir / matches[0])
