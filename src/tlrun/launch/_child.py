"""Exec shim: `python -m tlrun.launch._child <launcher pid> -- <argv...>`.

Sets PR_SET_PDEATHSIG=SIGTERM so that the worker gets a warm shutdown when its launcher dies, even by
SIGKILL, then execs the real command (the setting survives exec). Doing this in a shim rather than in
subprocess's preexec_fn keeps the launcher safe to spawn while it has threads (preexec_fn is not).
The kernel fires the signal when the *thread* that forked us exits: tlrun spawns from its main thread.
"""

import os
import signal
import sys

EXIT_PARENT_GONE = 125


def main() -> None:
    expected_parent = int(sys.argv[1])
    argv = sys.argv[3:]
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
            sys.stderr.write(f"tlrun: prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}\n")
    # The launcher may have died between fork and prctl: then no signal will ever come. Stop here.
    if os.getppid() != expected_parent:
        sys.exit(EXIT_PARENT_GONE)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
