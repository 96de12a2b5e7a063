"""Task dvc: `dvc.yaml` declares the two stages with the right dependencies, and `dvc repro` runs them.

The pipeline file is read here as data (`yaml.safe_load`). The run happens in a fresh sandbox, on a copy of
the submission's tree: `dvc init --no-scm`, `dvc repro`, `dvc status`. The verdict does not rest on what those
commands print (the stages run the student's code, which could print anything): the run must exit 0, and the
`dvc.lock` it leaves must record, for every stage, the md5 of each dependency as this checker computes it from
the files it put in, and of each output as it computes it from the files that came back; and those outputs must
be what params.yaml asks for (as many points as `prepare.n`, as many training steps as `train` implies).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shlex
from typing import Any

import numpy as np
import planted
import pytest
import yaml

from common.grading.client import Submission

OUTPUTS = ("data/points.npy", "model.pt", "metrics.json")
SCRIPT = """set -e
export DVC_NO_ANALYTICS=1 DVC_SITE_CACHE_DIR="$TMPDIR/dvc-site-cache"
cp -r {src} project && cd project
chmod -R u+w .
dvc init --no-scm -q
dvc repro
dvc status --json > {outbox}/status.json
cp dvc.lock {outbox}/
for out in data/points.npy model.pt metrics.json; do
  if [ -f "$out" ]; then mkdir -p "{outbox}/$(dirname "$out")" && cp "$out" "{outbox}/$out"; fi
done
"""
REPRO_LIMIT_S = 180.0


def _stages(submission: Submission) -> dict[str, Any]:
    try:
        pipeline = yaml.safe_load(submission.source("dvc.yaml"))
    except yaml.YAMLError as error:
        raise AssertionError(f"dvc.yaml is not valid YAML: {str(error)[:200]}") from None
    stages = pipeline.get("stages") if type(pipeline) is dict else None
    assert type(stages) is dict, "dvc.yaml needs a `stages` mapping"
    return stages


def _paths(entries: Any) -> set[str]:
    """The paths of a deps/outs/metrics list: plain strings, or one-key mappings (`- metrics.json: {cache: false}`)."""
    if type(entries) is not list:
        return set()
    return {
        e if type(e) is str else next(iter(e))
        for e in entries
        if type(e) is str or (type(e) is dict and len(e) == 1)
    }


def _params(entries: Any, section: str) -> bool:
    """Whether a stage's params depend on `section` (the whole section, or some of its keys)."""
    names: set[str] = set()
    for entry in entries if type(entries) is list else []:
        if type(entry) is str:
            names.add(entry)
        elif type(entry) is dict:  # - params.yaml: [train.lr, ...]
            for keys in entry.values():
                names.update(k for k in keys or [] if type(k) is str)
    return any(name == section or name.startswith(section + ".") for name in names)


@pytest.mark.parametrize(
    "stage, module, deps, outs, section",
    [
        ("prepare", "ddpm2d.data", {"ddpm2d/data.py"}, {"data/points.npy"}, "prepare"),
        ("train", "ddpm2d.train", {"ddpm2d/train.py", "data/points.npy"}, {"model.pt"}, "train"),
    ],
)
def test_the_stage_is_declared_with_its_dependencies(
    submission: Submission, stage: str, module: str, deps: set[str], outs: set[str], section: str
) -> None:
    stages = _stages(submission)
    assert type(stages.get(stage)) is dict, f"dvc.yaml has no stage `{stage}` (it has {sorted(stages)})"
    declared = stages[stage]
    command = declared.get("cmd")
    words = shlex.split(command) if type(command) is str else []
    assert words[:3] in (["python", "-m", module], ["python3", "-m", module]), (
        f"stage `{stage}` must run `python -m {module} ...`; its cmd is {command!r}"
    )
    missing = deps - _paths(declared.get("deps"))
    assert not missing, f"stage `{stage}` must depend on {sorted(missing)}"
    assert _params(declared.get("params"), section), (
        f"stage `{stage}` must depend on the `{section}` parameters"
    )
    missing = outs - _paths(declared.get("outs"))
    assert not missing, f"stage `{stage}` must output {sorted(missing)}"
    if stage == "train":
        assert "metrics.json" in _paths(declared.get("metrics")), (
            "stage `train` must declare metrics.json as metrics"
        )


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_dvc_repro_runs_the_pipeline_and_leaves_it_up_to_date(submission: Submission) -> None:
    tree = {path: data for path, data in submission.tree().items() if not path.startswith(planted.TESTS)}
    run = submission.run_isolated(tree, ["sh", "-c", SCRIPT], time_limit_s=REPRO_LIMIT_S)
    assert not run.stopped and run.returncode == 0, (
        f"dvc repro did not finish cleanly ({run.stopped or f'exit code {run.returncode}'}): {run.output[-300:]}"
    )
    try:
        lock = yaml.safe_load(run.files.get("dvc.lock", b"").decode(errors="replace")) or {}
    except yaml.YAMLError:
        lock = {}
    stages = lock.get("stages") if type(lock) is dict else None
    assert type(stages) is dict and {"prepare", "train"} <= set(stages), (
        "dvc repro left no dvc.lock recording the stages prepare and train"
    )
    known = {path: _md5(data) for path, data in tree.items()}
    known.update({path: _md5(run.files[path]) for path in OUTPUTS if path in run.files})
    for name in ("prepare", "train"):
        for kind in ("deps", "outs"):
            for entry in stages[name].get(kind) or []:
                _check_locked(name, kind, entry, known)
    missing = [path for path in OUTPUTS if path not in run.files]
    assert not missing, f"dvc repro did not produce {missing}"
    assert run.files.get("status.json", b"").strip() in (b"{}", b""), (
        "dvc status reports changed stages after repro"
    )
    _check_outputs_follow_the_params(yaml.safe_load(tree["params.yaml"]), run.files)


def _check_locked(stage: str, kind: str, entry: Any, known: dict[str, str]) -> None:
    """One deps/outs entry of dvc.lock names a file the run had, with that file's md5.

    A folder (DVC records its md5 with a `.dir` suffix) is checked for being a folder of the tree only: the
    required dependencies are files, declared as such (`test_the_stage_is_declared_with_its_dependencies`)."""
    path, md5 = (entry.get("path"), entry.get("md5")) if type(entry) is dict else (None, None)
    if type(path) is str and type(md5) is str and md5.endswith(".dir"):
        assert any(known_path.startswith(path.rstrip("/") + "/") for known_path in known), (
            f"dvc.lock: stage {stage} lists the folder {path!r}, which the pipeline did not get"
        )
        return
    assert type(path) is str and path in known, (
        f"dvc.lock: stage {stage} lists {kind[:-1]} {path!r}, which the pipeline did not produce or get"
    )
    assert md5 == known[path], f"dvc.lock: the md5 of {path} is not that of the file: the pipeline is stale"


def _check_outputs_follow_the_params(params: dict[str, Any], files: dict[str, bytes]) -> None:
    """The points and the metrics are what params.yaml asks for: the stages ran with its values."""
    try:
        points = np.load(io.BytesIO(files["data/points.npy"]), allow_pickle=False)
    except ValueError as error:
        raise AssertionError(f"data/points.npy is not a NumPy array file: {error}") from None
    n = params["prepare"]["n"]
    assert points.shape == (n, 2), f"data/points.npy has shape {points.shape}; params.yaml asks for ({n}, 2)"
    try:
        metrics = json.loads(files["metrics.json"])
    except ValueError:
        metrics = None
    train = params["train"]
    steps = train["epochs"] * math.ceil(n / train["batch_size"])
    assert type(metrics) is dict and metrics.get("steps") == steps, (
        f"metrics.json should record steps={steps} (epochs x batches per epoch of params.yaml); it has {metrics}"
    )
    loss = metrics.get("final_epoch_loss")
    assert type(loss) is float and math.isfinite(loss), f"metrics.json: final_epoch_loss is {loss!r}"
