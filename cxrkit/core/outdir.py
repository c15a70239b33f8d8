"""A run owns its output folder (inference --save_dir, training --output_dir): a lock, a manifest of
what it wrote, unique temp names.

    run = claim_save_dir(save_dir, overwrite=False)
    run.plan(["predictions.csv", "summary.json", "annotated/a.png", ...])   # what it will write
    with run:                                                               # lock, checks, manifest
        ...write the files (io_utils.tmp_name() for temporary names)...
        run.finish()                                                        # manifest: complete

* Lock: `<save_dir>/.cxrkit.lock`, an exclusive advisory lock (flock) held for the whole run; the OS
  drops it when the process ends, even on kill -9, so a crashed run never blocks the next one. A
  folder locked by another running process is refused (SaveDirError, one line naming its pid). The
  lock file itself stays (removing it would let two later runs lock two different files).
* Manifest: `<save_dir>/.cxrkit_outputs.json`, written atomically and carrying a SHA-256 of its own
  content. It lists the planned files BEFORE the first output is written (status "running": a crashed
  run's files are known too) and, at the end (status "complete"), each file's size and SHA-256.
* An earlier run's outputs (a valid manifest listing files that exist) are refused unless
  overwrite=True; then exactly the listed files whose content is unchanged are removed (size and
  SHA-256; for a crashed run's unhashed entries: written after that run started), and emptied
  sub-folders with them. A changed file is kept (and then refused below when this run would write it).
* Never a user's file: a planned output path that already exists and that no valid manifest lists
  (a folder from another tool, a user's summary.json, a manifest-less older output folder) is refused,
  with or without overwrite; nothing is removed. A manifest that does not parse, has another format or
  whose checksum does not match marks an "unknown folder": refused, never cleaned.
* job (inference): an identity of the run (inputs, model file, planned outputs; job_identity). A folder
  whose earlier run was the SAME job (a requeued SLURM task, a retried pod) is replaced without
  --overwrite, exactly as --overwrite would; any other earlier run is still refused.
* keep_earlier (training --resume): the earlier run's files are kept and carried into this manifest,
  and the run may write them again (that is what continuing the run means).
* Training: `holds_output_dir` wraps train(cfg, opts) in the same claim for --output_dir.
* Input discovery skips the save folder and any folder holding a manifest (`is_output_dir`), so a
  --save_dir inside --data_dir is never read back as input.
* Every OS error (disk full, no permission, read-only) becomes one line naming the path
  (cxrkit.core.errors.os_error).

Torch-free: the ONNX inference path imports it.
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path

from .errors import SaveDirError, os_error
from .io_utils import sha256_file, write_json_atomic

try:  # the lock primitive, chosen once: flock on POSIX, msvcrt byte-range locks on Windows
    import fcntl
    msvcrt = None
except ImportError:  # pragma: no cover - Windows
    import msvcrt
    fcntl = None

log = logging.getLogger("cxrkit")

LOCK_NAME = ".cxrkit.lock"
MANIFEST_NAME = ".cxrkit_outputs.json"
MANIFEST_FORMAT = "cxrkit-outputs-v2"
MTIME_SLACK_NS = 2_000_000_000  # file systems with coarse timestamps (FAT: 2 s)


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


def manifest_checksum(m: dict) -> str:
    """SHA-256 of a manifest's content (every key but "checksum"), canonical JSON."""
    body = {k: v for k, v in m.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class SaveDirClaim:
    """The lock and manifest of one run in one folder (see the module docstring)."""

    def __init__(self, save_dir, overwrite: bool = False, flag: str = "--save_dir", tool: str = "cxrkit",
                 keep_earlier: bool = False, keep_flag: str | None = None, job: str | None = None):
        self.dir, self.overwrite, self.flag, self.tool = Path(save_dir), bool(overwrite), flag, tool
        self.job = job
        self.keep_earlier, self.keep_flag = bool(keep_earlier), keep_flag
        self.fd = None
        self.planned: list[str] = []
        self.carried: dict[str, dict] = {}   # keep_earlier: the earlier run's entries, kept
        self.removed: list[str] = []
        self.kept_changed: list[str] = []
        self.started = _now()
        self.started_ns = time.time_ns()

    # ------------------------------------------------------------------------------ lock, refusal
    def acquire(self) -> "SaveDirClaim":
        d = self.dir
        if d.exists() and not d.is_dir():
            raise SaveDirError(f"{self.flag} {d} is a file, not a folder; choose a folder for the outputs")
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise os_error(e, d, f"create the output folder ({self.flag})") from None
        if not _lock(fd):
            try:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "pid unknown"
            except OSError:
                holder = "pid unknown"
            os.close(fd)
            raise SaveDirError(f"{self.flag} {d} is being written by another running process ({holder}); wait for "
                               f"it to finish or choose another {self.flag}")
        self.fd = fd
        try:
            try:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, f"pid {os.getpid()}, started {self.started}".encode())
            except OSError as e:
                raise os_error(e, d / LOCK_NAME) from None
            self._check_earlier_outputs()
            if self.planned:
                self._write_manifest("running")
        except BaseException:
            self.release()
            raise
        return self

    def _unknown(self, why: str) -> SaveDirError:
        return SaveDirError(f"{self.flag} {self.dir}: its output manifest {MANIFEST_NAME} {why}, so cxrkit cannot "
                            f"tell which files there it wrote (unknown folder: nothing was removed); move what you "
                            f"want to keep elsewhere and empty the folder, or choose another {self.flag}")

    def _earlier_manifest(self) -> dict | None:
        """The earlier run's manifest (validated), None when there is none; SaveDirError when damaged."""
        mp = self.dir / MANIFEST_NAME
        if not mp.exists():
            return None
        try:
            m = json.loads(mp.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise self._unknown(f"cannot be read ({type(e).__name__})") from None
        if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("files"), dict):
            raise self._unknown(f"is not a {MANIFEST_FORMAT} manifest")
        if m.get("checksum") != manifest_checksum(m):
            raise self._unknown("does not match its checksum (edited or damaged)")
        return m

    def _inside(self, rel: str) -> bool:
        try:
            root = self.dir.resolve()
            p = (root / rel).resolve()
            return p != root and root in p.parents
        except (OSError, ValueError):
            return False

    def _unchanged(self, rel: str, entry: dict, m: dict) -> bool:
        """The file is still what that run wrote: same size and SHA-256; an entry the run had not
        hashed yet (it did not finish) must at least have been written after that run started."""
        p = self.dir / rel
        try:
            st = p.stat()
            if "sha256" in entry:
                return st.st_size == entry.get("size") and sha256_file(p) == entry["sha256"]
            return st.st_mtime_ns >= int(m.get("started_ns", 0)) - MTIME_SLACK_NS and not p.is_symlink()
        except (OSError, TypeError, ValueError):
            return False

    def _check_earlier_outputs(self) -> None:
        m = self._earlier_manifest()
        entries = m["files"] if m is not None else {}
        present = {rel: e for rel, e in entries.items()
                   if isinstance(e, dict) and self._inside(rel) and (self.dir / rel).is_file()}
        same_job = self.job is not None and m is not None and m.get("job") == self.job
        if present and same_job and not self.overwrite:
            log.info("%s %s: a rerun of the same job (same inputs, model and outputs): replacing its own outputs",
                     self.flag, self.dir)
        if present and not (self.overwrite or self.keep_earlier or same_job):
            state = m.get("status", "")
            if state == "running":  # we hold the lock, so that run is not running any more
                state = "incomplete: that run did not finish"
            when = m.get("finished") or m.get("started") or ""
            keep = f", {self.keep_flag} to continue it" if self.keep_flag else ""
            raise SaveDirError(f"{self.flag} {self.dir} holds an earlier run's outputs ({len(present)} files, {state}"
                               f"{', ' + when if when else ''}): pass --overwrite to replace them (only the files "
                               f"that run wrote and that are unchanged since are removed){keep}, or choose another "
                               f"{self.flag}")
        ours = {rel: e for rel, e in present.items() if self._unchanged(rel, e, m)}
        if self.keep_earlier:  # --resume: continue that run, writing its files again
            self.carried = dict(ours)
            return
        for rel in self.planned:  # never write over a file no run recorded (or that changed since)
            if rel not in ours and (self.dir / rel).exists():
                why = ("changed since the earlier run wrote it" if rel in present
                       else "no cxrkit run recorded writing it")
                raise SaveDirError(f"{self.flag} {self.dir} already holds {rel} ({why}): this run would replace "
                                   f"it; move it away or choose another {self.flag} (nothing was removed)")
        self.kept_changed = sorted(set(present) - set(ours))
        for rel in sorted(ours):
            try:
                (self.dir / rel).unlink()
                self.removed.append(rel)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise os_error(e, self.dir / rel, "remove the earlier output") from None
        for sub in sorted({Path(f).parent for f in self.removed}, key=lambda q: -len(q.parts)):
            if str(sub) not in ("", "."):  # emptied output folders go too (never a folder with other files)
                try:
                    (self.dir / sub).rmdir()
                except OSError:
                    pass
        if self.kept_changed:
            log.warning("%s %s: kept %d earlier output(s) changed since that run wrote them (e.g. %s)", self.flag,
                        self.dir, len(self.kept_changed), self.kept_changed[0])
        if m is not None:
            try:
                (self.dir / MANIFEST_NAME).unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                raise os_error(e, self.dir / MANIFEST_NAME, "remove the earlier manifest") from None

    # --------------------------------------------------------------------------------- manifest
    def _write_manifest(self, status: str, files: dict | None = None) -> None:
        if files is None:  # running: planned files, not hashed yet (earlier entries kept where carried)
            files = {**self.carried, **{f: {} for f in self.planned}}
        m = {"format": MANIFEST_FORMAT, "tool": self.tool, "status": status, "pid": os.getpid(),
             "started": self.started, "started_ns": self.started_ns, "files": dict(sorted(files.items()))}
        if self.job is not None:
            m["job"] = self.job
        if status == "complete":
            m["finished"] = _now()
        if self.removed:
            m["removed_from_earlier_run"] = len(self.removed)
        m["checksum"] = manifest_checksum(m)
        write_json_atomic(self.dir / MANIFEST_NAME, m, indent=1)

    def plan(self, files) -> None:
        """Record the files this run will write (relative paths). Before acquire(): checked against the
        folder there; after it: added to the running manifest."""
        self.planned += [str(f) for f in files if str(f) not in self.planned]
        if self.fd is not None:
            self._write_manifest("running")

    def finish(self) -> None:
        """Mark the run complete: each planned file that exists, with its size and SHA-256."""
        files = {rel: e for rel, e in self.carried.items() if (self.dir / rel).is_file()}
        for rel in self.planned:
            p = self.dir / rel
            try:
                if p.is_file():
                    files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
            except OSError as e:
                raise os_error(e, p, "read back the output") from None
        self._write_manifest("complete", files)

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


def claim_save_dir(save_dir, overwrite: bool = False, flag: str = "--save_dir", tool: str = "cxrkit",
                   keep_earlier: bool = False, keep_flag: str | None = None, job: str | None = None) -> SaveDirClaim:
    """A context manager that holds the folder for one run (see the module docstring)."""
    return SaveDirClaim(save_dir, overwrite, flag, tool, keep_earlier, keep_flag, job)


def job_identity(model_file, inputs, planned, extra=None) -> str:
    """A run's identity for the manifest: the model file (path, size, modification time), the inputs (paths,
    in order), the planned outputs and anything else that defines the job (e.g. the shard)."""
    try:
        st = Path(model_file).stat()
        model = [str(Path(model_file).resolve()), st.st_size, st.st_mtime_ns]
    except OSError:
        model = [str(model_file)]
    blob = json.dumps({"model": model, "inputs": [str(i) for i in inputs], "planned": sorted(planned),
                       "extra": extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def holds_output_dir(planned, if_absent=()):
    """Decorator for training, `train(cfg, opts)`: the run holds opts.output_dir like an inference run holds
    --save_dir (rank 0 of a torchrun job only; the other ranks write nothing): a second run into it is
    refused naming the pid, an earlier run's outputs are refused unless --overwrite (which removes only
    the files its manifest lists, unchanged) or --resume (which keeps them), and the manifest lists
    `planned` (relative paths) plus each of `if_absent` that does not exist once the folder is claimed
    (split.json: a split file the user put there is read, not written)."""
    def deco(fn):
        @functools.wraps(fn)
        def run(cfg, opts):
            if int(os.environ.get("RANK", "0")) != 0:
                return fn(cfg, opts)
            claim = claim_save_dir(opts.output_dir, opts.overwrite, flag="--output_dir", tool="cxrkit training",
                                   keep_earlier=opts.resume, keep_flag="--resume")
            claim.plan(planned)
            with claim:
                claim.plan([f for f in if_absent if not (claim.dir / f).exists()])
                result = fn(cfg, opts)
                claim.finish()
            return result
        return run
    return deco
