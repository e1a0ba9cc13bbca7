"""The errors a user can fix. The CLI catches VespoUserError once, for every subcommand: it prints the
message (which names the key, file or resource) and exits with code 2, without a traceback.

Everything else (a bug, an actor that crashed) is not a VespoUserError: the run ends with a traceback
or, for an actor failure, with loops.interrupt.TrainingAborted and the resume hint.
"""
from __future__ import annotations


class VespoUserError(Exception):
    """Base of every error the user can fix by changing a setting, a file or the machine."""

    label = ""  # printed before the message by the CLI ("config error: ...")


class ConfigError(VespoUserError, ValueError):
    """An impossible or unsupported setting; the message names the key."""

    label = "config error"


class DataError(VespoUserError, ValueError):
    """A data file that cannot be used; the message names the file and what is wrong."""


class ResourceError(VespoUserError, RuntimeError):
    """The Ray cluster cannot host the actors (CPUs, GPUs), or cannot be reached."""


class CheckpointError(VespoUserError, RuntimeError):
    """A run directory or checkpoint that cannot be used (missing, incomplete, another world size)."""


class RunNotFound(CheckpointError, FileNotFoundError):
    """A run directory, or a file of one, that is not there."""


class RunDirExists(VespoUserError, FileExistsError):
    """A new run would be mixed into an old one."""


class SubmitError(VespoUserError):
    """`vespo submit`: a working directory too large to upload, nothing to run, or no `ray` command."""


class BackendMissing(VespoUserError, ImportError):
    """An optional backend (e.g. vLLM) that is not installed; the message says how to install it."""
