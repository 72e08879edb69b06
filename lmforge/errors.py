"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2. Beside it, the
warnings a careful user wants: input that works but is probably not what was meant."""

import os
import sys


class UserError(Exception):
    """Bad input from the user (config, checkpoint, data, CLI argument): not a bug in lmforge."""


class Interrupted(Exception):
    """SIGTERM or SIGINT reached a training run, which saved a checkpoint first: the CLI exits 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class Diverged(UserError):
    """Training kept producing non-finite losses or gradients; the last good checkpoint is intact."""


def warn(message: str) -> None:
    """One line on stderr, `lmforge: warning: ...`, from the first rank only (every rank reaches the same check)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"lmforge: warning: {message}", file=sys.stderr, flush=True)
