"""The seminar pipeline: `seminar.py` (jupytext percent) is the source; `seminar.ipynb` is its paired notebook.

- `sync` writes the notebook from the source, keeping the outputs of cells that did not change.
- `execute` runs a seminar headless, small (CPU, CI) or full (GPU), and writes the executed notebook.
- `record` stores a full-size GPU run in the committed `seminar.ipynb`, with metadata that ties the outputs to
  the exact source (a hash of its cells), the GPU and the library versions. A week whose full size is meant for
  a CPU too (`Week.full_on_cpu`, week 4's gloo ranks) may store a full-size CPU run.
- `staleness_problems` says why a committed notebook no longer belongs to its source; a test asserts none.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import jupytext
import nbformat
from jupytext.combine import combine_inputs_with_outputs
from nbformat import NotebookNode

from common.errors import EffdlError
from common.weeks import Week

SMALL_ENV_VAR = "EFFDL_SMALL"
METADATA_KEY = "effdl"
SUMMARY_TAG = "summary"
PAIRED_FORMATS = "ipynb,py:percent"
# The jupytext header of both files. Without the filter, saving in JupyterLab writes jupytext's version and
# format version into seminar.py's header, so a student's first save changed a committed file.
JUPYTEXT_METADATA = {"formats": PAIRED_FORMATS, "notebook_metadata_filter": "-jupytext.text_representation"}


class SeminarError(EffdlError):
    """A seminar failed to execute, or its committed notebook is out of date."""


def read_source(week: Week) -> NotebookNode:
    """The seminar as a notebook without outputs, read from `seminar.py`."""
    if not week.seminar_py.is_file():
        raise SeminarError(f"{week.name} has no seminar yet ({week.seminar_py.name} is missing)")
    return jupytext.read(week.seminar_py)


def _cells_fingerprint(nb: NotebookNode) -> list[tuple[str, str, tuple[str, ...]]]:
    """What makes two notebooks the same seminar: cell types, sources and tags, not outputs or jupytext headers."""
    return [
        (cell.cell_type, cell.source.strip(), tuple(sorted(cell.get("metadata", {}).get("tags", []))))
        for cell in nb.cells
    ]


def source_hash(nb: NotebookNode) -> str:
    """SHA-256 of a notebook's cells (types, sources, tags); equal for a `.py` and its paired `.ipynb`."""
    payload = json.dumps(_cells_fingerprint(nb), ensure_ascii=False).encode()
    return hashlib.sha256(payload).hexdigest()


def with_jupytext_header(nb: NotebookNode) -> NotebookNode:
    """nb with exactly the committed jupytext header (JUPYTEXT_METADATA). jupytext.read adds the text
    representation of the file it read, which JupyterLab's save drops again: stored, it would make a
    student's first save change the committed notebook."""
    nb.metadata["jupytext"] = dict(JUPYTEXT_METADATA)
    return nb


def sync(week: Week) -> Path:
    """Write `seminar.ipynb` from `seminar.py`, keeping stored outputs and metadata where cells are unchanged."""
    source = with_jupytext_header(read_source(week))
    if week.seminar_ipynb.is_file():
        stored = nbformat.read(week.seminar_ipynb, as_version=4)
        source = combine_inputs_with_outputs(source, stored, fmt="ipynb")
        if METADATA_KEY in stored.metadata:
            source.metadata[METADATA_KEY] = stored.metadata[METADATA_KEY]
    nbformat.write(source, week.seminar_ipynb)
    return week.seminar_ipynb


@dataclass
class SeminarRun:
    """The result of one headless execution of a seminar."""

    week: Week
    notebook: NotebookNode
    path: Path
    small: bool
    duration_s: float

    @property
    def summary(self) -> str:
        """Text printed by the cell tagged `summary`: the seminar's key results."""
        return summary_text(self.notebook)


def summary_text(nb: NotebookNode) -> str:
    lines: list[str] = []
    for cell in nb.cells:
        if cell.cell_type == "code" and SUMMARY_TAG in cell.get("metadata", {}).get("tags", []):
            for output in cell.get("outputs", []):
                if output.get("output_type") == "stream":
                    lines.append(output.get("text", ""))
                elif "text/plain" in output.get("data", {}):
                    lines.append(output["data"]["text/plain"])
    return "".join(lines).strip()


def execute(
    week: Week,
    *,
    small: bool,
    out_dir: Path,
    timeout_s: int = 1800,
    on_cell_done: Callable[[int, int], None] | None = None,
) -> SeminarRun:
    """Run `week`'s seminar top to bottom in a fresh kernel and write the executed notebook to `out_dir`.

    The kernel starts in the week's folder with `EFFDL_SMALL` set, so the `parameters` cell picks the sizes.
    On failure the partly executed notebook is still written, and the error names the failing cell.
    """
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError
    from traitlets.config import Config

    from common.environment import device_name, library_versions

    nb = with_jupytext_header(read_source(week))
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"{week.name}_seminar.ipynb"
    n_code_cells = sum(cell.cell_type == "code" for cell in nb.cells)
    started = 0

    def cell_started(cell: NotebookNode, **_: object) -> None:
        nonlocal started
        if cell.cell_type == "code":
            started += 1

    def cell_executed(cell: NotebookNode, **_: object) -> None:
        if cell.cell_type == "code" and on_cell_done is not None:
            on_cell_done(started, n_code_cells)

    env = {key: value for key, value in os.environ.items() if key != "MPLBACKEND"}  # keep inline plots
    env[SMALL_ENV_VAR] = "1" if small else "0"
    # IPC sockets rather than TCP on localhost: nothing is reachable from the network, and ipykernel does not
    # warn that the kernel runs "over TCP without encryption". The socket path must be absolute: the kernel
    # starts in the week's folder, the client does not.
    socket_dir = tempfile.TemporaryDirectory(prefix="effdl-kernel-")
    config = Config()
    config.KernelManager.transport = "ipc"
    config.KernelManager.ip = os.path.join(socket_dir.name, "kernel")
    client = NotebookClient(
        nb,
        config=config,
        timeout=timeout_s,
        kernel_name="python3",
        resources={"metadata": {"path": str(week.dir)}},
        on_cell_start=cell_started,
        on_cell_executed=cell_executed,
    )
    start = time.perf_counter()
    try:
        with socket_dir:
            client.execute(env=env)
    except CellExecutionError as error:
        nbformat.write(nb, out_path)
        raise SeminarError(
            f"{week.name} seminar failed in code cell {started} of {n_code_cells}: "
            f"{error.ename}: {error.evalue} (partial notebook: {out_path})"
        ) from error
    except CellTimeoutError as error:
        nbformat.write(nb, out_path)
        raise SeminarError(
            f"{week.name} seminar timed out in code cell {started} of {n_code_cells} after {timeout_s} s "
            f"(partial notebook: {out_path})"
        ) from error
    duration = time.perf_counter() - start
    nb.metadata[METADATA_KEY] = {
        "source_sha256": source_hash(nb),
        "small": small,
        "device": device_name(),
        "versions": library_versions(),
        "executed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": round(duration, 1),
    }
    nbformat.write(nb, out_path)
    return SeminarRun(week=week, notebook=nb, path=out_path, small=small, duration_s=duration)


def _is_full_run(week: Week, small: bool, device: str) -> bool:
    """Whether a run may stand as the committed notebook: full size, on a GPU or (week.full_on_cpu) a CPU; any
    run of a week awaiting its first GPU recording."""
    return week.awaiting_gpu_recording or (not small and (device != "cpu" or week.full_on_cpu))


def record(run: SeminarRun) -> Path:
    """Store a full-size run (on a GPU, or on a CPU where the week allows it) as the committed `seminar.ipynb`;
    for a week awaiting its first GPU recording, any run."""
    device = run.notebook.metadata[METADATA_KEY]["device"]
    if not _is_full_run(run.week, run.small, device):
        raise SeminarError(
            f"the committed notebook must hold {run.week.full_run}, but this run was "
            f"{'small' if run.small else 'full'} on {device}; rerun with --full {run.week.full_run_place}"
        )
    nbformat.write(run.notebook, run.week.seminar_ipynb)
    return run.week.seminar_ipynb


def staleness_problems(week: Week) -> list[str]:
    """Reasons the committed notebook does not belong to `seminar.py`, or was not recorded with the versions
    uv.lock pins; empty when it does and was."""
    from common.environment import lock_mismatches

    if not week.seminar_ipynb.is_file():
        return [
            f"{week.seminar_ipynb.name} is missing: run `effdl seminar {week.name} --full --record` "
            f"{week.full_run_place}"
        ]
    source = read_source(week)
    stored = nbformat.read(week.seminar_ipynb, as_version=4)
    problems = []
    if _cells_fingerprint(source) != _cells_fingerprint(stored):
        problems.append(
            f"{week.name}: seminar.py and seminar.ipynb disagree; run `jupytext --sync {week.name}/seminar.py`"
        )
    meta = stored.metadata.get(METADATA_KEY)
    if meta is None:
        problems.append(
            f"{week.name}: seminar.ipynb has no '{METADATA_KEY}' run metadata; it was never recorded"
        )
        return problems
    if meta.get("source_sha256") != source_hash(source):
        problems.append(
            f"{week.name}: the stored outputs come from an older seminar.py; "
            f"rerun `effdl seminar {week.name} --full --record` {week.full_run_place}"
        )
    if not _is_full_run(week, meta.get("small", True), meta.get("device", "cpu")):
        problems.append(f"{week.name}: the stored outputs are not from {week.full_run}")
    unexecuted = [
        index
        for index, cell in enumerate(stored.cells)
        if cell.cell_type == "code" and cell.execution_count is None
    ]
    if unexecuted:
        problems.append(f"{week.name}: code cells {unexecuted} of seminar.ipynb have no stored outputs")
    problems += [
        f"{week.name}: {mismatch}; re-record in the locked environment (`uv sync --locked`)"
        for mismatch in lock_mismatches(meta.get("versions", {}))
    ]
    return problems
