"""Inside a sandbox of `common.grading.suites`: apply the limits, then execute the command.

`python -P -m common.grading.launcher --address-space=N --file-size=N -- ARGV` sets RLIMIT_AS, RLIMIT_FSIZE
and no core dumps on itself, moves to the writable folder ($TMPDIR) and replaces itself with ARGV, so the
limits hold before any code of the submission runs. Standard library only: it must start in milliseconds.
"""

from __future__ import annotations

import os
import resource
import sys


def main(argv: list[str]) -> int:
    if "--" not in argv or not argv[argv.index("--") + 1 :]:
        print(
            "usage: python -m common.grading.launcher --address-space=N --file-size=N -- ARGV",
            file=sys.stderr,
        )
        return 2
    options, command = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    values = dict(option.removeprefix("--").split("=", 1) for option in options)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(values["file-size"]),) * 2)
    resource.setrlimit(resource.RLIMIT_AS, (int(values["address-space"]),) * 2)
    os.makedirs(os.environ["HOME"], exist_ok=True)
    os.chdir(os.environ["TMPDIR"])
    os.execvp(command[0], command)
    return 70  # not reached: execvp replaces this process or raises


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
