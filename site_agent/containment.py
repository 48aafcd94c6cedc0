"""OS-level containment of a worker's job thread: a seccomp filter (sandbox layer 3).

Role: whatever request code gets past the source policy (layer 1) and the restricted runtime
(layer 2) still runs on one thread whose system calls the kernel filters. `contain_thread()`
loads a libseccomp filter (through `pyseccomp`, a ctypes binding to the system library) on
the calling thread only: seccomp filters are per thread, inherited by the threads it starts
(torch's intra-op pool when it is started from there) and irreversible. The worker calls it
once, on its dedicated job thread, after the model has loaded; every job then runs contained
while Ray's own threads (sockets, object store) stay free.

What the filter denies (everything else is allowed: memory, futexes, reads, `ioctl` for the
accelerator):
- the network: creating, connecting, binding, accepting sockets, and sending or receiving on
  any (the process's Ray sockets included);
- processes: `execve`/`execveat`, `fork`/`vfork`, `clone` without `CLONE_THREAD` (how glibc's
  `system()`/`posix_spawn` create processes), `clone3` (answered ENOSYS so glibc falls back to
  `clone`, which is filtered by its flags: clone3's flags sit behind a pointer);
- other processes: `ptrace`, `process_vm_*`, `pidfd_*`, `kcmp`, and `kill`/`tgkill`/
  `rt_*sigqueueinfo` aimed at any process but this one;
- the filesystem for writing: seccomp cannot read paths, so where Landlock confines the
  thread's writes to the job's scratch directory (`scratch.py`, applied first) this filter
  leaves opening for writing and creating, removing, renaming, linking and truncating by path
  to it; without Landlock it denies them all (`open`/`openat` with `O_WRONLY`, `O_RDWR`,
  `O_CREAT` or `O_TRUNC`, `creat`, `unlink`, `rename`, `mkdir`, ...; the job thread's
  filesystem is read-only and jobs get no scratch). Either way: `openat2` (flags behind a
  pointer: ENOSYS), and changing permissions, owners, times or extended attributes;
- kernel surfaces a job never needs: namespaces, mounts, BPF, perf events, io_uring (whose
  operations seccomp would not see), userfaultfd, keyrings, module loading, memfd, and
  Landlock (a job must not restrict the thread later jobs run on).

Denied calls fail with EPERM (ENOSYS where a fallback exists), so Python raises
`PermissionError`/`OSError` inside the user's code instead of the worker being killed.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass

CLONE_THREAD = 0x00010000
_WRITE_FLAGS = (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC)

_NETWORK = (
    "socket",
    "socketpair",
    "connect",
    "bind",
    "listen",
    "accept",
    "accept4",
    "sendto",
    "sendmsg",
    "sendmmsg",
    "recvfrom",
    "recvmsg",
    "recvmmsg",
)
_PROCESSES = ("execve", "execveat", "fork", "vfork")
_OTHER_PROCESSES = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_open",
    "pidfd_getfd",
    "pidfd_send_signal",
    "kcmp",
    "tkill",  # takes a bare thread id, which may be another process's
)
# Calls that change files by path, which Landlock confines to the job's scratch directory
# where it is on (`scratch.py`); without it they are denied outright.
_PATH_WRITES = (
    "creat",
    "unlink",
    "unlinkat",
    "rename",
    "renameat",
    "renameat2",
    "mkdir",
    "mkdirat",
    "rmdir",
    "symlink",
    "symlinkat",
    "link",
    "linkat",
    "truncate",
    "ftruncate",
)
# Calls Landlock does not check: denied either way.
_FILE_WRITES = (
    "chmod",
    "fchmod",
    "fchmodat",
    "chown",
    "fchown",
    "lchown",
    "fchownat",
    "mknod",
    "mknodat",
    "utime",
    "utimes",
    "utimensat",
    "futimesat",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
)
_KERNEL = (
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "keyctl",
    "add_key",
    "request_key",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "memfd_create",
    "personality",
    "acct",
    "swapon",
    "swapoff",
    "reboot",
    # A job must not add Landlock rules of its own to the thread later jobs run on.
    "landlock_create_ruleset",
    "landlock_add_rule",
    "landlock_restrict_self",
)
# Signals: only to this process (the first argument is its pid).
_SIGNALS = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")


class ContainmentUnavailable(RuntimeError):
    """This machine cannot load the filter (no libseccomp, or a kernel without seccomp)."""


@dataclass(frozen=True)
class Support:
    available: bool
    reason: str  # why not, or what was found


def _pyseccomp():  # noqa: ANN202 - the module, imported late: it loads libseccomp on import
    try:
        import pyseccomp
    except (ImportError, OSError, RuntimeError) as exc:  # no binding, or no libseccomp.so.2
        raise ContainmentUnavailable(f"libseccomp cannot be loaded: {exc}") from exc
    return pyseccomp


def build_filter(pid: int | None = None, landlock: bool = False):  # noqa: ANN201 - a SyscallFilter
    """The job-thread filter for process `pid` (default: this one); see module doc.

    `landlock`: the thread's writes are already confined by path (`scratch.restrict_writes`),
    so opening for writing and the path calls in `_PATH_WRITES` are left to Landlock.
    """
    sc = _pyseccomp()
    pid = os.getpid() if pid is None else pid
    eperm, enosys = sc.ERRNO(errno.EPERM), sc.ERRNO(errno.ENOSYS)
    flt = sc.SyscallFilter(defaction=sc.ALLOW)
    # Only this thread: without TSYNC libseccomp applies the filter to the calling thread.
    denied = (*_NETWORK, *_PROCESSES, *_OTHER_PROCESSES, *_FILE_WRITES, *_KERNEL)
    for name in denied if landlock else (*denied, *_PATH_WRITES):
        _deny(sc, flt, eperm, name)
    for name in ("clone3", "openat2"):
        _deny(sc, flt, enosys, name)
    flt.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))
    for flag in () if landlock else _WRITE_FLAGS:  # one rule per flag: rules are OR-ed
        flt.add_rule(eperm, "open", sc.Arg(1, sc.MASKED_EQ, flag, flag))
        flt.add_rule(eperm, "openat", sc.Arg(2, sc.MASKED_EQ, flag, flag))
    for name in _SIGNALS:
        flt.add_rule(eperm, name, sc.Arg(0, sc.NE, pid))
    return flt


def _deny(sc, flt, action: int, name: str) -> None:  # noqa: ANN001
    try:
        flt.add_rule(action, name)
    except OSError as exc:  # a call this architecture does not have (e.g. `fork` on arm64)
        if exc.errno not in (errno.EFAULT, errno.EINVAL, errno.EDOM):
            raise


def contain_thread(landlock: bool = False) -> None:
    """Load the filter on the calling thread, for the rest of its life; see module doc.

    `landlock`: the caller already confined this thread's writes with Landlock.
    """
    try:
        build_filter(landlock=landlock).load()
    except ContainmentUnavailable:
        raise
    except OSError as exc:  # the kernel refused it (no CONFIG_SECCOMP_FILTER)
        raise ContainmentUnavailable(f"the kernel refused the seccomp filter: {exc}") from exc


def is_contained() -> bool:
    """Whether the calling thread runs under a seccomp filter (from /proc, per thread)."""
    path = f"/proc/self/task/{threading.get_native_id()}/status"
    try:
        with open(path) as status:
            for line in status:
                if line.startswith("Seccomp:"):
                    return line.split()[1] == "2"
    except OSError:
        pass
    return False


def probe() -> Support:
    """Whether this machine can contain a job thread: load the filter on a throwaway thread."""
    found: list[Support] = []

    def attempt() -> None:
        try:
            contain_thread()
        except ContainmentUnavailable as exc:
            found.append(Support(False, str(exc)))
        else:
            ok = is_contained()
            found.append(Support(ok, "seccomp filter loaded" if ok else "filter not in effect"))

    thread = threading.Thread(target=attempt, name="edif-seccomp-probe", daemon=True)
    thread.start()
    thread.join()
    return found[0] if found else Support(False, "the probe thread failed")
