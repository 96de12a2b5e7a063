"""Solution blocks: one source file holds both the reference solution and the student's starter.

    def update(self, found_inf: bool) -> None:
        \"\"\"The docstring is the spec and is released.\"\"\"
        # BEGIN SOLUTION: DynamicLossScaler.update: back off on inf/NaN, grow after growth_interval good steps
        ...reference code...
        # END SOLUTION

`starter_source` turns each block into `raise NotImplementedError("<hint>")` at the marker's indentation;
`reference_source` drops only the marker lines; `apply_mutant` edits the reference to make a known-wrong variant.

A block may instead carry the starter's own text (a bug hunt ships working but wrong code, not stubs): below a
`# STARTER` line, each line commented out at the block's indentation. The hint then starts with the id of the
bug the block plants, and never reaches students:

    # BEGIN SOLUTION: noise_distribution: the forward process draws uniform noise
    noise = torch.randn_like(x0)
    # STARTER
    # noise = torch.rand_like(x0)
    # END SOLUTION

The student's version has `noise = torch.rand_like(x0)` there and nothing else of the block; the reference has
`noise = torch.randn_like(x0)`; `inject_bugs(text, where, {"noise_distribution"})` is the reference with that
one bug planted back (every block of that id), which is how a grader builds the programs a student's tests must
catch. Files other than Python (a `dvc.yaml`) may hold only such blocks: there is no stub to write there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from common.errors import EffdlError
from common.grading.manifest import Mutant

Transform = Callable[[str, str], str]  # (source text, where it comes from) -> source text

_BEGIN = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION(?::[ \t]*(?P<hint>.*?))?[ \t]*$")
_END = re.compile(r"^[ \t]*# END SOLUTION[ \t]*$")
_STARTER = re.compile(r"^[ \t]*# STARTER[ \t]*$")
_BUG_ID = re.compile(r"^(?P<bug>[a-z0-9_]+):")
# Files of an assignment's src/ that may hold solution blocks (`#` comments): the rest are copied as they are.
SOLUTION_SUFFIXES = (".py", ".yaml", ".yml")


class SolutionMarkerError(EffdlError):
    """Solution markers that do not pair up, or a block without a hint."""


@dataclass(frozen=True)
class SolutionBlock:
    """One `# BEGIN SOLUTION` ... `# END SOLUTION` block: its hint, the reference lines and, in a block that
    plants a bug, the starter's lines (uncommented)."""

    begin_line: int  # 1-based line number of the BEGIN marker
    indent: str
    hint: str
    body: tuple[str, ...]
    starter: tuple[str, ...] | None = None  # None: the starter is a NotImplementedError stub

    @property
    def bug(self) -> str | None:
        """The id of the bug a starter-text block plants (the hint up to its first colon); None for a stub."""
        match = _BUG_ID.match(self.hint) if self.starter is not None else None
        return match.group("bug") if match else None


def _uncomment(line: str, indent: str, where: str, number: int) -> str:
    """A starter line as students get it: `<indent># code` -> `<indent>code`; a blank line stays blank."""
    if not line.strip():
        return ""
    if not line.startswith(indent + "#"):
        raise SolutionMarkerError(
            f"{where}:{number}: a starter line must be a comment at the block's indentation, got {line.strip()!r}"
        )
    text = line[len(indent) + 1 :]
    return indent + (text[1:] if text.startswith(" ") else text) if text.strip() else ""


def find_blocks(text: str, where: str) -> list[SolutionBlock]:
    """Every solution block of a file, checked: paired markers, no nesting, a hint on each BEGIN, at most one
    STARTER line per block and, below it, only commented lines; a bug id on each block with starter text."""
    blocks: list[SolutionBlock] = []
    open_block: tuple[int, str, str, list[str]] | None = None
    starter: list[str] | None = None
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
            open_block, starter = (number, begin.group("indent"), hint, []), None
        elif end:
            if not open_block:
                raise SolutionMarkerError(f"{where}:{number}: END SOLUTION without a BEGIN SOLUTION")
            block = SolutionBlock(
                open_block[0], open_block[1], open_block[2], tuple(open_block[3]),
                None if starter is None else tuple(starter),
            )  # fmt: skip
            if block.starter is not None and block.bug is None:
                raise SolutionMarkerError(
                    f"{where}:{block.begin_line}: a block with starter text needs a bug id in its hint, "
                    "e.g. `# BEGIN SOLUTION: noise_distribution: what is wrong in the starter`"
                )
            if block.starter is None and not where.endswith(".py"):
                raise SolutionMarkerError(
                    f"{where}:{block.begin_line}: outside Python a block needs a `# STARTER` part "
                    "(there is no NotImplementedError stub to write)"
                )
            blocks.append(block)
            open_block, starter = None, None
        elif open_block and _STARTER.match(line):
            if starter is not None:
                raise SolutionMarkerError(f"{where}:{number}: a second STARTER line in one block")
            starter = []
        elif open_block and starter is not None:
            starter.append(_uncomment(line, open_block[1], where, number))
        elif open_block:
            open_block[3].append(line)
    if open_block:
        raise SolutionMarkerError(f"{where}:{open_block[0]}: BEGIN SOLUTION is never closed by END SOLUTION")
    return blocks


def _rewrite(text: str, where: str, *, keep_solution: bool, inject: frozenset[str] = frozenset()) -> str:
    """Each block as the starter has it (keep_solution False), or as the reference has it, with the blocks that
    plant a bug in `inject` as the starter has them."""
    blocks = iter(find_blocks(text, where))  # validates the markers first
    out: list[str] = []
    block: SolutionBlock | None = None
    for line in text.splitlines(keepends=True):
        bare = line.rstrip("\r\n")
        if _BEGIN.match(bare):
            block = next(blocks)
            as_starter = not keep_solution or (block.bug is not None and block.bug in inject)
            if as_starter and block.starter is not None:
                out += [starter_line + "\n" for starter_line in block.starter]
            elif as_starter:
                newline = line[len(bare) :]
                out.append(f"{block.indent}raise NotImplementedError({json.dumps(block.hint)}){newline}")
            in_reference_part = not as_starter
        elif _END.match(bare):
            block = None
        elif block is None:
            out.append(line)
        elif _STARTER.match(bare):
            in_reference_part = False
        elif in_reference_part:
            out.append(line)
    return "".join(out)


def starter_source(text: str, where: str) -> str:
    """The student's version of a file: each solution block becomes a NotImplementedError stub, or the
    block's starter text."""
    return _rewrite(text, where, keep_solution=False)


def reference_source(text: str, where: str) -> str:
    """The reference solution without its marker lines (and without the starter text of any block)."""
    return _rewrite(text, where, keep_solution=True)


def inject_bugs(text: str, where: str, bugs: Collection[str]) -> str:
    """The reference with the starter text of every block that plants one of `bugs` put back (ids this file
    does not plant are ignored: a bug may live in another file)."""
    return _rewrite(text, where, keep_solution=True, inject=frozenset(bugs))


def planted_bugs(text: str, where: str) -> list[str]:
    """The ids of the bugs a file's starter-text blocks plant, in order of first appearance."""
    return list(dict.fromkeys(block.bug for block in find_blocks(text, where) if block.bug))


def transformed_tree(src: Path, transform: Transform) -> dict[str, bytes]:
    """Every file below `src` (no caches) as relative path -> bytes, each file that may hold solution blocks
    passed through `transform(text, "src/<path>")`: the starter, the reference, the reference with bugs."""
    tree = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        relative = path.relative_to(src).as_posix()
        if path.suffix in SOLUTION_SUFFIXES:
            tree[relative] = transform(path.read_text(), f"src/{relative}").encode()
        elif path.suffix != ".pyc":
            tree[relative] = path.read_bytes()
    return tree


def has_markers(text: str) -> bool:
    return any(_BEGIN.match(line) or _END.match(line) or _STARTER.match(line) for line in text.splitlines())


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
