"""Solution blocks: one source file holds both the reference solution and the student's starter.

    def update(self, found_inf: bool) -> None:
        \"\"\"The docstring is the spec and is released.\"\"\"
        # BEGIN SOLUTION: DynamicLossScaler.update: back off on inf/NaN, grow after growth_interval good steps
        ...reference code...
        # END SOLUTION

`starter_source` turns each block into `raise NotImplementedError("<hint>")` at the marker's indentation;
`reference_source` drops only the marker lines; `apply_mutant` edits the reference to make a known-wrong variant.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from common.errors import EffdlError
from common.grading.manifest import Mutant

Transform = Callable[[str, str], str]  # (source text, where it comes from) -> source text

_BEGIN = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION(?::[ \t]*(?P<hint>.*?))?[ \t]*$")
_END = re.compile(r"^[ \t]*# END SOLUTION[ \t]*$")


class SolutionMarkerError(EffdlError):
    """Solution markers that do not pair up, or a block without a hint."""


@dataclass(frozen=True)
class SolutionBlock:
    """One `# BEGIN SOLUTION` ... `# END SOLUTION` block: its hint and the lines between the markers."""

    begin_line: int  # 1-based line number of the BEGIN marker
    indent: str
    hint: str
    body: tuple[str, ...]


def find_blocks(text: str, where: str) -> list[SolutionBlock]:
    """Every solution block of a file, checked: paired markers, no nesting, a hint on each BEGIN."""
    blocks: list[SolutionBlock] = []
    open_block: tuple[int, str, str, list[str]] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        begin, end = _BEGIN.match(line), _END.match(line)
        if begin:
            if open_block:
                raise SolutionMarkerError(
                    f"{where}:{number}: BEGIN SOLUTION inside the block opened at line {open_block[0]}"
                )
            hint = (begin.group("hint") or "").strip()
            if not hint:
                raise SolutionMarkerError(
                    f"{where}:{number}: BEGIN SOLUTION needs a hint, e.g. "
                    "`# BEGIN SOLUTION: Class.method: what to implement`; it becomes the stub's message"
                )
            open_block = (number, begin.group("indent"), hint, [])
        elif end:
            if not open_block:
                raise SolutionMarkerError(f"{where}:{number}: END SOLUTION without a BEGIN SOLUTION")
            blocks.append(SolutionBlock(open_block[0], open_block[1], open_block[2], tuple(open_block[3])))
            open_block = None
        elif open_block:
            open_block[3].append(line)
    if open_block:
        raise SolutionMarkerError(f"{where}:{open_block[0]}: BEGIN SOLUTION is never closed by END SOLUTION")
    return blocks


def _rewrite(text: str, where: str, *, keep_solution: bool) -> str:
    find_blocks(text, where)  # validates the markers first
    out: list[str] = []
    inside = False
    for line in text.splitlines(keepends=True):
        begin = _BEGIN.match(line.rstrip("\r\n"))
        if begin:
            inside = True
            if not keep_solution:
                newline = "\n" if line.endswith("\n") else ""
                out.append(
                    f"{begin.group('indent')}raise NotImplementedError({json.dumps(begin.group('hint').strip())}){newline}"
                )
        elif _END.match(line.rstrip("\r\n")):
            inside = False
        elif keep_solution or not inside:
            out.append(line)
    return "".join(out)


def starter_source(text: str, where: str) -> str:
    """The student's version of a file: each solution block becomes a NotImplementedError stub."""
    return _rewrite(text, where, keep_solution=False)


def reference_source(text: str, where: str) -> str:
    """The reference solution without its marker lines."""
    return _rewrite(text, where, keep_solution=True)


def has_markers(text: str) -> bool:
    return any(_BEGIN.match(line) or _END.match(line) for line in text.splitlines())


def apply_mutant(files: dict[str, str], mutant: Mutant) -> dict[str, str]:
    """The reference files (path -> marker-free source) with the mutant's replacements made."""
    mutated = dict(files)
    for replacement in mutant.replacements:
        source = mutated[replacement.file]
        count = source.count(replacement.old)
        if count != 1:
            raise SolutionMarkerError(
                f"mutant {mutant.name!r}: the `old` text of its replacement in {replacement.file} occurs "
                f"{count} times in the reference (it must occur exactly once)"
            )
        mutated[replacement.file] = source.replace(replacement.old, replacement.new)
    return mutated
