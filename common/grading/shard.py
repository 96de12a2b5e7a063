"""Grading a batch on many machines: `effdl grade ... --shard K/N` and `effdl gradebook merge`.

A cluster grades hundreds of submissions as an array job: task K of N grades every N-th submission
(K, K + N, ...), so the slices are disjoint, cover the batch and take about the same time, and each is
decided by the list of submissions alone (every task sees the same folder and sorts it the same way).
Names are made unique over the whole batch before slicing, so a submission has the same name whichever
task grades it. Each task writes its usual output folder plus `shard.json`: which slice it graded and the
names of the whole batch in order. `merge` checks that the shards belong to one batch and that every
submission was graded exactly once, then writes the gradebook a single machine would have written.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from common.errors import EffdlError

SHARD_FILE = "shard.json"
GRADEBOOK = "gradebook.csv"


class ShardError(EffdlError, ValueError):
    """A --shard value that is not K/N, or shard outputs that do not make up one whole batch."""


@dataclass(frozen=True)
class Shard:
    """Slice `index` (1-based) of `count` of a batch."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """ "3/10" -> Shard(3, 10): the form a Slurm array script writes, `$SLURM_ARRAY_TASK_ID/10`."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ShardError(f"--shard takes K/N, e.g. 3/10 (slice 3 of 10), not {text!r}") from None
        if not 1 <= index <= count:
            raise ShardError(f"--shard {text}: K must be between 1 and N = {count}")
        return cls(index, count)

    def take(self, items: Sequence) -> list:
        """Every count-th item, starting at item index - 1."""
        return list(items[self.index - 1 :: self.count])


@dataclass(frozen=True)
class ShardRecord:
    """What one shard's output folder says about itself, in shard.json."""

    assignment: str
    index: int
    count: int
    batch: list[str]  # every submission name of the whole batch, in the single-machine order
    graded: list[str]  # the names this shard graded


def write_record(out_dir: Path, assignment: str, shard: Shard, batch: list[str], graded: list[str]) -> Path:
    """Write out_dir/shard.json for `effdl gradebook merge`."""
    record = ShardRecord(assignment, shard.index, shard.count, batch, graded)
    path = out_dir / SHARD_FILE
    path.write_text(json.dumps(asdict(record), indent=2) + "\n")
    return path


def _read_shard(folder: Path) -> tuple[ShardRecord, list[str], dict[str, list[str]]]:
    record_path, gradebook_path = folder / SHARD_FILE, folder / GRADEBOOK
    for path in (record_path, gradebook_path):
        if not path.is_file():
            raise ShardError(f"{folder}: no {path.name}; is it the --out folder of `effdl grade --shard`?")
    record = ShardRecord(**json.loads(record_path.read_text()))
    with gradebook_path.open(newline="") as handle:
        header, *rows = list(csv.reader(handle))
    return record, header, {row[0]: row for row in rows}


def merge_gradebooks(folders: Sequence[Path], out: Path) -> Path:
    """Combine the gradebooks of all N shards of one batch into `out`, in the single-machine order.

    Refuses, naming the problem, shards of different assignments or batches, a missing or repeated
    shard, and a submission graded by no shard or by two.
    """
    if not folders:
        raise ShardError("no shard folders given")
    shards = [(Path(folder), *_read_shard(Path(folder))) for folder in folders]
    _, first, header, _ = shards[0]
    rows: dict[str, list[str]] = {}
    graded_by: dict[str, Path] = {}
    for folder, record, other_header, shard_rows in shards:
        if (record.assignment, record.count, record.batch) != (first.assignment, first.count, first.batch):
            raise ShardError(
                f"{folder} is a shard of another batch (assignment, shard count or submissions differ)"
            )
        if other_header != header:
            raise ShardError(f"{folder}: its gradebook has other columns than {shards[0][0]}'s")
        if set(shard_rows) != set(record.graded):
            raise ShardError(f"{folder}: its gradebook and shard.json list different submissions")
        for name, row in shard_rows.items():
            if name in graded_by:
                raise ShardError(f"{name} was graded twice: in {graded_by[name]} and in {folder}")
            graded_by[name], rows[name] = folder, row
    indices = sorted(record.index for _, record, _, _ in shards)
    if indices != list(range(1, first.count + 1)):
        missing = sorted(set(range(1, first.count + 1)) - set(indices))
        raise ShardError(f"expected shards 1..{first.count} once each; missing {missing}, given {indices}")
    ungraded = [name for name in first.batch if name not in rows]
    if ungraded:
        raise ShardError(f"no shard graded {', '.join(ungraded)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows[name] for name in first.batch)
    return out
