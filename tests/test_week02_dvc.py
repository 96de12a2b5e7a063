"""Week 2's DVC pipeline and its W&B runs, in a copy of the example project, without a network.

One module fixture plays the whole story once (the pipeline's stages are processes that import torch, so
each costs seconds); each test checks one part of it.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from filelock import FileLock
from week02_project import PROJECT, copy_project, dvc, run_offline

STAGES = ("prepare", "train", "evaluate")
OUTS = ("outputs/data/train.pt", "outputs/data/test.pt", "outputs/model.pt")


def ran(output: str) -> list[str]:
    """The stages a `dvc repro` ran, in order."""
    return re.findall(r"Running stage '(\w+)'", output)


def skipped(output: str) -> list[str]:
    return re.findall(r"Stage '(\w+)' didn't change, skipping", output)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> dict[str, object]:
    """The story, played once per test session even where pytest-xdist spreads this module's tests over
    several workers (without --dist loadfile): the first worker plays it, the others read its results."""
    if worker_id == "master":  # no xdist
        result = play_story(tmp_path_factory.mktemp("dvc"))
    else:
        shared = tmp_path_factory.getbasetemp().parent  # this session's folder, common to all its workers
        with FileLock(shared / "week02_dvc_story.lock"):
            saved = shared / "week02_dvc_story.json"
            if not saved.is_file():
                saved.write_text(json.dumps(play_story(shared / "week02_dvc")))
            result = json.loads(saved.read_text())
    result["project"] = Path(result["project"])
    return result


def play_story(folder: Path) -> dict[str, object]:
    """repro; repro again; change train.epochs and repro; push; delete outputs and cache; pull."""
    project = copy_project(folder / "project")
    remote = folder / "remote"
    remote.mkdir(parents=True)

    def run(*args: str, wandb_mode: str = "disabled") -> str:
        done = run_offline(dvc(*args), cwd=project, WANDB_MODE=wandb_mode)
        assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(num_train=256, num_test=64)  # toy size; the stages are what is tested
    params["train"]["epochs"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    # The remote for this copy, in the file that `dvc remote add --local` writes (one dvc process less).
    (project / ".dvc" / "config.local").write_text(f"['remote \"local\"']\n    url = {remote}\n")

    result: dict[str, object] = {"project": str(project)}
    result["first"] = run("repro", wandb_mode="offline")  # the W&B runs of train and evaluate: tests below
    result["hashes"] = {out: md5(project / out) for out in OUTS}
    result["second"] = run("repro")
    params["train"]["epochs"] = 2
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result["changed"] = run("repro")
    result["hashes"] = {out: md5(project / out) for out in OUTS}
    result["push"] = run("push")
    shutil.rmtree(project / "outputs" / "data")
    (project / "outputs" / "model.pt").unlink()
    shutil.rmtree(project / ".dvc" / "cache")
    result["pull"] = run("pull")
    return result


def test_the_pipeline_runs_its_stages_in_order(story: dict[str, object]) -> None:
    assert ran(story["first"]) == list(STAGES)
    project = story["project"]
    for name in ("train", "eval"):
        metrics = yaml.safe_load((project / "outputs" / "metrics" / f"{name}.json").read_text())
        assert 0.0 <= metrics["accuracy"] <= 1.0


def test_a_second_repro_reruns_nothing(story: dict[str, object]) -> None:
    assert ran(story["second"]) == []
    assert sorted(skipped(story["second"])) == sorted(STAGES)


def test_a_changed_parameter_reruns_only_the_stages_after_it(story: dict[str, object]) -> None:
    assert skipped(story["changed"]) == ["prepare"]
    assert ran(story["changed"]) == ["train", "evaluate"]


def test_push_and_pull_restore_the_outputs(story: dict[str, object]) -> None:
    assert re.search(r"\d+ files? pushed", story["push"]), story["push"]
    project = story["project"]
    assert {out: md5(project / out) for out in OUTS} == story["hashes"]


def test_dvc_is_configured_not_to_phone_home() -> None:
    """Analytics and the update check are off in the project's own config, not only in these tests' env."""
    config = configparser.ConfigParser()
    config.read(PROJECT / ".dvc" / "config")
    assert config["core"]["analytics"] == "false" and config["core"]["check_update"] == "false"
    assert config["core"]["no_scm"] == "true"


def test_offline_wandb_runs_leave_their_files(story: dict[str, object]) -> None:
    """train and evaluate each leave an offline run with its config, metrics, images and table, and print
    the command that uploads it."""
    project = story["project"]
    runs = sorted((project / "outputs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    for folder in runs:
        assert f"wandb sync {folder.relative_to(project)}" in story["first"]
    train, evaluate = (
        (folder / f"run-{folder.name.rsplit('-', 1)[1]}.wandb").read_bytes() for folder in runs
    )
    # Protobuf records: the keys are stored as plain strings.
    for key in (b"train/loss", b"train/step_loss", b"samples/train", b"crop_padding", b"num_train"):
        assert key in train, f"{key!r} is not in the train stage's run"
    for key in (b"test/accuracy", b"test/predictions"):
        assert key in evaluate, f"{key!r} is not in the evaluate stage's run"
    assert list(runs[0].glob("files/media/images/samples/train_*.png")), "the sample images"
    assert list(runs[1].glob("files/media/table/test/predictions_*.table.json")), "the predictions"


def test_wandb_sync_is_the_documented_way_to_upload(story: dict[str, object]) -> None:
    project = story["project"]
    help_text = run_offline(["wandb", "sync", "--help"], cwd=project)
    assert help_text.returncode == 0 and "Upload existing local W&B run data" in help_text.stdout
    folder = sorted((project / "outputs" / "wandb").glob("offline-run-*"))[0].relative_to(project)
    dry = run_offline(["wandb", "sync", "--dry-run", str(folder)], cwd=project)  # lists, uploads nothing
    assert dry.returncode == 0 and "Would sync 1 run" in dry.stdout + dry.stderr, dry.stdout + dry.stderr
