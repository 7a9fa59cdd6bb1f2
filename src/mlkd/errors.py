"""The errors mlkd raises about what it was given: a value, a file, a config, a run folder.

Each names the bad thing and what was expected. The command line prints them in one line (``--debug`` shows the
traceback); any other exception is a bug in mlkd and keeps its traceback. They subclass the built-in type a
caller would expect (``ValueError``, ``FileNotFoundError``, ...), so ``except ValueError`` still works.
"""

from __future__ import annotations


class MlkdError(Exception):
    """Base class: an input, file or state that mlkd refuses, with a message saying why and what to do."""


class BadInput(MlkdError, ValueError):
    """A value, file content, config key or model that is not what mlkd expects."""


class NotFound(MlkdError, FileNotFoundError):
    """A file or folder that is not there (or not a regular file where one is needed)."""


class CannotWrite(MlkdError, OSError):
    """A file mlkd could not write (read-only folder, disk full, file-size limit); nothing partial is left."""


class RunConflict(MlkdError, ValueError):
    """A run folder that cannot be used: in use by another process, or holding something else than this run."""


class RunStopped(MlkdError, FloatingPointError):
    """Training stopped on a non-finite loss; the message has the losses, where, and the last good checkpoint."""


class BadFile(MlkdError, OSError):
    """A file that exists but cannot be read as what it should be (a corrupt image, a damaged cache)."""


class MissingEntry(MlkdError, KeyError):
    """A key (an image id, a layer name) that a file or cache does not hold."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""
