"""Reading a submission (a folder or a zip) without trusting it.

Only the files the manifest declares are taken. A submission that contains a path escaping its root (`../x`,
`/etc/x`), a symbolic link, a device or an oversize file is refused as a whole, with the offending entries
named: such entries are never accidents worth guessing around. So is one that cannot be read: a zip entry
that is encrypted, compressed with a method Python's zipfile lacks, or fails its CRC check, or a file the
grader may not read. A refusal is that submission's verdict; the batch goes on. Undeclared files (notes, caches, `__MACOSX/`)
are left out and listed. A declared file may sit at its full path (`fastpipe/batching.py`) or, if the name is
unique, anywhere in the archive (`alice/batching.py`).
"""

from __future__ import annotations

import os
import stat
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from common.errors import EffdlError
from common.grading.manifest import Assignment

MAX_ENTRIES = 2000  # more entries than any honest submission has: refuse rather than scan a zip bomb
READABLE_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
# What reading a damaged or exotic archive member raises: a bad CRC or header (BadZipFile), a password
# (RuntimeError), a compression method zipfile lacks (NotImplementedError), truncated or corrupt data.
UNREADABLE = (
    zipfile.BadZipFile,
    RuntimeError,
    NotImplementedError,
    EOFError,
    zlib.error,
    OSError,
    ValueError,
)


@dataclass
class Submission:
    """What intake made of one submission: the declared files, or why it was refused."""

    name: str
    source: Path
    files: dict[str, bytes] = field(default_factory=dict)  # declared path (relative to src/) -> content
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    refused: str | None = None  # why the whole submission is refused; None if it can be graded

    @property
    def notes(self) -> list[str]:
        notes = []
        if self.missing:
            notes.append(f"missing (graded as the starter stub): {', '.join(self.missing)}")
        if self.ignored:
            shown = ", ".join(self.ignored[:8]) + (
                f" and {len(self.ignored) - 8} more" if len(self.ignored) > 8 else ""
            )
            notes.append(f"not declared, left out: {shown}")
        return notes


class SubmissionNotFoundError(EffdlError):
    """A submission path that is neither a folder nor a zip file."""


def _unsafe_path(name: str) -> bool:
    posix = name.replace("\\", "/")
    parts = PurePosixPath(posix).parts
    return posix.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts


def _zip_entries(path: Path, limit: int) -> tuple[dict[str, zipfile.ZipInfo], list[str]]:
    problems: list[str] = []
    entries: dict[str, zipfile.ZipInfo] = {}
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        if len(infos) > MAX_ENTRIES:
            return {}, [f"{len(infos)} entries (more than {MAX_ENTRIES})"]
        for info in infos:
            mode = info.external_attr >> 16
            if _unsafe_path(info.filename):
                problems.append(f"{info.filename!r} (path outside the submission)")
            elif stat.S_ISLNK(mode):
                problems.append(f"{info.filename!r} (symbolic link)")
            elif stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: the zip tool stored no type
                problems.append(f"{info.filename!r} (not a regular file)")
            elif info.is_dir():
                continue
            elif info.file_size > limit:
                problems.append(f"{info.filename!r} ({info.file_size} bytes, over the {limit}-byte limit)")
            elif info.flag_bits & 0x1:
                problems.append(f"{info.filename!r} (encrypted: submit it without a password)")
            elif info.compress_type not in READABLE_COMPRESSION:
                problems.append(
                    f"{info.filename!r} (compression method {info.compress_type}, which the grader cannot "
                    "read: zip it with the default method)"
                )
            else:
                entries[info.filename.replace("\\", "/")] = info
    return entries, problems


def _folder_entries(root: Path, limit: int) -> tuple[dict[str, Path], list[str]]:
    problems: list[str] = []
    entries: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                problems.append(f"{rel!r} (symbolic link)")
            elif stat.S_ISDIR(info.st_mode):
                continue
            elif not stat.S_ISREG(info.st_mode):
                problems.append(f"{rel!r} (not a regular file)")
            elif info.st_size > limit:
                problems.append(f"{rel!r} ({info.st_size} bytes, over the {limit}-byte limit)")
            else:
                entries[rel] = path
        if len(entries) + len(problems) > MAX_ENTRIES:
            return {}, [f"more than {MAX_ENTRIES} files"]
    return entries, problems


def _match(declared: str, names: list[str]) -> list[str]:
    """Entries that can stand for a declared file: its full path (possibly in a top folder), else its name."""
    by_path = [n for n in names if n == declared or n.endswith("/" + declared)]
    if by_path:
        return by_path
    base = PurePosixPath(declared).name
    return [n for n in names if PurePosixPath(n).name == base]


def _read_entry(archive_path: Path, entry: zipfile.ZipInfo | Path, limit: int) -> bytes:
    """The content of one declared file, at most limit + 1 bytes (the header's size can lie)."""
    if isinstance(entry, zipfile.ZipInfo):
        with zipfile.ZipFile(archive_path) as archive, archive.open(entry) as handle:
            return handle.read(limit + 1)
    with open(entry, "rb") as handle:
        return handle.read(limit + 1)


def read_submission(path: Path, assignment: Assignment, name: str | None = None) -> Submission:
    """Read the declared files of a submission folder or zip; see the module docstring for the rules."""
    path = Path(path)
    submission = Submission(name=name or path.stem, source=path)
    limit = assignment.max_file_kb * 1024
    if path.is_dir():
        try:
            entries, problems = _folder_entries(path, limit)
        except OSError as error:  # e.g. a folder the grader may not list
            entries, problems = {}, [f"unreadable folder ({type(error).__name__}: {error})"]
    elif path.is_file() and zipfile.is_zipfile(path):
        try:
            entries, problems = _zip_entries(path, limit)
        except UNREADABLE as error:
            entries, problems = {}, [f"unreadable zip ({type(error).__name__}: {error})"]
    elif path.is_file() and path.suffix.lower() == ".zip":  # the student's file, damaged: refuse, don't stop
        entries, problems = {}, ["not a readable zip archive (damaged, or another format renamed to .zip)"]
    elif path.exists():
        raise SubmissionNotFoundError(f"{path}: a submission must be a folder or a .zip file")
    else:
        raise SubmissionNotFoundError(f"{path}: no such file or folder")
    if problems:
        submission.refused = "refused: " + "; ".join(problems)
        return submission

    names = sorted(entries)
    used: set[str] = set()
    for declared in assignment.submit:
        candidates = _match(declared, names)
        if len(candidates) > 1:
            submission.refused = (
                f"refused: {declared} is ambiguous, the submission has {', '.join(candidates)}"
            )
            return submission
        if not candidates:
            submission.missing.append(declared)
            continue
        entry = entries[candidates[0]]
        try:
            data = _read_entry(path, entry, limit)
        except UNREADABLE as error:
            submission.refused = (
                f"refused: {candidates[0]!r} cannot be read ({type(error).__name__}: {error})"
            )
            return submission
        if len(data) > limit:
            submission.refused = f"refused: {candidates[0]!r} is over the {limit}-byte limit"
            return submission
        submission.files[declared] = data
        used.add(candidates[0])
    submission.ignored = [n for n in names if n not in used]
    return submission
