"""Inside a sandbox of `common.grading.suites`: apply the limits, then execute the command.

`python -P -m common.grading.launcher --address-space=N --file-size=N --open-files=N --status-fd=FD -- ARGV`
applies a task's per-process limits to itself (`apply_limits`, which the worker applies too), moves to the
writable folder ($TMPDIR) and replaces itself with ARGV, so the limits hold before any code of the submission
runs. Standard library only: it must start in milliseconds.

Just before the exec it writes "exec" to FD, a pipe the harness reads. FD is closed by the exec itself, so
nothing ARGV runs can write to it: "exec" and nothing after it means the command started, and anything else
(no line: the sandbox or this launcher failed; "exec failed: ...") is a fault of the machine, not of the command.
"""

from __future__ import annotations

import os
import resource
import sys

USAGE = "usage: python -m common.grading.launcher --address-space=N --file-size=N --open-files=N --status-fd=FD -- ARGV"


def apply_limits(address_space_bytes: int, max_file_bytes: int, max_open_files: int, cwd: str) -> None:
    """A task's per-process limits on this process (address space 0: none), then `cwd` made and entered."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes,) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files,) * 2)
    if address_space_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (address_space_bytes,) * 2)
    os.makedirs(cwd, exist_ok=True)
    os.chdir(cwd)


def main(argv: list[str]) -> int:
    if "--" not in argv or not argv[argv.index("--") + 1 :]:
        print(USAGE, file=sys.stderr)
        return 2
    options, command = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    values = dict(option.removeprefix("--").split("=", 1) for option in options)
    os.makedirs(os.environ["HOME"], exist_ok=True)
    limits = (int(values[name]) for name in ("address-space", "file-size", "open-files"))
    apply_limits(*limits, cwd=os.environ["TMPDIR"])
    status = int(values["status-fd"])
    os.set_inheritable(status, False)  # closed on exec: the command cannot write to it
    os.write(status, b"exec\n")
    try:
        os.execvp(command[0], command)
    except OSError as error:
        os.write(status, f"exec failed: {error}\n".encode())
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
