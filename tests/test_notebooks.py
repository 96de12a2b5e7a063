"""The seminar pipeline: pairing, headless execution, recording, and the staleness check."""

from __future__ import annotations

import asyncio
import shutil

import pytest

# A GPU runner may have only PyTorch's stack; `pytest -m gpu` must still collect this file (it has no GPU
# tests). In the course environment these packages are always present, and the skip would show in -ra.
nbformat = pytest.importorskip("nbformat", reason="the notebook packages of the course environment")
pytest.importorskip("jupytext", reason="the notebook packages of the course environment")

from common import notebooks  # noqa: E402  (needs jupytext)
from common.environment import locked_versions  # noqa: E402
from common.notebooks import SeminarError  # noqa: E402
from common.weeks import AWAITING_GPU_RECORDING, Week, get_week, weeks_with_seminar  # noqa: E402

TINY_SEMINAR = """# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A tiny seminar

# %% tags=["parameters"]
import os
SMALL = os.environ.get("EFFDL_SMALL", "1") == "1"
DEVICE = "cpu"

# %%
n = 10 if SMALL else 1000
total = sum(range(n))
assert total == n * (n - 1) // 2

# %% tags=["summary"]
print(f"n = {n}, total = {total}")
"""


@pytest.fixture
def tiny_week(tmp_path) -> Week:
    week = Week("week01_intro", "a tiny stand-in", root=tmp_path)
    week.dir.mkdir()
    week.seminar_py.write_text(TINY_SEMINAR)
    return week


def pretend_full_gpu_run(run: notebooks.SeminarRun) -> notebooks.SeminarRun:
    run.notebook.metadata["effdl"].update(small=False, device="NVIDIA H100 80GB HBM3")
    run.small = False
    return run


@pytest.mark.parametrize("week", weeks_with_seminar(), ids=lambda week: week.name)
def test_committed_notebook_belongs_to_its_source(week: Week) -> None:
    """The committed outputs come from a full GPU run of exactly this seminar.py."""
    assert notebooks.staleness_problems(week) == []


@pytest.mark.parametrize("week", weeks_with_seminar(), ids=lambda week: week.name)
def test_saving_in_jupyterlab_leaves_both_files_unchanged(week: Week, tmp_path) -> None:
    """Open and save seminar.ipynb through the contents manager that serves JupyterLab's contents API
    (jupytext's, which also writes the paired seminar.py): a save without edits changes neither file."""
    contents = pytest.importorskip("jupytext.async_contentsmanager", reason="jupytext's Jupyter extension")
    for path in (week.seminar_py, week.seminar_ipynb):
        shutil.copy(path, tmp_path / path.name)
    manager = contents.AsyncTextFileContentsManager(root_dir=str(tmp_path))

    async def open_and_save() -> None:
        model = await manager.get(week.seminar_ipynb.name, content=True)
        await manager.save(model, week.seminar_ipynb.name)

    asyncio.run(open_and_save())
    assert (tmp_path / week.seminar_py.name).read_text() == week.seminar_py.read_text()
    assert (tmp_path / week.seminar_ipynb.name).read_text() == week.seminar_ipynb.read_text()


@pytest.mark.parametrize("week", weeks_with_seminar(), ids=lambda week: week.name)
def test_seminar_starts_with_a_parameters_cell(week: Week) -> None:
    code_cells = [cell for cell in notebooks.read_source(week).cells if cell.cell_type == "code"]
    first = code_cells[0]
    assert "parameters" in first.metadata.get("tags", [])
    assert "SMALL =" in first.source and "EFFDL_SMALL" in first.source and "DEVICE =" in first.source
    assert any("summary" in cell.metadata.get("tags", []) for cell in code_cells)


def test_execute_small_writes_outputs_summary_and_metadata(tiny_week: Week, tmp_path) -> None:
    progress = []
    run = notebooks.execute(
        tiny_week, small=True, out_dir=tmp_path / "out", on_cell_done=lambda *p: progress.append(p)
    )
    assert run.summary == "n = 10, total = 45"
    assert progress[-1] == (3, 3)
    stored = nbformat.read(run.path, as_version=4)
    meta = stored.metadata["effdl"]
    assert meta["small"] is True and meta["device"] == "cpu"
    assert meta["source_sha256"] == notebooks.source_hash(notebooks.read_source(tiny_week))
    assert {"python", "torch", "numpy"} <= set(meta["versions"])


def test_execute_full_sets_the_environment_variable(tiny_week: Week, tmp_path) -> None:
    run = notebooks.execute(tiny_week, small=False, out_dir=tmp_path)
    assert run.summary == "n = 1000, total = 499500"


def test_failing_cell_names_the_cell_and_keeps_the_partial_notebook(tiny_week: Week, tmp_path) -> None:
    tiny_week.seminar_py.write_text(TINY_SEMINAR.replace("assert total ==", "assert total != "))
    with pytest.raises(SeminarError, match=r"failed in code cell 2 of 3: AssertionError") as error:
        notebooks.execute(tiny_week, small=True, out_dir=tmp_path)
    assert "partial notebook" in str(error.value)
    assert (tmp_path / "week01_intro_seminar.ipynb").is_file()


def test_record_refuses_small_or_cpu_runs(tiny_week: Week, tmp_path) -> None:
    run = notebooks.execute(tiny_week, small=True, out_dir=tmp_path)
    with pytest.raises(SeminarError, match="full-size GPU run"):
        notebooks.record(run)
    assert not tiny_week.seminar_ipynb.exists()


@pytest.fixture
def cpu_full_week(tmp_path) -> Week:
    """A stand-in for week 4, whose full size runs on a CPU (4 gloo ranks): a full CPU run is a real run."""
    week = Week("week04_data_parallel", "a tiny stand-in", root=tmp_path)
    week.dir.mkdir()
    week.seminar_py.write_text(TINY_SEMINAR)
    assert week.full_on_cpu
    return week


def test_a_full_cpu_run_is_recorded_and_fresh_where_the_week_runs_full_on_a_cpu(
    cpu_full_week: Week, tmp_path
) -> None:
    run = notebooks.execute(cpu_full_week, small=False, out_dir=tmp_path)
    run.notebook.metadata["effdl"]["device"] = "cpu"  # as on a machine without a GPU
    notebooks.record(run)
    assert notebooks.staleness_problems(cpu_full_week) == []


def test_a_small_cpu_run_stands_only_for_a_week_awaiting_its_gpu_recording(tmp_path, monkeypatch) -> None:
    week = Week("week09_inference_algorithms", "a tiny stand-in", root=tmp_path)
    week.dir.mkdir()
    week.seminar_py.write_text(TINY_SEMINAR)
    monkeypatch.setattr("common.weeks.AWAITING_GPU_RECORDING", {})
    with pytest.raises(SeminarError, match="must hold a full-size GPU run"):
        notebooks.record(notebooks.execute(week, small=True, out_dir=tmp_path / "a"))
    monkeypatch.setattr("common.weeks.AWAITING_GPU_RECORDING", {week.name: "its GPU sections"})
    notebooks.record(notebooks.execute(week, small=True, out_dir=tmp_path / "b"))
    assert notebooks.staleness_problems(week) == []


@pytest.mark.parametrize("name", sorted(AWAITING_GPU_RECORDING))
def test_weeks_awaiting_a_gpu_recording_are_listed_only_until_they_have_one(name: str) -> None:
    meta = nbformat.read(get_week(name).seminar_ipynb, as_version=4).metadata[notebooks.METADATA_KEY]
    assert meta["small"] or meta["device"] == "cpu", (
        f"{name}'s committed notebook is a full GPU run now: remove it from common.weeks.AWAITING_GPU_RECORDING"
    )


def test_a_recorded_notebook_is_what_jupyterlab_would_save(tiny_week: Week, tmp_path) -> None:
    """No jupytext.text_representation in a recorded notebook: the pair's metadata filter keeps it out."""
    notebooks.record(pretend_full_gpu_run(notebooks.execute(tiny_week, small=True, out_dir=tmp_path)))
    stored = nbformat.read(tiny_week.seminar_ipynb, as_version=4)
    assert stored.metadata["jupytext"] == notebooks.JUPYTEXT_METADATA


def test_a_small_run_is_refused_even_where_the_week_runs_full_on_a_cpu(cpu_full_week: Week, tmp_path) -> None:
    run = notebooks.execute(cpu_full_week, small=True, out_dir=tmp_path)
    with pytest.raises(
        SeminarError, match=r"a full-size run \(CPU or GPU\).*rerun with --full on a CPU or a GPU"
    ):
        notebooks.record(run)
    nbformat.write(run.notebook, cpu_full_week.seminar_ipynb)  # bypassing record()
    assert notebooks.staleness_problems(cpu_full_week) == [
        "week04_data_parallel: the stored outputs are not from a full-size run (CPU or GPU)"
    ]


def test_staleness_detects_edits_on_either_side(tiny_week: Week, tmp_path) -> None:
    assert "is missing" in notebooks.staleness_problems(tiny_week)[0]
    notebooks.record(pretend_full_gpu_run(notebooks.execute(tiny_week, small=True, out_dir=tmp_path)))
    assert notebooks.staleness_problems(tiny_week) == []

    # Edit the source: the stored outputs no longer belong to it, and the pair disagrees.
    tiny_week.seminar_py.write_text(TINY_SEMINAR.replace("1000", "2000"))
    problems = " ".join(notebooks.staleness_problems(tiny_week))
    assert "older seminar.py" in problems and "disagree" in problems

    # Sync the pair: inputs agree again, but the outputs are still those of the old source.
    notebooks.sync(tiny_week)
    problems = notebooks.staleness_problems(tiny_week)
    assert "older seminar.py" in problems[0]
    assert not any("disagree" in problem for problem in problems)


def test_staleness_detects_a_notebook_edited_alone(tiny_week: Week, tmp_path) -> None:
    notebooks.record(pretend_full_gpu_run(notebooks.execute(tiny_week, small=True, out_dir=tmp_path)))
    stored = nbformat.read(tiny_week.seminar_ipynb, as_version=4)
    stored.cells[2].source += "\nprint('edited in Jupyter, not synced')"
    nbformat.write(stored, tiny_week.seminar_ipynb)
    assert "disagree" in notebooks.staleness_problems(tiny_week)[0]


def test_staleness_rejects_outputs_from_a_cpu_run(tiny_week: Week, tmp_path) -> None:
    run = notebooks.execute(tiny_week, small=True, out_dir=tmp_path)
    nbformat.write(run.notebook, tiny_week.seminar_ipynb)  # bypassing record()
    assert notebooks.staleness_problems(tiny_week) == [
        "week01_intro: the stored outputs are not from a full-size GPU run"
    ]


def test_staleness_rejects_outputs_recorded_with_other_versions(tiny_week: Week, tmp_path) -> None:
    """A notebook recorded outside the locked environment (another numpy than uv.lock's) is stale."""
    notebooks.record(pretend_full_gpu_run(notebooks.execute(tiny_week, small=True, out_dir=tmp_path)))
    stored = nbformat.read(tiny_week.seminar_ipynb, as_version=4)
    pinned = locked_versions()["numpy"]
    stored.metadata["effdl"]["versions"]["numpy"] = "0.0.0"
    nbformat.write(stored, tiny_week.seminar_ipynb)
    assert notebooks.staleness_problems(tiny_week) == [
        f"week01_intro: numpy 0.0.0 recorded, uv.lock pins {pinned}; re-record in the locked environment "
        "(`uv sync --locked`)"
    ]


def test_sync_keeps_outputs_of_unchanged_cells(tiny_week: Week, tmp_path) -> None:
    notebooks.record(pretend_full_gpu_run(notebooks.execute(tiny_week, small=True, out_dir=tmp_path)))
    recorded = nbformat.read(tiny_week.seminar_ipynb, as_version=4)
    notebooks.sync(tiny_week)
    stored = nbformat.read(tiny_week.seminar_ipynb, as_version=4)
    # Both write exactly the committed jupytext header: no text representation, which a save would drop.
    assert recorded.metadata["jupytext"] == stored.metadata["jupytext"] == notebooks.JUPYTEXT_METADATA
    assert notebooks.summary_text(stored) == "n = 10, total = 45"
    assert stored.metadata["effdl"]["device"] == "NVIDIA H100 80GB HBM3"


def test_missing_seminar_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(SeminarError, match="has no seminar yet"):
        notebooks.read_source(Week("week06_fsdp", "", root=tmp_path))
