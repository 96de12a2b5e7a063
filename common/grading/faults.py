"""Why a hidden test did not pass: the submission's fault, or the machine's.

Everything the trusted side raises while talking to a worker is one of these. `SubmissionFault`s fail the test
with their message (what the student sees). `InfrastructureFault`s are decided here, from what the checker
itself observes: the sandbox did not start before any submission code ran, or another process holds the GPU
the task was given. Nothing the submission raises or sends can become an `InfrastructureFault`: its
exceptions arrive as `SubmissionRaised` with a capped excerpt, never re-raised as their own type.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

GPU_BUSY_MIB = 512  # another process holding more than this of a task's GPU makes the task unfair to grade


class SubmissionFault(Exception):
    """A test fails because of the submission; the message is shown to the student."""


class SubmissionRaised(SubmissionFault):
    """The submission's code raised: the built-in classes it derives from (`kinds`, nearest first), its class
    name and the first line of its message."""

    def __init__(self, what: str, kinds: list[str], name: str, line: str) -> None:
        self.kinds, self.name, self.line = kinds, name, line
        detail = f"{name}: {line}" if line else name
        super().__init__(f"{what} raised {detail}")

    def is_a(self, kind: str) -> bool:
        """Whether the exception is an instance of the built-in exception class named `kind`."""
        return kind in self.kinds


class NotDataError(SubmissionFault):
    """The submission returned something that is not data (a custom object, a tensor subclass, a function)."""


class WrongTypeError(SubmissionFault):
    """The submission returned data of another type or shape than the test expects."""


class WorkerEndedError(SubmissionFault):
    """The submission's process ended (exited, crashed, was killed) during a call, or sent malformed data."""


class TimeLimitError(SubmissionFault):
    """The task's time limit ran out while the submission's code was running."""


class ProcessLimitError(SubmissionFault):
    """The submission started more processes than the task allows."""


class InfrastructureFault(Exception):
    """A fault of the machine, observed by the checker: the task is retried, and never scored 0 for it."""


class WorkerDidNotStartError(InfrastructureFault):
    """The sandbox or the worker template failed before any submission code ran."""


class CommandDidNotStartError(InfrastructureFault):
    """An isolated command (`suites.run_isolated`): its sandbox or launcher failed before the command ran."""


class GpuBusyError(InfrastructureFault):
    """Another process holds the GPU this task was given."""


class ReferenceRunError(InfrastructureFault):
    """The checker's own reference run (the library the task is compared with, run where no submission code
    ever ran) failed: a grader bug or the machine's fault, never the student's."""


def parse_gpu_holders(gpus_csv: str, apps_csv: str) -> dict[int, list[tuple[int, int]]]:
    """{GPU index: [(pid, MiB), ...]} from `nvidia-smi --query-gpu=index,uuid` and
    `--query-compute-apps=gpu_uuid,pid,used_memory` (both `--format=csv,noheader,nounits`)."""
    index_of = {}
    for line in gpus_csv.strip().splitlines():
        index, uuid = (part.strip() for part in line.split(","))
        index_of[uuid] = int(index)
    holders: dict[int, list[tuple[int, int]]] = {index: [] for index in index_of.values()}
    for line in apps_csv.strip().splitlines():
        uuid, pid, used = (part.strip() for part in line.split(","))
        if uuid in index_of and used.isdigit():
            holders[index_of[uuid]].append((int(pid), int(used)))
    return holders


def grading_run_pids() -> set[int]:
    """This process and the processes that started it: the grading run itself, never "another process".

    A TA may grade from a process that already holds the GPU (`pytest -m gpu` runs the selftest in the same
    process as the GPU tests before it; a notebook may have touched CUDA): its memory is the TA's own choice,
    not a competing job.
    """
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # no /proc (not Linux), or the parent ended: what we have is what there is
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state; the name may hold spaces
    return pids


def gpu_held_by_others(gpus: tuple[int, ...], ours: set[int]) -> str | None:
    """Why one of `gpus` is not free (a process not in `ours` holds over GPU_BUSY_MIB of it), or None."""
    query = ["nvidia-smi", "--format=csv,noheader,nounits"]
    try:
        listing = subprocess.run(
            [*query, "--query-gpu=index,uuid"], capture_output=True, text=True, timeout=60
        )
        apps = subprocess.run(
            [*query, "--query-compute-apps=gpu_uuid,pid,used_memory"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except FileNotFoundError:  # no nvidia-smi: nothing can be observed, so nothing is claimed
        return None
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"nvidia-smi could not be asked who holds the GPU: {error}"
    holders = parse_gpu_holders(listing.stdout, apps.stdout)
    for gpu in gpus:
        others = [(pid, mib) for pid, mib in holders.get(gpu, []) if pid not in ours and mib > GPU_BUSY_MIB]
        if others:
            who = ", ".join(f"pid {pid} ({mib} MiB)" for pid, mib in others)
            return f"GPU {gpu} is held by another process: {who}"
    return None
