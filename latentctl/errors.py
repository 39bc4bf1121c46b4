"""Errors that the CLI turns into one line and an exit code (no traceback)."""


class LatentctlError(Exception):
    """Base class: a problem the user can fix. `exit_code` is what the CLI exits with."""

    exit_code = 2


class UsageError(LatentctlError):
    """Flags that do not fit together, or a bad value."""


class ModelError(LatentctlError):
    """An unknown model name or a models.toml that does not parse."""


class WeightsError(LatentctlError):
    """Weights that are missing, unreadable, unsafe, or not a KL autoencoder."""


class BackendUnavailable(LatentctlError):
    """An attention backend that cannot run here (missing package or device)."""


class InputError(LatentctlError):
    """One input item is bad (unreadable image, wrong latent file); the run goes on."""

    exit_code = 1


class Skip(Exception):
    """An input deliberately left out (e.g. an image too small for its bucket): its record says 'skipped' and why."""
