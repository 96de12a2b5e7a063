"""The sandbox a submission's worker runs in: bubblewrap (`bwrap`), as Flatpak uses it.

`command(spec)` is the command line that starts the worker template (`common.grading.worker serve`) in:

- new user, PID, network, IPC, UTS and cgroup namespaces: no network at all (not even the host's loopback),
  no view of other processes (a fresh /proc shows only the sandbox's), no capabilities, uid 65534;
- a new mount namespace built from nothing: read-only binds of /usr, the Python interpreter, the environment
  and the course library (`common`, at /course/common), the submitted package (read-only, at /submission/src),
  a size-capped tmpfs at /tmp (the worker's writable work tree and HOME), on a root remounted read-only;
  nothing else of /etc, /home, /root, the course repository or the grader's files, so no hidden test, no
  reference and no secret is in view, and no folder on sys.path is writable (Python runs with -P, so the
  current directory is not on it: a task cannot plant a module that a later task's worker would import);
- an empty environment plus the few variables the worker needs;
- `--die-with-parent`: if the checker dies, so does the sandbox; killing `bwrap` kills everything inside.

Only GPU tasks see GPU device nodes, and only those of the GPUs they were given. The per-process limits
(address space, file size, open files) are applied by the worker itself before any submission code runs; the
checker owns the time limit and the process count (`session`).

`wrap(spec, argv)` is the same sandbox around any command: `common.grading.suites` runs a submitted test suite
or a pipeline that way, in a fresh sandbox per run, with one writable folder bound at /outbox for what the run
leaves behind.

`probe()` says whether bwrap works on this machine; where it does not, grading stops with that reason unless
the TA passes `--no-sandbox`, which runs the same worker as a plain child process and is shown in every report.
"""

from __future__ import annotations

import functools
import shutil
import site
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.weeks import REPO_ROOT

UNSANDBOXED = "UNSANDBOXED (--no-sandbox): the submission ran without isolation"
ISOLATION = "bubblewrap: no network, own PID/IPC/mount namespaces, uid 65534, read-only course files"
INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap)"
COURSE_MOUNT = "/course"
SRC_MOUNT = "/submission/src"
OUTBOX_MOUNT = "/outbox"
_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64")
_ETC = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d")
_GPU_CONTROL = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")


class SandboxUnavailableError(RuntimeError):
    """bwrap is missing or cannot create namespaces here; the message names the fix."""


@dataclass(frozen=True)
class SandboxSpec:
    """What one sandbox holds and may use."""

    src: Path  # the submission's src/ folder (the package the student wrote, starter files for the rest)
    scratch: Path  # host folder for the unsandboxed mode's HOME and TMPDIR (unused inside bwrap)
    gpus: tuple[int, ...] = ()  # physical GPU indices whose device nodes the sandbox sees
    threads: int = 1
    tmp_bytes: int = 1024 * 2**20
    sandboxed: bool = True
    preload: tuple[str, ...] = ()  # modules the worker template imports before it forks workers
    outbox: Path | None = None  # a host folder the sandbox may write, at OUTBOX_MOUNT (suites only)

    @property
    def tmp(self) -> str:
        """The worker's writable folder, as the worker sees it."""
        return "/tmp" if self.sandboxed else str(self.scratch / "tmp")


def _environment(spec: SandboxSpec) -> dict[str, str]:
    """The worker's whole environment: nothing of the TA's."""
    home = f"{spec.tmp}/home"
    python_path = [COURSE_MOUNT, SRC_MOUNT] if spec.sandboxed else [str(REPO_ROOT), str(spec.src)]
    threads = str(spec.threads)
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": spec.tmp,
        "USER": "student",
        "LANG": "C.UTF-8",
        "PYTHONPATH": ":".join(python_path),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "PYTHONUNBUFFERED": "1",
        "XDG_CACHE_HOME": f"{home}/.cache",
        "MPLCONFIGDIR": f"{home}/.matplotlib",
        "MPLBACKEND": "Agg",
        "TRITON_CACHE_DIR": f"{home}/.triton",
        "TORCHINDUCTOR_CACHE_DIR": f"{home}/.inductor",
        "OMP_NUM_THREADS": threads,  # parallel jobs share the cores instead of fighting over them
        "MKL_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "MALLOC_ARENA_MAX": "2",  # glibc reserves 64 MB of address space per arena; keep RLIMIT_AS meaningful
        "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in spec.gpus),
    }


def _pth_folders(site_dirs: list[str]) -> set[str]:
    """The folders that the .pth files in `site_dirs` put on sys.path, outside the course repository.

    A runner whose PyTorch lives in another environment is linked to it by a .pth file (the README's offline
    install); the sandbox must show that folder too. The repository itself (an editable install's .pth names
    it) stays out: the course library is bound on its own, and the hidden tests must not be in view.
    """
    repo = str(REPO_ROOT)
    folders = set()
    for pth in sorted(p for d in site_dirs if Path(d).is_dir() for p in Path(d).glob("*.pth")):
        for line in pth.read_text(errors="replace").splitlines():
            folder = line.strip()
            if not folder or folder.startswith(("#", "import ")) or not Path(folder).is_dir():
                continue
            folder = str(Path(folder).resolve())
            if not (folder == repo or folder.startswith(repo + "/") or repo.startswith(folder + "/")):
                folders.add(folder)
    return folders


@functools.cache
def _python_trees() -> tuple[str, ...]:
    """The interpreter and the environment: read-only, at the same paths (their scripts name them). Read once
    per process: every sandbox of a batch binds the same folders."""
    site_dirs = site.getsitepackages()
    trees = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site_dirs, *_pth_folders(site_dirs)}
    return tuple(sorted(t for t in trees if not any(t != o and t.startswith(o + "/") for o in trees)))


def _top_folders_below_tmp(paths: Sequence[str]) -> list[str]:
    """The folders right below /tmp that hold any of `paths` (/tmp/ci for /tmp/ci/.venv)."""
    return sorted({"/tmp/" + path.split("/")[2] for path in paths if path.startswith("/tmp/")})


def _bind_system(argv: list[str]) -> None:
    for path in _SYSTEM:
        where = Path(path)
        if where.is_symlink():  # merged /usr: /bin -> usr/bin
            argv += ["--symlink", str(where.readlink()), path]
        elif where.is_dir():
            argv += ["--ro-bind", path, path]
    for path in _ETC:
        if Path(path).exists():
            argv += ["--ro-bind", path, path]


def _bind_gpus(argv: list[str], gpus: tuple[int, ...]) -> None:
    nodes = [*_GPU_CONTROL, *(f"/dev/nvidia{index}" for index in gpus)]
    for node in nodes:
        if Path(node).exists():
            argv += ["--dev-bind", node, node]
    argv += ["--ro-bind", "/sys", "/sys"]  # the CUDA driver reads the GPUs' PCI topology there


def bwrap_path() -> str:
    """The bwrap executable, or SandboxUnavailableError naming the fix."""
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailableError(f"bubblewrap (bwrap) is not installed: {INSTALL_HINT}")
    return path


def command(spec: SandboxSpec, channel_fd: int) -> list[str]:
    """The argv that starts the worker template for `spec` (inside bwrap unless `spec.sandboxed` is False);
    the template talks on the inherited socket `channel_fd`."""
    # -P: no current directory on sys.path; the worker's is the writable /tmp, where a file the submission
    # left would shadow a module imported later.
    worker = [sys.executable, "-P", "-m", "common.grading.worker", "serve", f"--channel-fd={channel_fd}"]
    worker += [f"--preload={module}" for module in spec.preload]
    return wrap(spec, worker) + (["--pid-namespace"] if spec.sandboxed else [])


def outbox_path(spec: SandboxSpec) -> str:
    """Where the sandboxed command sees `spec.outbox`."""
    return OUTBOX_MOUNT if spec.sandboxed else str(spec.outbox)


def wrap(spec: SandboxSpec, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """`argv` run inside the sandbox `spec` describes, with the sandbox's environment plus `env`."""
    env = {**_environment(spec), **(env or {})}
    if not spec.sandboxed:
        return ["env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv]
    sandbox = [
        bwrap_path(),
        "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534", "--cap-drop", "ALL",
        "--die-with-parent", "--new-session", "--hostname", "sandbox",
    ]  # fmt: skip
    # /tmp first: a bind below it (a checkout or an environment under /tmp) must land on top of the tmpfs.
    sandbox += ["--size", str(spec.tmp_bytes), "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev"]
    # The folders bwrap makes for such a bind would be writable parts of /tmp, and one may be on sys.path (an
    # editable install names its checkout): each gets a tmpfs of its own, made read-only below.
    trees = _python_trees()
    below_tmp = _top_folders_below_tmp(trees)
    for folder in below_tmp:
        sandbox += ["--tmpfs", folder]
    _bind_system(sandbox)
    for tree in trees:
        sandbox += ["--ro-bind", tree, tree]
    sandbox += ["--ro-bind", str(REPO_ROOT / "common"), f"{COURSE_MOUNT}/common"]
    sandbox += ["--ro-bind", str(spec.src), SRC_MOUNT]
    if spec.outbox is not None:
        sandbox += ["--bind", str(spec.outbox), OUTBOX_MOUNT]
    if spec.gpus:
        _bind_gpus(sandbox, spec.gpus)
    # The root is a tmpfs whose folders bwrap made for the binds (/course, the parents of the environment): on
    # sys.path, and writable until remounted. Only /tmp (and the outbox) stay writable.
    sandbox += ["--remount-ro", "/"]
    for folder in below_tmp:
        sandbox += ["--remount-ro", folder]
    sandbox += ["--clearenv"]
    for key, value in env.items():
        sandbox += ["--setenv", key, value]
    return [*sandbox, "--chdir", "/tmp", "--", *argv]


def probe() -> None:
    """Raise SandboxUnavailableError, with the reason and the fix, unless bwrap can sandbox here."""
    argv = [bwrap_path(), "--unshare-all", "--unshare-user", "--die-with-parent"]
    _bind_system(argv)
    argv += ["--proc", "/proc", "--dev", "/dev", "--", "/bin/true"]
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SandboxUnavailableError(f"bwrap could not run: {error}") from None
    if run.returncode != 0:
        reason = (run.stderr.strip().splitlines() or [f"exit code {run.returncode}"])[-1]
        raise SandboxUnavailableError(
            f"bwrap cannot create a sandbox here ({reason}): enable unprivileged user namespaces "
            "(sysctl kernel.unprivileged_userns_clone=1, or on Ubuntu 24.04+ "
            "kernel.apparmor_restrict_unprivileged_userns=0) or grade as root"
        )
