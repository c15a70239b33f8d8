"""A run owns its output folder (--save_dir): a lock, a manifest of what it wrote, unique temp names.

    with claim_save_dir(save_dir, overwrite=False) as run:
        run.plan(["predictions.csv", "summary.json", "annotated/a.png", ...])   # before writing
        ...write the files (tmp_name() for temporary names)...
        run.finish()                                                            # manifest: complete

* Lock: `<save_dir>/.cxrkit.lock`, an exclusive advisory lock (flock) held for the whole run; the OS
  drops it when the process ends, even on kill -9, so a crashed run never blocks the next one. A
  folder locked by another running process is refused (SaveDirError, one line). The lock file itself
  stays (removing it would let two later runs lock two different files).
* Manifest: `<save_dir>/.cxrkit_outputs.json` lists the files the run writes; it is written BEFORE the
  first output (status "running": a crashed run's files are known too) and completed at the end
  (status "complete", plus any other file the run created, e.g. a report).
* A folder holding an earlier run's outputs (a manifest, or predictions.csv / summary.json from a
  version without manifests) is refused unless overwrite=True; then exactly the files in the earlier
  manifest are removed (for a manifest-less folder: predictions.csv, summary.json and annotated/*.png,
  masks/*_mask.png, cams/*_cam.npy), and emptied output sub-folders with them. Other files are kept.
* Input discovery skips the save folder and any folder holding a manifest (`is_output_dir`), so a
  --save_dir inside --data_dir is never read back as input.

Torch-free: the ONNX inference path imports it.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from pathlib import Path

from .errors import SaveDirError
from .io_utils import tmp_name, write_json_atomic  # noqa: F401  (tmp_name re-exported)

try:  # the lock primitive, chosen once: flock on POSIX, msvcrt byte-range locks on Windows
    import fcntl
    msvcrt = None
except ImportError:  # pragma: no cover - Windows
    import msvcrt
    fcntl = None

log = logging.getLogger("cxrkit")

LOCK_NAME = ".cxrkit.lock"
MANIFEST_NAME = ".cxrkit_outputs.json"
MANIFEST_FORMAT = "cxrkit-outputs-v1"
LEGACY_OUTPUTS = ("predictions.csv", "summary.json")
LEGACY_PATTERNS = (("annotated", "*.png"), ("masks", "*_mask.png"), ("cams", "*_cam.npy"))
OUTPUT_SUBDIRS = ("annotated", "masks", "cams")


def is_output_dir(d) -> bool:
    """A folder some cxrkit run wrote its outputs into (it holds a manifest)."""
    return (Path(d) / MANIFEST_NAME).is_file()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _lock(fd) -> bool:
    """Non-blocking exclusive lock on an open file; False when another process holds it."""
    if fcntl is None:  # pragma: no cover - Windows
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:  # a file system without locks (some network mounts): run, but say so
        log.warning("cannot lock the output folder (%s): another run writing there at the same time would not "
                    "be noticed", e.strerror or e)
        return True


def _unlock(fd) -> None:
    try:
        if fcntl is None:  # pragma: no cover - Windows
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        pass  # closing the file releases it anyway


class SaveDirClaim:
    """The lock and manifest of one run in one folder (see the module docstring)."""

    def __init__(self, save_dir, overwrite: bool = False, flag: str = "--save_dir", tool: str = "cxrkit"):
        self.dir, self.overwrite, self.flag, self.tool = Path(save_dir), bool(overwrite), flag, tool
        self.fd = None
        self.files: list[str] = []
        self.removed: list[str] = []
        self._before: set[str] = set()
        self.started = _now()

    # ------------------------------------------------------------------------------ lock, refusal
    def acquire(self) -> "SaveDirClaim":
        d = self.dir
        if d.exists() and not d.is_dir():
            raise SaveDirError(f"{self.flag} {d} is a file, not a folder; choose a folder for the outputs")
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SaveDirError(f"{self.flag} {d}: cannot create it ({e.strerror or e})") from None
        if not _lock(fd):
            try:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
            except OSError:
                holder = "unknown"
            os.close(fd)
            raise SaveDirError(f"{self.flag} {d} is being written by another running process ({holder}); wait for "
                               f"it to finish or choose another {self.flag}")
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"pid {os.getpid()}, started {self.started}".encode())
            self._check_earlier_outputs()
            self._before = self._snapshot()
        except BaseException:
            self.release()
            raise
        return self

    def _earlier(self) -> tuple[dict | None, list[str]]:
        """(earlier manifest or None, the files it names that exist, relative paths)."""
        mp = self.dir / MANIFEST_NAME
        if mp.is_file():
            try:
                m = json.loads(mp.read_text(encoding="utf-8"))
                names = [str(f) for f in m.get("files", [])]
            except (OSError, ValueError, AttributeError):
                m, names = {"status": "unreadable"}, []
            return m, [f for f in names if self._inside(f) and (self.dir / f).is_file()]
        legacy = [f for f in LEGACY_OUTPUTS if (self.dir / f).is_file()]
        if not legacy:
            return None, []
        for sub, pat in LEGACY_PATTERNS:
            legacy += [str(p.relative_to(self.dir)) for p in sorted((self.dir / sub).glob(pat)) if p.is_file()]
        return {"status": "written by a cxrkit version without a manifest"}, legacy

    def _inside(self, rel: str) -> bool:
        try:
            root = self.dir.resolve()
            p = (root / rel).resolve()
            return p != root and root in p.parents
        except (OSError, ValueError):
            return False

    def _check_earlier_outputs(self) -> None:
        m, files = self._earlier()
        if m is None:
            return
        if files and not self.overwrite:
            state = m.get("status", "")
            if state == "running":  # we hold the lock, so that run is not running any more
                state = "incomplete: that run did not finish"
            when = m.get("finished") or m.get("started") or ""
            raise SaveDirError(f"{self.flag} {self.dir} holds an earlier run's outputs ({len(files)} files, {state}"
                               f"{', ' + when if when else ''}): pass --overwrite to replace them (only the files "
                               f"that run wrote are removed), or choose another {self.flag}")
        for rel in files:
            try:
                (self.dir / rel).unlink()
                self.removed.append(rel)
            except FileNotFoundError:
                pass
        for sub in sorted({Path(f).parent for f in self.removed} | set(map(Path, OUTPUT_SUBDIRS))):
            if str(sub) not in ("", "."):  # emptied output folders go too (never a folder with other files)
                try:
                    (self.dir / sub).rmdir()
                except OSError:
                    pass
        try:
            (self.dir / MANIFEST_NAME).unlink()
        except FileNotFoundError:
            pass

    def _snapshot(self) -> set[str]:
        """Files in the folder and its immediate (non-hidden) sub-folders, where runs write."""
        out = set()
        try:
            subs = [self.dir] + [d for d in self.dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
            for d in subs:
                out.update(str(p.relative_to(self.dir)) for p in d.iterdir() if p.is_file())
        except OSError:
            pass
        return out

    # --------------------------------------------------------------------------------- manifest
    def _write_manifest(self, status: str) -> None:
        m = {"format": MANIFEST_FORMAT, "tool": self.tool, "status": status, "pid": os.getpid(),
             "started": self.started, "files": sorted(set(self.files))}
        if status == "complete":
            m["finished"] = _now()
        if self.removed:
            m["removed_from_earlier_run"] = len(self.removed)
        write_json_atomic(self.dir / MANIFEST_NAME, m, indent=1)

    def plan(self, files) -> None:
        """Record the files this run is about to write (before the first one is written)."""
        self.files += [str(f) for f in files]
        self._write_manifest("running")

    def finish(self) -> None:
        """Mark the run complete; files it created that were not planned (e.g. a report) are added."""
        now = self._snapshot()
        new = {f for f in now - self._before if not Path(f).name.startswith(".")}
        self.files = sorted({f for f in self.files if (self.dir / f).is_file()} | new)
        self._write_manifest("complete")

    def release(self) -> None:
        if self.fd is not None:
            _unlock(self.fd)
            os.close(self.fd)
            self.fd = None

    def __del__(self):  # a safety net: an exception between acquire() and release() never keeps the lock
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __enter__(self) -> "SaveDirClaim":
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_save_dir(save_dir, overwrite: bool = False, flag: str = "--save_dir", tool: str = "cxrkit") -> SaveDirClaim:
    """A context manager that holds the folder for one run (see the module docstring)."""
    return SaveDirClaim(save_dir, overwrite, flag, tool)
