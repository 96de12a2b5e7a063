"""The syllabus: which week folders exist and where each week's seminar, slides and README live."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.errors import EffdlError

REPO_ROOT = Path(__file__).resolve().parent.parent

# (folder, title) in teaching order; a week may not have all its material yet.
SYLLABUS: tuple[tuple[str, str], ...] = (
    ("week01_intro", "GPU architecture, CUDA in PyTorch, benchmarking"),
    ("week02_management_and_testing", "Experiment tracking, data and pipeline versioning, testing DL code"),
    ("week03_fast_pipelines", "Mixed precision, data loading, profiling"),
    ("week04_data_parallel", "torch.distributed, all-reduce, DDP"),
    ("week05_large_models", "Tensor, pipeline and sequence parallelism, checkpointing, offloading"),
    ("week06_fsdp", "Sharded data parallel, FSDP2"),
    ("week07_application_deployment", "HTTP/gRPC services, Docker, Prometheus"),
    ("week09_inference_algorithms", "Speculative decoding, quantization, Triton matmul"),
)

# Weeks whose full size is meant for a CPU as well as a GPU. Week 4 runs its ranks as CPU processes that talk
# through gloo (4 of them at full size), so a full run on a CPU is a real run: `effdl seminar --full` does not
# warn about it, and its outputs may be recorded in the committed notebook until a multi-GPU run replaces them.
# Week 2 (tracking, pipelines, tests) has no GPU part at all: its full run is a CPU run. Week 7's service runs
# its model on a CPU by design (one torch thread per server process), so its full run is a CPU run too. Week 6,
# like week 4, runs its ranks as CPU processes over gloo (4 at full size); only its last section needs a GPU,
# and a CPU run says that it skipped it, until a GPU run replaces the recording.
FULL_ON_CPU: frozenset[str] = frozenset(
    {
        "week02_management_and_testing",
        "week04_data_parallel",
        "week06_fsdp",
        "week07_application_deployment",
    }
)

# Weeks whose folder already holds code while their seminar and slides are still to be written, with what is
# there. The repository's shape test asks these for their README only, and fails once a listed week has its
# seminar and slides, so the entry is removed then.
IN_PROGRESS: dict[str, str] = {}

# Weeks whose seminar is written and runs at small size in CI, but whose GPU sections have never run: the
# committed notebook holds a small CPU run until a full GPU run is recorded, and the entry says what waits.
# The notebook tests accept such a recording for these weeks only, and fail once a full GPU run is committed,
# so the entry is removed then.
AWAITING_GPU_RECORDING: dict[str, str] = {
    "week09_inference_algorithms": "the decode roofline, speculative decoding's speed-up, quantization's decode "
    "speed, split-K and batching's effect on decode throughput are measured only on a GPU",
}


class UnknownWeekError(EffdlError):
    """A week name that is not in the syllabus."""


@dataclass(frozen=True)
class Week:
    """One week of the course and the paths of its material."""

    name: str
    title: str
    root: Path = REPO_ROOT  # tests point this at a temporary course tree

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def seminar_py(self) -> Path:
        return self.dir / "seminar.py"

    @property
    def seminar_ipynb(self) -> Path:
        return self.dir / "seminar.ipynb"

    @property
    def slides_md(self) -> Path:
        return self.dir / "lecture" / "slides.md"

    @property
    def readme(self) -> Path:
        return self.dir / "README.md"

    @property
    def assignment_dir(self) -> Path:
        return self.root / "assignments" / self.name

    @property
    def full_on_cpu(self) -> bool:
        """Whether a full-size run on a CPU is a real run of this week's seminar (see FULL_ON_CPU)."""
        return self.name in FULL_ON_CPU

    @property
    def awaiting_gpu_recording(self) -> bool:
        """Whether the committed notebook may be a small CPU run until a GPU records it (AWAITING_GPU_RECORDING)."""
        return self.name in AWAITING_GPU_RECORDING

    @property
    def full_run(self) -> str:
        """What the committed notebook must hold, in words, for messages."""
        return "a full-size run (CPU or GPU)" if self.full_on_cpu else "a full-size GPU run"

    @property
    def full_run_place(self) -> str:
        """Where to make that run, in words, for messages: "on a GPU" or "on a CPU or a GPU"."""
        return "on a CPU or a GPU" if self.full_on_cpu else "on a GPU"

    @property
    def has_seminar(self) -> bool:
        return self.seminar_py.is_file()

    @property
    def has_slides(self) -> bool:
        return self.slides_md.is_file()


ALL_WEEKS: tuple[Week, ...] = tuple(Week(name, title) for name, title in SYLLABUS)


def get_week(name: str) -> Week:
    """Find a week by its folder name or a short form: `week01_intro`, `week01`, `01` and `1` all work."""
    key = name.strip().rstrip("/").split("/")[-1].lower()
    for week in ALL_WEEKS:
        number = week.name[len("week") : len("week") + 2]
        if key in (week.name, week.name[: len("week") + 2], number, number.lstrip("0")):
            return week
    written = ", ".join(week.name for week in ALL_WEEKS if week.dir.is_dir())
    planned = ", ".join(week.name for week in ALL_WEEKS if not week.dir.is_dir())
    raise UnknownWeekError(
        f"unknown week {name!r}; valid weeks: {written}"
        + (f" (planned, not written yet: {planned})" if planned else "")
    )


def weeks_with_seminar() -> list[Week]:
    return [week for week in ALL_WEEKS if week.has_seminar]


def weeks_with_slides() -> list[Week]:
    return [week for week in ALL_WEEKS if week.has_slides]
