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


class OutputWriteError(CxrkitError):
    """A file or folder the run writes (or removes) could not be: disk full, no permission, read-only."""


_OS_HINTS = {"ENOSPC": "the disk is full: free space or write to another folder",
             "EDQUOT": "the disk quota is used up: free space or write to another folder",
             "EACCES": "no permission: fix the folder's permissions or write to another folder",
             "EPERM": "not permitted: fix the folder's permissions or write to another folder",
             "EROFS": "the file system is read-only: write to another folder",
             "EISDIR": "a folder is in the way: move it or choose another path",
             "ENOTDIR": "a file is in the way where a folder is needed: move it or choose another path"}


def os_error(e: OSError, path, doing: str = "write") -> OutputWriteError:
    """THE conversion of an OS error on an output path into one line naming the path and the fix
    (every writer uses it: cxrkit.core.io_utils.atomic_path, cxrkit.core.outdir)."""
    import errno as _errno
    code = _errno.errorcode.get(e.errno or 0, "")
    reason = e.strerror or str(e) or type(e).__name__
    hint = _OS_HINTS.get(code, "check the path and the disk")
    return OutputWriteError(f"cannot {doing} {path}: {reason}{f' ({code})' if code else ''}; {hint}")
