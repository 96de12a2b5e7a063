"""Linux Landlock through ctypes: an unprivileged process restricts which files it (and its children) may touch.

The grader calls `restrict(read=..., write=...)` in the submission's process just before it starts pytest. From
then on that process and everything it starts may read only the listed trees (Python, the course library, the
work tree, system folders) and write only inside the work tree; with Landlock ABI 6 or later it also cannot send
signals to, or connect to abstract sockets of, processes outside its sandbox (the grader, other submissions).
A restriction can never be lifted, not even by root. See the kernel's `Documentation/userspace-api/landlock.rst`.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterable

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # the same on every architecture
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3 and 5
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

READ = EXECUTE | READ_FILE | READ_DIR
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
WRITE = _FS_BY_ABI[5] & ~READ  # every way of changing the filesystem


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]  # fmt: skip


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def abi_version() -> int:
    """The kernel's Landlock ABI version, or 0 where Landlock is missing or disabled (or not Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    version = _libc().syscall(
        _SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION)
    )
    return max(int(version), 0)


def _scopes(abi: int, scope_ipc: bool) -> int:
    if abi < 6:
        return 0
    return SCOPE_SIGNAL | (SCOPE_ABSTRACT_UNIX_SOCKET if scope_ipc else 0)


def restrict(
    read: Iterable[str], write: Iterable[str], device_dirs: Iterable[str] = ("/dev",), scope_ipc: bool = True
) -> int:
    """Allow reading only under `read`, changing files only under `write`; returns the ABI used.

    Paths that do not exist are skipped. Devices under `device_dirs` may be opened for writing and ioctl'd
    (`/dev/null`, the GPU's `/dev/nvidia*`), but nothing can be created there; the process may write its own
    `/proc/<pid>` files. Raises OSError on failure.
    """
    abi = abi_version()
    if abi < 1:
        raise OSError("Landlock is not available on this kernel")
    libc = _libc()
    handled = _FS_BY_ABI[min(abi, 5)]
    attr = _RulesetAttr(handled_access_fs=handled, handled_access_net=0,
                        scoped=_scopes(abi, scope_ipc))  # fmt: skip
    size = 24 if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    try:
        rules = [(p, READ) for p in read] + [(p, READ | WRITE) for p in write]
        rules += [(p, READ | WRITE_FILE | TRUNCATE | IOCTL_DEV) for p in device_dirs]
        # The CUDA driver writes to its own process's /proc entries (it fails to start otherwise); /proc/<pid>
        # survives exec(), so this covers the command the sandbox becomes, and no other process.
        rules.append((f"/proc/{os.getpid()}", READ | WRITE_FILE | TRUNCATE))
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                allowed = access & handled
                if not os.path.isdir(path):  # a rule on a file may only carry file rights
                    allowed &= EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
                rule = _PathBeneathAttr(allowed_access=allowed, parent_fd=fd)
                if libc.syscall(
                    _SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), ctypes.c_uint32(0)
                ):
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
            finally:
                os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if libc.syscall(_SYS_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)):
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)
    return abi
