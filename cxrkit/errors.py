"""Every error a user can fix, under one torch-free base class: the CLIs catch `CxrkitError` once and
print its one-line message (`error: ...`, exit code 2) instead of a traceback."""
from __future__ import annotations


class CxrkitError(Exception):
    """A user-fixable problem; str() is one line naming the file or flag and the fix."""


class UsageError(CxrkitError, ValueError):
    """A wrong flag value or flag combination."""


class DataError(CxrkitError):
    """A problem with the data folder."""


class CheckpointError(CxrkitError):
    """A checkpoint that cannot be used."""


class InferenceError(CxrkitError):
    """A problem with inference inputs, model files or options."""


class SaveDirError(UsageError):
    """The output folder is in use or holds an earlier run's outputs."""


class ImageReadError(CxrkitError):
    """A file that cannot be used as an image; the pipelines turn it into a counted, logged skip."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")
