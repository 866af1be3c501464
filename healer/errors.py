"""Errors a user can cause. The CLI prints their message on one line and exits 2."""


class HealerError(Exception):
    """Base class for errors caused by input a person can correct."""


class CheckpointError(HealerError):
    """A model directory or one of its files cannot be read or makes no sense."""


class OutputError(HealerError):
    """An output location cannot be used (exists, not writable, ...)."""
