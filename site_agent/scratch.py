"""Per-job scratch directories, enforced with Landlock on the job thread (sandbox layer 3).

Role: seccomp (`containment.py`) filters system calls by number and flags but cannot read a
path, so on its own it can only make the job thread's filesystem read-only. Landlock, a Linux
security module an unprivileged thread applies to itself, restricts by path: after
`restrict_writes(root)` the calling thread (and threads it starts later) may create, write,
truncate, rename or remove files only beneath `root` (and write to a few device nodes the
accelerator needs); reads stay allowed everywhere. Like a seccomp filter it is per thread and
irreversible, so the worker applies it once, on its job thread, before the seccomp filter
(which then leaves path-checked writes to Landlock and forbids the landlock calls).

Flow per worker: `Scratch.create()` makes a private root (mode 0700, named after the worker's
pid; roots of ended processes are removed then) before containment;
`begin()` makes a fresh, empty `job-<n>` directory beneath it for each job and, when the job
thread has its own working directory (`unshare(CLONE_FS)`, done once at containment), makes it
the thread's working directory, so relative paths land there; `end()` removes everything
beneath the root, not just the job's directory (a job may write anywhere beneath it), and
reports anything it could not remove, which fails the job and replaces the worker. So nothing
one job writes is visible to the next.

Not covered: reads (a job thread may read any file the worker's user can, another worker's
scratch included, were it able to name and open it: layers 1 and 2 refuse opening files);
how much a job writes (no quota: a site puts `sandbox.scratch_dir` on a size-limited tmpfs or
volume); a worker killed mid-job leaves its root behind (mode 0700, never reused) until the
next worker starts on that machine; threads
started before the restriction (torch's intra-op pool, where it was started at load) keep
their freedom, as for seccomp.

Where the kernel lacks Landlock (before 5.13, or built without it; this uses ABI 3, Linux
6.2+, for truncation), `restrict_writes` raises `LandlockUnavailable`: the agent says so at
start-up and refuses to serve unless the site opts out (`sandbox: {require_landlock:
false}`); the job thread then stays read-only through seccomp and jobs get no scratch.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import itertools
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field

# x86_64 and the generic syscall table (arm64) share these numbers.
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_SYS_UNSHARE = 272 if os.uname().machine == "x86_64" else 97
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_FS = 0x00000200

# Landlock filesystem access rights (linux/landlock.h).
WRITE_FILE = 1 << 1
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2: linking or renaming across directories
TRUNCATE = 1 << 14  # ABI 3
MIN_ABI = 3

# Every right that changes the filesystem; reading, listing and executing are not handled, so
# they stay allowed. Device ioctls (ABI 5) are not handled either: the accelerator needs them.
WRITE_ACCESS = (
    WRITE_FILE
    | REMOVE_DIR
    | REMOVE_FILE
    | MAKE_CHAR
    | MAKE_DIR
    | MAKE_REG
    | MAKE_SOCK
    | MAKE_FIFO
    | MAKE_BLOCK
    | MAKE_SYM
    | REFER
    | TRUNCATE
)
_FILE_ACCESS = WRITE_FILE | TRUNCATE  # the rights a rule on a single file may grant

# Device nodes a job thread may open for writing: the null device and accelerators' nodes
# (NVIDIA, AMD's kfd and DRM render nodes), which drivers open read-write.
DEVICE_PATTERNS = ("/dev/null", "/dev/nvidia*", "/dev/kfd", "/dev/dri/renderD*")


class LandlockUnavailable(RuntimeError):
    """This kernel cannot restrict the job thread's writes by path."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def abi_version() -> int:
    """The Landlock ABI this kernel offers (0: none)."""
    libc = _libc()
    found = libc.syscall(
        ctypes.c_long(_SYS_CREATE_RULESET), None, ctypes.c_size_t(0), _u32(_CREATE_RULESET_VERSION)
    )
    return max(int(found), 0)


def restrict_writes(root: str, devices: tuple[str, ...] = DEVICE_PATTERNS) -> None:
    """Allow the calling thread to change files only beneath `root` (see module doc)."""
    abi = abi_version()
    if abi < MIN_ABI:
        raise LandlockUnavailable(
            f"Landlock ABI {abi} found, {MIN_ABI} needed (Linux 6.2+ with Landlock enabled)"
            if abi
            else "the kernel has no Landlock (Linux 5.13+ built with CONFIG_SECURITY_LANDLOCK "
            "and landlock in the lsm= list)"
        )
    libc = _libc()
    attr = _RulesetAttr(WRITE_ACCESS)
    ruleset = libc.syscall(
        ctypes.c_long(_SYS_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(8), _u32(0)
    )
    if ruleset < 0:
        raise LandlockUnavailable(f"landlock_create_ruleset: {_errno()}")
    try:
        _allow(libc, ruleset, root, WRITE_ACCESS)
        for pattern in devices:
            for path in sorted(glob.glob(pattern)):
                _allow(libc, ruleset, path, _FILE_ACCESS)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise LandlockUnavailable(f"prctl(PR_SET_NO_NEW_PRIVS): {_errno()}")
        if libc.syscall(ctypes.c_long(_SYS_RESTRICT_SELF), ctypes.c_int(ruleset), _u32(0)) != 0:
            raise LandlockUnavailable(f"landlock_restrict_self: {_errno()}")
    finally:
        os.close(ruleset)


def _allow(libc: ctypes.CDLL, ruleset: int, path: str, access: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        rule = _PathBeneathAttr(access, fd)
        done = libc.syscall(
            ctypes.c_long(_SYS_ADD_RULE),
            ctypes.c_int(ruleset),
            ctypes.c_int(_RULE_PATH_BENEATH),
            ctypes.byref(rule),
            _u32(0),
        )
        if done != 0:
            raise LandlockUnavailable(f"landlock_add_rule({path}): {_errno()}")
    finally:
        os.close(fd)


def own_working_directory() -> bool:
    """Give the calling thread a working directory of its own (`unshare(CLONE_FS)`)."""
    done = _libc().syscall(ctypes.c_long(_SYS_UNSHARE), ctypes.c_ulong(_CLONE_FS))
    return done == 0


def _u32(value: int) -> ctypes.c_uint32:
    return ctypes.c_uint32(value)


def _errno() -> str:
    code = ctypes.get_errno()
    return f"{errno.errorcode.get(code, code)} ({os.strerror(code)})"


@dataclass
class Scratch:
    """A worker's scratch root and the directory of the job running now (see module doc)."""

    root: str
    own_cwd: bool = False  # the job thread has its own working directory
    current: str | None = None
    _jobs: itertools.count = field(default_factory=itertools.count)

    @classmethod
    def create(cls, parent: str | None = None) -> Scratch:
        """A new root in `parent` (default: the temp dir), named after this process.

        Roots of processes that no longer exist (a worker killed mid-job or replaced runs
        no clean-up) are removed first.
        """
        parent = parent or tempfile.gettempdir()
        remove_stale_roots(parent)
        return cls(tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{os.getpid()}-", dir=parent))

    def begin(self) -> str:
        """A fresh, empty directory for the next job (call on the job thread)."""
        path = os.path.join(self.root, f"job-{next(self._jobs)}")
        os.mkdir(path, 0o700)
        self.current = path
        if self.own_cwd:
            os.chdir(path)
        return path

    def end(self) -> list[str]:
        """Remove everything beneath the root; what could not be removed (empty: all gone)."""
        if self.own_cwd:
            os.chdir(self.root)
        self.current = None
        left: list[str] = []
        for entry in os.scandir(self.root):
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except OSError as exc:
                left.append(f"{entry.name}: {exc.strerror or exc}")
        return left

    def remove(self) -> None:
        """Remove the root itself (at worker exit)."""
        shutil.rmtree(self.root, ignore_errors=True)


ROOT_PREFIX = "edif-scratch-"


def remove_stale_roots(parent: str) -> list[str]:
    """Remove this user's scratch roots in `parent` whose process has ended; their paths."""
    removed = []
    for entry in os.scandir(parent):
        if not entry.name.startswith(ROOT_PREFIX):
            continue
        owner = entry.name[len(ROOT_PREFIX) :].split("-", 1)[0]
        if not owner.isdigit() or _alive(int(owner)):
            continue
        try:
            if entry.is_dir(follow_symlinks=False) and entry.stat().st_uid == os.getuid():
                shutil.rmtree(entry.path)
                removed.append(entry.path)
        except OSError:
            continue  # another worker removing it at the same time, or not ours to remove
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def on_thread(fn, *args):  # noqa: ANN001, ANN201 - run fn(*args) on a new thread, return result
    """Run `fn(*args)` on a throwaway thread (Landlock and seccomp stay on that thread)."""
    out: list = []

    def target() -> None:
        try:
            out.append((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            out.append((False, exc))

    thread = threading.Thread(target=target, name="edif-sandbox-probe", daemon=True)
    thread.start()
    thread.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value


def probe() -> tuple[bool, str]:
    """Whether this machine can restrict a job thread's writes by path (a throwaway thread)."""
    try:
        abi = abi_version()
        if abi < MIN_ABI:
            restrict_writes("/")  # raises with the reason
        root = tempfile.mkdtemp(prefix="edif-landlock-probe-")
        try:
            on_thread(restrict_writes, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    except (LandlockUnavailable, OSError) as exc:
        return False, str(exc)
    return True, f"Landlock ABI {abi}: job writes confined to a per-job scratch directory"
