# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Week 2 seminar: experiment tracking, pipelines and tests
#
# A training script that worked once is not yet a project. A month later you want to know which settings
# gave the model you shipped, to rerun one step without redoing the others, and to change the code without
# breaking what worked. This seminar takes a small project that does all three and runs it:
#
# 1. **The project**: an image classifier in small modules, configured with Hydra.
# 2. **A pipeline you can rerun by its parts**: DVC runs `prepare -> train -> evaluate`, records what each
#    stage read and wrote, reruns only what a change affects, and moves data and models to a remote.
# 3. **Experiment tracking**: what the training run logs to Weights & Biases, offline, and where it lives.
# 4. **Testing deep-learning code**: fixtures, parametrisation, property-based tests with hypothesis, and
#    tests of random code with seeds and tolerances derived from the statistics.
#
# The project is `week02_management_and_testing/example_project/`; this notebook calls it (its command
# lines, and its functions) rather than repeating its code, so read its files beside the notebook. Its
# [README](example_project/README.md) is a tour. Everything runs on a CPU, offline: the data is generated,
# W&B writes its runs to files, and DVC's remote is a folder. Cells that state a fact check it with `assert`.

# %% tags=["parameters"]
import os

import torch

# SMALL: fewer images (1000/200 instead of 2000/500; a laptop, CI). `effdl seminar --small/--full` and CI set EFFDL_SMALL.
# This week has no GPU part: its full size runs on a CPU in a couple of minutes.
SMALL = os.environ.get("EFFDL_SMALL", "1") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# %%
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from IPython.display import Image, display

from common.weeks import REPO_ROOT

SOURCE = REPO_ROOT / "week02_management_and_testing" / "example_project"
# A fresh copy of the project under build/ (ignored by git): the seminar's runs never touch the sources,
# and every run of the notebook starts from nothing, as a new clone would.
PROJECT = REPO_ROOT / "build" / "week02_management_and_testing" / "example_project"
shutil.rmtree(PROJECT.parent, ignore_errors=True)
shutil.copytree(  # the sources only: nothing that running the project or its tests makes
    SOURCE,
    PROJECT,
    ignore=shutil.ignore_patterns(
        "outputs",
        "dvc-remote",
        "dvc.lock",
        "__pycache__",
        ".coverage",
        ".hypothesis",
        ".pytest_cache",
        "tmp",
        "cache",
    ),
)
sys.path.insert(0, str(PROJECT))  # the project's modules, for the cells that call its functions

ENV = {
    **os.environ,
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # DVC calls `python`
    "DVC_NO_ANALYTICS": "1",  # belt and braces: the project's .dvc/config turns analytics off too
    "WANDB_MODE": "offline",
    "OMP_NUM_THREADS": "1",  # a small model: one thread per process is faster than two fighting
    "PY_COLORS": "0",  # pytest's output without colour codes
}
RESULTS: dict[str, str] = {}  # one line per key result; the summary cell at the end prints them


def sh(command: str, show: bool = True) -> str:
    """Run a shell command in the project's copy; print its output (paths relative to the repository)."""
    started = time.perf_counter()
    done = subprocess.run(command, shell=True, cwd=PROJECT, env=ENV, capture_output=True, text=True)
    output = (done.stdout + done.stderr).replace(f"{REPO_ROOT}/", "")
    if show:
        print(f"$ {command}   ({time.perf_counter() - started:.1f} s)\n{output.rstrip()}")
    assert done.returncode == 0, f"`{command}` failed with exit code {done.returncode}"
    return output


size = "small" if SMALL else "full"
print(f"sizes: {size}; the project's copy: {PROJECT.relative_to(REPO_ROOT)}; torch {torch.__version__}")

# %% [markdown]
# ## 1. The project
#
# Each module does one job and fits on a screen or two: you can read the project in one sitting, and each
# part can be tested on its own.

# %%
for path in sorted(SOURCE.rglob("*")):
    if path.is_file() and path.suffix in {".py", ".yaml"} and "tests" not in path.parts:
        name = path.relative_to(SOURCE)
        doc = (
            path.read_text().split('"""')[1].splitlines()[0]
            if path.suffix == ".py" and '"""' in path.read_text()
            else ""
        )
        print(f"{str(name):30} {len(path.read_text().splitlines()):4} lines  {doc[:70]}")
module_lines = [len(p.read_text().splitlines()) for p in (SOURCE / "classifier").glob("*.py")]
assert max(module_lines) < 120, "every module fits on a screen or two"

# %% [markdown]
# `conf/config.yaml` holds every setting with its default, and `conf/data/` one file per dataset; Hydra
# composes them and applies overrides from the command line (`python -m classifier.train train.epochs=5
# data=cifar10`). The stages also expose a `run(cfg)` function, so tests and this notebook can call them
# with a configuration built by the same composition:

# %%
from classifier.config import load_config
from omegaconf import OmegaConf

cfg = load_config(["train.epochs=5", "data=cifar10"])
print(OmegaConf.to_yaml(cfg.data), OmegaConf.to_yaml(cfg.train), sep="")
assert cfg.train.epochs == 5 and cfg.data.hflip == 0.5 and load_config().data.name == "synthetic"

# %% [markdown]
# The default data is generated: class c is a grating at angle c·π/10 under noise, deterministic from the
# seed, so nothing is downloaded. With `data=cifar10` the project reads CIFAR-10's files with
# `common.data.load_cifar10`, and never downloads them behind your back. If they are not there, the error
# says what to put where, and nothing falls back to generated data:

# %%
from classifier import prepare

from common.data import DatasetNotFoundError

cwd = os.getcwd()
os.chdir(PROJECT)  # the configuration's paths are relative to the project, as when a stage runs
try:
    prepare.run(load_config(["data=cifar10", "data.root=outputs/no-cifar-here"]))
    missing = None
except DatasetNotFoundError as error:
    missing = error
finally:
    os.chdir(cwd)
print(missing)
assert missing is not None and "outputs/no-cifar-here/cifar-10-batches-py/" in str(missing)

# %% [markdown]
# ## 2. A pipeline you can rerun by its parts: DVC
#
# `dvc.yaml` declares three stages. Each lists what it depends on (`deps`: code, config, the previous
# stage's output), the parameters it reads from `params.yaml`, and what it produces (`outs`, `metrics`).
# `dvc repro` runs a stage only when one of those changed since the run recorded in `dvc.lock`, where DVC
# keeps the hash of every dependency and output. The commands pass the values of `params.yaml` to Hydra as
# overrides, so `params.yaml` is the one place where the pipeline's settings change.

# %%
print((PROJECT / "dvc.yaml").read_text().split("stages:", 1)[1][:760], "...")
sh("dvc dag")

# %% [markdown]
# For this run we set the sizes in `params.yaml` (small sizes for CI; the full run keeps the committed
# values), then reproduce the pipeline from nothing. All three stages run:

# %%
params = yaml.safe_load((PROJECT / "params.yaml").read_text())
if SMALL:
    params["data"].update(num_train=1000, num_test=200)
(PROJECT / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
EPOCHS = params["train"]["epochs"]

first = sh("dvc repro")
ran = re.findall(r"Running stage '(\w+)'", first)
assert ran == ["prepare", "train", "evaluate"]
metrics = json.loads((PROJECT / "outputs/metrics/eval.json").read_text())
RESULTS["pipeline"] = (
    f"{params['data']['num_train']} training images, {EPOCHS} epoch(s): test accuracy {metrics['accuracy']:.3f}"
)

# %% [markdown]
# Run it again, with nothing changed: DVC compares the hashes of every dependency with those in `dvc.lock`
# and skips every stage, in about the time it takes to start.

# %%
again = sh("dvc repro")
assert re.findall(r"Running stage", again) == [] and len(re.findall(r"didn't change, skipping", again)) == 3

# %% [markdown]
# Now double the number of epochs in `params.yaml`. `prepare` does not read `train.epochs`, so its data is
# still valid and it is skipped; `train` reads it and reruns, and `evaluate` reruns because its dependency,
# the model, changed. (`dvc metrics show` prints the metrics files the stages wrote; here we read them.)

# %%
params["train"]["epochs"] = 2 * EPOCHS
(PROJECT / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
changed = sh("dvc repro")
assert re.findall(r"Stage '(\w+)' didn't change", changed) == ["prepare"]
assert re.findall(r"Running stage '(\w+)'", changed) == ["train", "evaluate"]
longer = json.loads((PROJECT / "outputs/metrics/eval.json").read_text())
print(
    f"test accuracy after {EPOCHS} epoch(s): {metrics['accuracy']:.3f}; after {2 * EPOCHS}: {longer['accuracy']:.3f}"
)
assert longer["accuracy"] > metrics["accuracy"], "more epochs, better test accuracy"
RESULTS["more epochs"] = (
    f"{2 * EPOCHS} epochs instead of {EPOCHS}: test accuracy {metrics['accuracy']:.3f} -> "
    f"{longer['accuracy']:.3f}; only train and evaluate reran"
)

# %% [markdown]
# In a git repository you would commit `params.yaml` and `dvc.lock` now: together with the code they say
# exactly how the outputs were made. The outputs themselves (data, models) do not go into git; DVC keeps
# them in its cache (`.dvc/cache`, content-addressed by hash) and copies them to a **remote**: S3, GCS, SSH,
# or here a folder. `dvc push` uploads what the remote lacks; on another machine (or after a clean-up),
# `dvc pull` brings back exactly the files `dvc.lock` names.

# %%
import hashlib


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


outs = [PROJECT / "outputs/data/train.pt", PROJECT / "outputs/data/test.pt", PROJECT / "outputs/model.pt"]
before = [md5(path) for path in outs]
sh("dvc push")
shutil.rmtree(PROJECT / "outputs/data")
(PROJECT / "outputs/model.pt").unlink()
shutil.rmtree(PROJECT / ".dvc/cache")  # as on a fresh clone: no data, no model, no cache
print("deleted:", *(path.relative_to(REPO_ROOT) for path in [*outs, PROJECT / ".dvc/cache"]), sep="\n  ")
sh("dvc pull")
assert [md5(path) for path in outs] == before, "pull restores the very same bytes"
print("restored, byte for byte:", *(path.relative_to(REPO_ROOT) for path in outs), sep="\n  ")
RESULTS["push/pull"] = "after deleting data, model and cache, `dvc pull` restored the same bytes"

# %% [markdown]
# ## 3. Experiment tracking: Weights & Biases, offline
#
# What to log, and why:
#
# - **the whole configuration** (every hyper-parameter, the data source, the seed): to know later what made
#   a run, and to compare runs by it. The project logs Hydra's resolved config.
# - **metrics over time** (loss per step, loss and accuracy per epoch): a curve shows divergence, overfitting
#   or a learning rate that is too small, where a final number does not.
# - **samples of the inputs**, as the model sees them: most bugs of a pipeline are in the data (wrong
#   channel order, labels shifted against images, an augmentation that destroys the label).
# - **predictions**, right and wrong, with confidence: what the model gets wrong says what to try next.
# - system metrics (CPU, memory, GPU) W&B records by itself.
#
# `wandb.init(mode="offline")` writes all of it to a folder and needs no account and no network; every stage
# prints the `wandb sync` command that uploads its run later. The pipeline above ran with W&B offline, so
# each `train` and `evaluate` left a run:

# %%
runs = sorted((PROJECT / "outputs/wandb").glob("offline-run-*"))
for run in runs:
    files = sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file() and "logs" not in p.parts)
    print(run.relative_to(REPO_ROOT), *files, sep="\n  ")
assert len(runs) == 4, "train and evaluate, twice"
sample = next(runs[-2].glob("files/media/images/samples/*.png"))
display(Image(filename=sample))

# %% [markdown]
# Above: the first 16 training images as `train` logged them, augmented as in training (16×16 pixels
# shifted by up to 2; the logged copy is padded in pixels, so black where they moved in, while the model sees
# the channel mean there; enlarged 4 times). The noise is strong on purpose,
# so that two epochs do not already reach 100%: the gratings are hard to see by eye, and the model's test
# accuracy above says how hard they are for it. Below: the table of predictions that `evaluate` logged, read
# back from its offline files.

# %%
table = json.loads(next(runs[-1].glob("files/media/table/test/*.table.json")).read_text())
print(table["columns"])
for row in table["data"][:6]:
    print(f"  label {row[1]}  predicted {row[2]}  confidence {row[3]:.2f}")
assert table["columns"] == ["image", "label", "prediction", "confidence"] and len(table["data"]) == 16

# %% [markdown]
# To upload a run, `wandb login` once and `wandb sync` its folder; `--dry-run` shows what it would send and
# touches nothing:

# %%
synced = sh(f"wandb sync --dry-run {runs[-1].relative_to(PROJECT)}")
assert "Would sync 1 run" in synced

# %% [markdown]
# ## 4. Testing deep-learning code
#
# A training run that finishes proves little: a wrong label order, a detached loss or a broken augmentation
# all still give a loss that goes down, just less. Tests catch them early, on a CPU, in seconds. The
# project's tests (`example_project/tests/`) use four tools:
#
# - **fixtures** (`tests/conftest.py`): a tiny configuration whose outputs go to a temporary folder, shared
#   by every test that needs one;
# - **parametrisation**: one test body over shapes, probabilities, devices;
# - **properties** with hypothesis: instead of three hand-picked inputs, a rule that must hold for *any*
#   input ("accuracy is the trace of the confusion matrix over n"; "a crop is a shift of at most `padding`
#   pixels"), checked on 50 generated ones per test, with a failing input shrunk to the smallest;
# - **a seeded run that overfits one batch**: a model that can learn must memorise 16 images; if the loss
#   does not fall below 0.05, something between the data and the optimizer is broken.
#
# Writing them paid off at once: hypothesis found that `channel_stats` returned NaN for a batch of one
# pixel (the unbiased standard deviation of one value divides by zero). The suite, with a coverage report:

# %%
if SMALL:  # CI: the course's tests/test_week02_project.py runs this suite already; here it would cost ~10 s
    print("(small size: the suite runs at full size, and in the course's tests/test_week02_project.py)")
else:
    report = sh("python -m pytest -q -p no:cacheprovider", show=False)
    print(report[report.index("Name") :].rstrip())
    passed = int(re.search(r"(\d+) passed", report).group(1))
    coverage = int(re.search(r"^TOTAL\s.*?(\d+)%$", report, re.MULTILINE).group(1))
    assert coverage == 100, "every line and branch of classifier/ runs in some test"
    RESULTS["tests"] = f"{passed} passed, coverage {coverage}% of classifier/"

# %% [markdown]
# ### Testing random code
#
# Augmentation and dropout are random on purpose. Two ways to test them:
#
# 1. **Fix the seed** where the result must be reproducible (two runs with one seed give the same weights),
#    and test the edges where nothing is random (a flip with p=1 mirrors every image).
# 2. **Test the statistics** with a tolerance derived from them, not guessed. A flip with probability p over
#    n images flips a Binomial(n, p) number of them: mean np, standard deviation σ = √(np(1−p)). A test
#    that allows k·σ fails a correct flip with the two-sided normal tail probability P(|Z| > k).
#
# Here is what a guessed tolerance costs: the project's `random_hflip`, checked with 1σ and with 5σ, over
# 400 seeds.

# %%
from classifier.transforms import random_hflip

n, p = 1000, 0.5
pair = torch.arange(2, dtype=torch.uint8).view(1, 1, 1, 2).expand(n, 1, 1, 2)  # [0, 1]; flipped: [1, 0]
sigma = math.sqrt(n * p * (1 - p))
deviations = torch.tensor(
    [
        float((random_hflip(pair, p, torch.Generator().manual_seed(seed))[:, 0, 0, 0] == 1).sum()) - n * p
        for seed in range(400)
    ]
)
for k in (1, 5):
    fails = (deviations.abs() >= k * sigma).float().mean().item()
    expected = math.erfc(k / math.sqrt(2))  # P(|Z| >= k)
    print(
        f"tolerance {k}σ = {k * sigma:5.1f} flips: fails for {fails:6.1%} of seeds (normal tail: {expected:.1e})"
    )
fails_1, fails_5 = ((deviations.abs() >= k * sigma).float().mean().item() for k in (1, 5))
assert round(fails_1, 2) == 0.38 and fails_5 == 0.0
assert round(math.erfc(1 / math.sqrt(2)), 2) == 0.32 and math.erfc(5 / math.sqrt(2)) < 1e-6
off = n * 0.5 - n * 0.4  # a bug that flips with p = 0.4 instead of 0.5
buggy = torch.tensor(
    [
        float((random_hflip(pair, 0.4, torch.Generator().manual_seed(seed))[:, 0, 0, 0] == 1).sum()) - n * p
        for seed in range(400)
    ]
)
caught = (buggy.abs() >= 5 * sigma).float().mean().item()
print(f"a flip with p = 0.4 instead of 0.5: {off:.0f} flips short on average, {off / sigma:.1f}σ; "
      f"the 5σ test fails it for {caught:.0%} of seeds")  # fmt: skip
assert off / sigma > 6 and 0.85 < caught < 1.0
RESULTS["tolerances"] = f"a 1σ tolerance fails {fails_1:.0%} of seeds, 5σ none of 400"

# %% [markdown]
# With 1σ, 38% of the seeds fail a correct flip (the normal tail says 32%; 400 seeds are a noisy estimate):
# a flaky test, which teaches everyone to rerun red CI until it is green. With 5σ, the chance is below one in
# a million, and a real bug still fails it most of the time: a flip with probability 0.4 instead of 0.5 is 100
# flips short on average at n = 1000, more than 6σ, only about 1σ past the bound, so it is caught for the
# share of seeds printed above, not always. A larger n separates smaller bugs, since σ grows only as √n.
#
# The same reasoning for dropout, and the other tools, in a test file written here (in a project it would
# sit in `tests/`). One test runs on every device: `cuda` is a parameter that skips, with its reason, where
# there is no GPU, so the same suite checks a GPU runner.

# %%
TEST_FILE = '''
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from classifier.metrics import accuracy
from classifier.model import ConvNet

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.fixture
def model() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet(num_classes=3, width=8, dropout=0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_the_model_gives_one_row_of_logits_per_image(model: ConvNet, device: str) -> None:
    assert model.to(device)(torch.randn(4, 3, 16, 16, device=device)).shape == (4, 3)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keeps_the_mean(p: float) -> None:
    """Inverted dropout: each value becomes 0 or 1/(1-p), variance p/(1-p); the mean of n has standard
    error sqrt(p/(1-p)/n), and 5 of them is the tolerance."""
    n = 200_000
    torch.manual_seed(0)
    out = torch.nn.functional.dropout(torch.ones(n), p=p, training=True)
    assert abs(out.mean().item() - 1) < 5 * math.sqrt(p / (1 - p) / n)


@settings(deadline=None, max_examples=50)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=30))
def test_predicting_the_labels_scores_one(labels: list[int]) -> None:
    labels = torch.tensor(labels)
    assert accuracy(labels, labels) == 1.0
'''
(PROJECT / "tests" / "test_seminar.py").write_text(TEST_FILE)
output = sh("python -m pytest -q -p no:cacheprovider --no-cov -rs tests/test_seminar.py")
counts = dict((kind, int(number)) for number, kind in re.findall(r"(\d+) (passed|skipped)", output))
assert counts == ({"passed": 6} if torch.cuda.is_available() else {"passed": 5, "skipped": 1})

# %% [markdown]
# ## Summary
#
# - A project that others (and you, later) can rerun: small modules with one job, every setting in a Hydra
#   config that the command line can override, data that says where it came from.
# - DVC's `dvc.yaml` makes the steps a pipeline: `dvc repro` reruns only what a change affects (here,
#   doubling the epochs reran `train` and `evaluate`, not `prepare`), `dvc.lock` records what made each
#   output, and `dvc push`/`pull` move data and models through a remote.
# - Track every run: config, curves, input samples, predictions. W&B offline keeps them in files until
#   `wandb sync`.
# - Tests that catch the bugs of training code: properties over generated inputs (hypothesis), a model
#   that must overfit one batch, fixed seeds where runs must repeat, and tolerances from the statistics
#   where they must not.

# %% tags=["summary"]
for key, line in RESULTS.items():
    print(f"{key}: {line}")
