"""The agent's start-up report on its sandbox: what this machine can enforce, or a refusal.

Role: the OS layers of the sandbox (`containment.py`: seccomp; `scratch.py`: Landlock) need
kernel features a site may lack. At start the agent probes both on a throwaway thread and
prints one line each; where one is missing it refuses to serve (`ConfigError`, naming the fix
and the opt-out) unless the site config opts out explicitly, in which case it serves with a
WARNING line that says what is not enforced. It also names the code policy in force.
"""

from __future__ import annotations

from collections.abc import Callable

from edif.errors import ConfigError
from site_agent.config import SiteConfig
from site_agent.containment import Support


def check_sandbox(
    cfg: SiteConfig,
    seccomp: Callable[[], Support] | None = None,
    landlock: Callable[[], tuple[bool, str]] | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """Say what is enforced here; refuse to serve where a required layer is missing.

    `seccomp` and `landlock` probe this machine (default: `containment.probe`,
    `scratch.probe`, each on a throwaway thread); `say` prints one line.
    """
    from site_agent import containment, scratch
    from site_agent.sandbox_policy import build_source_policy

    support = (seccomp or containment.probe)()
    if support.available:
        say(f"edif-agent sandbox: seccomp job-thread containment on ({support.reason})")
    elif cfg.sandbox.require_seccomp:
        raise ConfigError(
            f"site {cfg.site}: this machine cannot contain job threads with seccomp "
            f"({support.reason}); install libseccomp2 and the pyseccomp package, or set "
            "`sandbox: {require_seccomp: false}` in the site config to serve without it"
        )
    else:
        say(
            f"edif-agent sandbox: WARNING seccomp unavailable ({support.reason}); serving "
            "WITHOUT OS-level containment because the site config sets require_seccomp: false"
        )
    available, reason = (landlock or scratch.probe)()
    if available:
        say(f"edif-agent sandbox: Landlock on ({reason})")
    elif cfg.sandbox.require_landlock:
        raise ConfigError(
            f"site {cfg.site}: this kernel cannot confine job writes to a scratch directory "
            f"with Landlock ({reason}); boot a kernel with Landlock enabled, or set "
            "`sandbox: {require_landlock: false}` in the site config to serve with read-only "
            "job threads and no scratch directories"
        )
    else:
        writes = (
            "the seccomp filter refuses every file write"
            if support.available
            else "file writes are NOT restricted"
        )
        say(
            f"edif-agent sandbox: WARNING Landlock unavailable ({reason}); jobs get no scratch "
            f"directory and {writes} (the site config sets require_landlock: false)"
        )
    say(f"edif-agent sandbox: code policy {build_source_policy(cfg.sandbox.policy).label}")
