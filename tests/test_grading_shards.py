"""Grading a batch in slices (`effdl grade --shard K/N`) and merging them (`effdl gradebook merge`).

The contract: the merged gradebook of all N shards is byte for byte the one a single machine writes, and a
merge of shards that do not make up one whole batch is refused with the reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from grading_toy import REFERENCE, write_toy_assignment
from rich.console import Console

from common.grading.grade import grade
from common.grading.manifest import load_assignment
from common.grading.shard import Shard, ShardError, merge_gradebooks
from common.grading.solutions import reference_source, starter_source


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3", "takes K/N"),
        ("a/b", "takes K/N"),
        ("0/4", "between 1 and N = 4"),
        ("5/4", "between 1 and N = 4"),
    ],
)
def test_a_bad_shard_value_names_the_form(text: str, message: str) -> None:
    with pytest.raises(ShardError, match=message):
        Shard.parse(text)


def test_shards_are_disjoint_and_cover_the_batch() -> None:
    batch = list(range(11))
    slices = [Shard(k, 4).take(batch) for k in range(1, 5)]
    assert sorted(sum(slices, [])) == batch and slices[0] == [0, 4, 8]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory):
    """One small batch graded whole and in 2 shards (the same names twice: made unique before slicing)."""
    root = tmp_path_factory.mktemp("shards")
    assignment = load_assignment(write_toy_assignment(root))
    submissions = root / "submissions"
    for name, source in [
        ("alice", reference_source(REFERENCE, "ops.py")),
        ("bob", starter_source(REFERENCE, "ops.py")),
    ]:
        (submissions / name / "toy").mkdir(parents=True)
        (submissions / name / "toy" / "ops.py").write_text(source)
    (submissions / "carol.zip").write_bytes(b"not a zip")  # refused at intake
    quiet = Console(quiet=True)
    paths = [submissions, submissions / "alice"]  # alice twice: the second becomes alice-2
    grade(assignment, paths, root / "whole", jobs=2, gpus=[], console=quiet)
    for k in (1, 2):
        grade(assignment, paths, root / f"shard-{k}", jobs=2, gpus=[], console=quiet, shard=Shard(k, 2))
    return root


@pytest.mark.slow
def test_merged_shards_reproduce_the_single_machine_gradebook(sharded: Path) -> None:
    merged = merge_gradebooks([sharded / "shard-2", sharded / "shard-1"], sharded / "merged.csv")
    assert merged.read_bytes() == (sharded / "whole" / "gradebook.csv").read_bytes()
    names = [line.split(",")[0] for line in merged.read_text().splitlines()[1:]]
    assert names == ["alice", "bob", "carol", "alice-2"]
    assert "not a readable zip archive" in merged.read_text()  # refused at intake, the batch went on
    record = json.loads((sharded / "shard-1" / "shard.json").read_text())
    assert record["graded"] == ["alice", "carol"] and record["batch"] == names


@pytest.mark.slow
def test_a_merge_that_is_not_one_whole_batch_is_refused(sharded: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=r"expected shards 1..2 once each; missing \[2\]"):
        merge_gradebooks([sharded / "shard-1"], tmp_path / "m.csv")
    with pytest.raises(ShardError, match="graded twice"):
        merge_gradebooks([sharded / "shard-1", sharded / "shard-1"], tmp_path / "m.csv")
    with pytest.raises(ShardError, match="no shard.json"):
        merge_gradebooks([sharded / "whole", sharded / "shard-2"], tmp_path / "m.csv")
    other = tmp_path / "other"
    shutil.copytree(sharded / "shard-2", other)
    record = json.loads((other / "shard.json").read_text())
    (other / "shard.json").write_text(json.dumps({**record, "batch": record["batch"][:-1]}))
    with pytest.raises(ShardError, match="shard of another batch"):
        merge_gradebooks([sharded / "shard-1", other], tmp_path / "m.csv")
