"""The one exception type for bad input: the CLI prints its message and exits non-zero."""


class UserError(Exception):
    """A problem with what the user gave us (a file, a config value, a flag), not a bug."""


class TrainingFailed(Exception):
    """A run that started but could not finish (a diverged loss, workers that kept failing)."""
