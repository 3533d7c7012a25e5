"""How the torchrun launchers end: exit once the process group is destroyed, without the
interpreter's teardown."""

import os
import sys


def exit_now(status: int) -> None:
    """Exit with ``status``, skipping the interpreter's teardown. Call it once the group is
    destroyed and the launcher's files are closed: with gloo, a rank could still abort in that
    teardown ("terminate called without an active exception", after its PASS line, once in CI),
    when objects of gloo's worker threads are freed during finalization."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
