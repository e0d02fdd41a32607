"""Whether this process may create the userfaultfd a VM hands to fcsnap, asked of the kernel.

A VM (or the test suite's stand-in) that cannot create one fails before it ever connects, and
its server would wait for it in vain; `userfaultfd_problem` lets a command that starts both
(`fcsnap demo`) say what is missing, and how to get it, before it starts anything.
"""

from __future__ import annotations

import errno
import os
import platform

from fcsnap.uffd import abi

HOW_TO_ALLOW = (
    "run as root, or set `sysctl vm.unprivileged_userfaultfd=1`, or give this user read-write "
    "access to /dev/userfaultfd (Linux 6.1+)"
)


def userfaultfd_problem() -> str | None:
    """None when a userfaultfd with UFFD_FEATURE_EVENT_REMOVE (what Firecracker's Uffd memory
    backend asks for) can be created here; else one line: what is missing and how to get it."""
    if platform.system() != "Linux":
        return f"userfaultfd is Linux's; this is {platform.system()}"
    try:
        fd = abi.userfaultfd()
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES):
            return f"this user may not create one ({os.strerror(e.errno)}): {HOW_TO_ALLOW}"
        if e.errno == errno.ENOSYS:
            return (
                f"no userfaultfd here ({e.strerror or e}): Linux on x86_64 or aarch64 built "
                "with CONFIG_USERFAULTFD=y is needed"
            )
        return f"cannot create a userfaultfd: {e.strerror or e}"
    try:
        abi.api_handshake(fd, abi.UFFD_FEATURE_EVENT_REMOVE)
    except OSError as e:
        return (
            f"this kernel's userfaultfd lacks UFFD_FEATURE_EVENT_REMOVE ({e.strerror or e}): "
            "Linux 4.11 or later is needed"
        )
    finally:
        os.close(fd)
    return None
