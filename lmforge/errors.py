"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (config, checkpoint, data, CLI argument): not a bug in lmforge."""


class Interrupted(Exception):
    """SIGTERM or SIGINT reached a training run, which saved a checkpoint first: the CLI exits 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class Diverged(UserError):
    """Training kept producing non-finite losses or gradients; the last good checkpoint is intact."""
