"""Content-addressed cache for the expensive stages of a run (policy samples, scores, reference log-probs,
trained adapters).

Why content-addressed: a sweep re-runs the same early stages with identical inputs many times (every λ or β
point needs the same reference samples). Keying an artifact by a hash of *what produced it* (stage name, code
version, full spec) rather than by run directory lets every run that asks for the same thing share one copy,
and a changed spec or bumped version can never silently reuse a stale artifact.

Layout under ``root`` (one filesystem, so publishing is a single rename)::

    <stage>/<key[:2]>/<key>/          published entry: the artifact's files + manifest.json; never modified
    <stage>/.locks/<key>.lock         per-key inter-process lock (filelock)
    <stage>/.tmp-<key>-<rand>/        entry being computed; invisible to readers until renamed into place
    <stage>/.trash/<key>-<rand>/      corrupted entry moved aside while it is deleted

A computation may also keep resumable state outside the entry (``work``: stage 2's checkpoints), so that a
killed run picks up where it stopped; the store deletes that folder, under the key's lock, once the entry is
published, and deletes one left over (a kill between publishing and deleting) on the next lookup.

Invariants: an entry directory exists at its final path only once complete (manifest written last, then one
atomic ``os.rename``), and only a process holding the key's lock ever creates or removes it. That is what lets
the hit path read without taking the lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from filelock import FileLock

from alignment import distributed

__all__ = [
    "MANIFEST_NAME",
    "ArtifactStore",
    "CacheResult",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "canonical_json",
    "content_digest",
    "digest",
    "sha256_file",
]

MANIFEST_NAME = "manifest.json"
_MANIFEST_FORMAT = 1
_MISSING = "entry does not exist"
_CHUNK = 1 << 20
# Stage names become directory names; keeping them to one plain path component means a stage can never
# escape ``root`` or collide with the hidden bookkeeping directories (``.locks``, ``.tmp-*``, ``.trash``).
_STAGE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


@dataclass(frozen=True)
class CacheResult:
    """Outcome of one :meth:`ArtifactStore.get_or_compute` call.

    ``path`` is the published entry directory. Treat it as read-only: other runs share it, and an edit would
    be detected as corruption (with ``verify``) and trigger a recompute.
    """

    path: Path
    key: str
    hit: bool
    stage: str


# ---------------------------------------------------------------------------------------------------------
# Canonical encoding
# ---------------------------------------------------------------------------------------------------------


def _canonical(obj: Any, where: str) -> Any:
    """Reduce ``obj`` to plain JSON values, so that equal specs encode to identical bytes.

    ``where`` is the key path of ``obj`` (``spec.sampler.temps[1]``) so a rejected value can be found in a
    large config. Unknown types are rejected rather than ``str()``-ed: a repr can embed memory addresses or
    omit state, which would make keys silently unstable or collide.
    """
    # numpy first: np.float64 is also a float, but np.float32 / np.int64 are not, and .item() gives the
    # exact Python value for all of them.
    if isinstance(obj, np.generic):
        return _canonical(obj.item(), where)
    if isinstance(obj, np.ndarray):
        return _canonical(obj.tolist(), where)
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)  # normalise int subclasses (IntEnum) so json writes the number, not a repr
    if isinstance(obj, float):
        # json.dumps writes floats with float.__repr__, the shortest string that round-trips, which is
        # identical on every platform and Python >= 3.1. Normalising subclasses keeps that guarantee.
        return float(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _canonical(dataclasses.asdict(obj), where)
    if isinstance(obj, Mapping):  # includes omegaconf.DictConfig
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                # JSON would turn 1 into "1", so {1: x} and {"1": x} would share a key.
                raise TypeError(f"unsupported non-string key {k!r} ({type(k).__name__}) in {where}")
            out[k] = _canonical(v, f"{where}.{k}")
        return out
    if isinstance(obj, Sequence) and not isinstance(obj, (bytes, bytearray, memoryview)):
        # Tuples and lists (and omegaconf.ListConfig) encode the same: a config loader may produce either.
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"unsupported type {type(obj).__qualname__} at {where} in cache spec")


def canonical_json(obj: Any, *, where: str = "spec") -> str:
    """Canonical JSON text of ``obj``: sorted keys, no whitespace, floats by ``repr``.

    Raises ``TypeError`` naming the key path of any value outside the supported types (dict/Mapping,
    list/tuple, str, int, float, bool, None, pathlib paths, numpy scalars/arrays, dataclass instances).
    """
    return json.dumps(_canonical(obj, where), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def digest(obj: Any) -> str:
    """sha256 hex digest of ``canonical_json(obj)``: the package's one hash of a value (cache keys, job keys).

    Where a large content (every sampled text, every stage-2 item) enters a spec, ``content_digest`` stands for
    it instead."""
    return hashlib.sha256(canonical_json(obj).encode("ascii")).hexdigest()


def content_digest(obj: Any) -> str:
    """sha256 of ``obj``'s JSON with sorted keys (Python's default separators): a JSON-native content (lists of
    texts, ids, rounded floats) as one string inside a spec. Not ``digest``'s format because every cached
    sample, score, log-probability and adapter so far was keyed with this one; changing it would orphan them."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Filesystem helpers
# ---------------------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename is only durable once its parent is synced)."""
    # Not every platform lets a directory be opened or fsynced; durability there is best effort.
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(FileNotFoundError):
            path.unlink()


def _share_as_umask_allows(root: Path) -> None:
    """Give every file and folder under ``root`` the permissions the umask allows (0o666 / 0o777 minus it).
    Writers such as safetensors create files 0600, which on a cache shared by a group would make the entry
    unreadable to everyone but its author; the umask is the user's statement of what to share."""
    mask = os.umask(0)
    os.umask(mask)  # reading the umask means setting it; put it back at once
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def sha256_file(path: Path, *, sync: bool = False) -> str:
    """sha256 hex digest of a file, read in chunks (``sync``: fsync it too, as a publisher needs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        if sync:
            # We are reading every byte anyway; syncing here means a crash right after publishing cannot
            # leave a renamed entry whose data never reached the disk.
            with suppress(OSError):
                os.fsync(f.fileno())
    return h.hexdigest()


def _scan_files(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``root`` (recursive), keyed by POSIX relative path."""
    files: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            if p.is_symlink():
                # A link makes the entry depend on something outside it that no checksum protects.
                raise ValueError(
                    f"cache artifacts must be regular files, not symlinks: {p.relative_to(root)}"
                )
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            files[rel] = {"sha256": sha256_file(p, sync=True), "size": p.stat().st_size}
    return files


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or the complete new one, never a prefix.

    The temporary file lives in the destination directory because ``os.replace`` is only atomic within one
    filesystem; it is fsynced before the replace so a crash cannot publish an empty file. Parent directories
    are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open with 0o666 lets the umask decide the final permissions; tempfile.mkstemp would force 0600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> None:
    """:func:`atomic_write_bytes` for text."""
    atomic_write_bytes(path, text.encode(encoding))


def _json_default(obj: Any) -> Any:
    # Summaries are built from numpy results and configs; convert the common types instead of making every
    # caller do it. Anything else is still an error, as with plain json.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"Object of type {type(obj).__qualname__} is not JSON serializable")


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Atomically write ``obj`` as JSON (numpy values, paths and dataclasses converted).

    The text is fully serialised before anything touches the disk, so an unserialisable object leaves an
    existing file untouched. NaN/inf are written as ``NaN``/``Infinity`` (Python's json reads them back)
    rather than failing a run at its very end over one undefined metric.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=_json_default)
    atomic_write_text(path, text + "\n")


# ---------------------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------------------


class ArtifactStore:
    """Content-addressed, crash-safe, multi-process artifact cache rooted at one directory.

    ``verify=True`` re-hashes every file of an entry on each hit. That catches truncated copies, partial
    rsyncs and accidental edits, at the cost of reading the entry once; pass ``verify=False`` for stores of
    large adapters whose integrity is trusted (a manifest must still exist and match the key).

    Locks are ``filelock.FileLock`` files (``flock``), which serialise processes on one host and on most
    shared filesystems (Linux NFS maps flock to POSIX locks).
    """

    def __init__(
        self, root: str | Path, *, verify: bool = True, logger: logging.Logger | None = None
    ) -> None:
        # Absolute now, because Hydra may chdir into a per-job directory after the store is built.
        self.root = Path(root).expanduser().absolute()
        self.verify = verify
        self._log = logger if logger is not None else logging.getLogger(__name__)
        self._events: list[CacheResult] = []

    # -- keys and paths ----------------------------------------------------------------------------------

    @staticmethod
    def _check_stage(stage: str) -> None:
        if not isinstance(stage, str) or not stage or stage.startswith(".") or not set(stage) <= _STAGE_CHARS:
            raise ValueError(
                f"stage must be a non-empty name of [A-Za-z0-9_.-] not starting with '.', got {stage!r}"
            )

    def key(self, stage: str, spec: Mapping[str, Any], *, version: str) -> str:
        """sha256 hex digest of the canonical JSON of ``{"stage", "version", "spec"}``.

        ``version`` is the stage's code version: bump it whenever the computation changes in a way the spec
        does not capture, so old entries stop matching instead of being reused.
        """
        self._check_stage(stage)
        if not isinstance(version, str):
            raise TypeError(f"version must be a str, got {type(version).__name__}")
        # Canonicalised here so that an unsupported value is named by its path in the spec (spec.<key>...).
        return digest({"stage": stage, "version": version, "spec": _canonical(spec, "spec")})

    def _stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def _entry(self, stage: str, key: str) -> Path:
        # Two-character fan-out keeps directories small when a stage accumulates thousands of entries.
        return self._stage_dir(stage) / key[:2] / key

    def path_for(self, stage: str, spec: Mapping[str, Any], *, version: str) -> Path:
        """Where the entry for this spec lives (whether or not it exists yet)."""
        return self._entry(stage, self.key(stage, spec, version=version))

    @property
    def events(self) -> list[CacheResult]:
        """Every ``get_or_compute`` result in this process, in call order (a copy), for run logs."""
        return list(self._events)

    # -- validity ------------------------------------------------------------------------------------------

    def _problem(self, entry: Path, key: str) -> str | None:
        """``None`` when ``entry`` is a valid entry for ``key``; ``_MISSING`` when absent; else the defect."""
        if not entry.exists():
            return _MISSING
        try:
            manifest = json.loads((entry / MANIFEST_NAME).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return "manifest.json is missing"
        except (OSError, ValueError) as e:
            return f"manifest.json is unreadable ({e})"
        if not isinstance(manifest, dict) or manifest.get("key") != key:
            return "manifest.json does not belong to this key"
        files = manifest.get("files")
        if not isinstance(files, dict):
            return "manifest.json has no file list"
        if not self.verify:
            return None
        for rel, meta in files.items():
            p = entry / rel
            try:
                # Size first: it is free and catches truncation without reading the file.
                if p.stat().st_size != meta["size"]:
                    return f"size mismatch for {rel}"
                if sha256_file(p) != meta["sha256"]:
                    return f"checksum mismatch for {rel}"
            except FileNotFoundError:
                return f"missing file {rel}"
            except (OSError, KeyError, TypeError) as e:
                return f"cannot verify {rel} ({e!r})"
        return None

    # -- main entry point ---------------------------------------------------------------------------------

    def get_or_compute(
        self,
        stage: str,
        spec: Mapping[str, Any],
        compute: Callable[[Path], None],
        *,
        version: str,
        collective: bool = False,
        work: Path | None = None,
    ) -> CacheResult:
        """Return the entry for ``(stage, spec, version)``, running ``compute(tmpdir)`` only if it is absent.

        ``compute`` must write the artifact's files into the directory it is given (a fresh, empty temporary
        directory on the store's filesystem) and must not keep references to that path: it is renamed into
        place afterwards. If ``compute`` raises, the temporary directory is deleted and the exception
        propagates; nothing is published. A corrupted entry is logged, discarded and recomputed.

        Under a distributed launch (``alignment.distributed``) every rank makes the same calls. By default
        rank 0 computes and publishes while the others wait, then read its entry. With ``collective=True``
        (training: every rank must take part) all ranks run ``compute``; rank 0's output is published and
        the others' is discarded.

        ``work`` is a folder where ``compute`` keeps state that survives a failed attempt (checkpoints: a rerun
        resumes from them). It is only worth keeping until the entry exists, so it is deleted once the entry is
        published, or found valid while the folder is still there, by the process holding the key's lock
        (never while another process computes into it). A failed ``compute`` leaves it in place.
        """
        dist = distributed.current()
        if dist.enabled:
            return self._get_or_compute_distributed(stage, spec, compute, version=version, collective=collective,
                                                    dist=dist, work=work)
        return self._get_or_compute(stage, spec, compute, version=version, work=work)

    def _get_or_compute_distributed(self, stage: str, spec: Mapping[str, Any], compute: Callable[[Path], None],
                                    *, version: str, collective: bool, dist: distributed.Distributed,
                                    work: Path | None = None) -> CacheResult:
        key = self.key(stage, spec, version=version)
        entry = self._entry(stage, key)
        if collective:
            dist.barrier()  # nobody publishes between here and the check, so every rank decides alike
            if self._problem(entry, key) is None:
                if dist.is_main and work is not None and work.exists():
                    self._drop_work(stage, key, work)
                return self._hit(stage, key, entry)
            ran: list[bool] = []

            def counted(out: Path) -> None:
                ran.append(True)
                compute(out)

            def discarded() -> None:
                scratch = self._stage_dir(stage) / f".rank{dist.rank}-{key}-{uuid.uuid4().hex[:8]}"
                scratch.mkdir(parents=True)
                try:
                    compute(scratch)
                finally:
                    _remove(scratch)

            if dist.is_main:
                result = self._get_or_compute(stage, spec, counted, version=version, work=work)
                if not ran:  # another job published it meanwhile; the other ranks still need their partner
                    discarded()
            else:
                discarded()
                result = CacheResult(path=entry, key=key, hit=False, stage=stage)
            dist.barrier()
            return result if dist.is_main else self._record(result)
        if dist.is_main:
            result = self._get_or_compute(stage, spec, compute, version=version)
            dist.barrier()
            return result
        dist.barrier()
        problem = self._problem(entry, key)
        if problem is not None:
            raise RuntimeError(f"cache_dir: rank {dist.rank} cannot read rank 0's {stage} entry {key[:12]} "
                               f"({problem}); every rank needs the same cache_dir on a shared filesystem")
        return self._hit(stage, key, entry)

    def _get_or_compute(self, stage: str, spec: Mapping[str, Any], compute: Callable[[Path], None], *,
                        version: str, work: Path | None = None) -> CacheResult:
        key = self.key(stage, spec, version=version)
        entry = self._entry(stage, key)
        leftover = work is not None and work.exists()

        # Lock-free fast path: published entries are immutable and only a lock holder removes one, so a
        # valid entry seen here stays valid. Anything else (a leftover work folder included: deleting it
        # needs the lock) is re-examined under the lock.
        if not leftover and self._problem(entry, key) is None:
            return self._hit(stage, key, entry)

        stage_dir = self._stage_dir(stage)
        lock_path = stage_dir / ".locks" / f"{key}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock_path)):
            # Another process may have published (or found corrupt) the entry while we waited.
            problem = self._problem(entry, key)
            if problem is None:
                if work is not None:
                    _remove(work)  # left by a run killed between publishing and deleting it
                return self._hit(stage, key, entry)
            if problem != _MISSING:
                self._log.warning(
                    "cache entry corrupt, recomputing: stage=%s key=%s: %s", stage, key, problem
                )
                self._discard(stage_dir, key, entry)
            self._clean_orphans(stage_dir, key)
            seconds = self._compute_and_publish(stage, key, spec, version, compute, stage_dir, entry)
            if work is not None:
                # After the publishing rename: a kill before it leaves the checkpoints to resume from.
                _remove(work)

        self._log.info("cache miss %s %s (computed in %.2fs)", stage, key[:12], seconds)
        return self._record(CacheResult(path=entry, key=key, hit=False, stage=stage))

    # -- internals -----------------------------------------------------------------------------------------

    def _hit(self, stage: str, key: str, entry: Path) -> CacheResult:
        self._log.info("cache hit  %s %s", stage, key[:12])
        return self._record(CacheResult(path=entry, key=key, hit=True, stage=stage))

    def _drop_work(self, stage: str, key: str, work: Path) -> None:
        """Delete a leftover work folder of a published entry, under the key's lock (see ``get_or_compute``)."""
        lock_path = self._stage_dir(stage) / ".locks" / f"{key}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock_path)):
            _remove(work)

    def _record(self, result: CacheResult) -> CacheResult:
        self._events.append(result)
        return result

    @staticmethod
    def _discard(stage_dir: Path, key: str, entry: Path) -> None:
        """Move a corrupted entry aside in one rename, then delete it.

        Renaming first frees the final path atomically, so a deletion interrupted half-way never leaves a
        partial directory where readers look.
        """
        trash = stage_dir / ".trash"
        trash.mkdir(parents=True, exist_ok=True)
        aside = trash / f"{key}-{uuid.uuid4().hex[:8]}"
        os.rename(entry, aside)
        _remove(aside)

    @staticmethod
    def _clean_orphans(stage_dir: Path, key: str) -> None:
        """Delete temp/trash directories for ``key`` left by a process that died (e.g. SIGKILL, OOM).

        Safe only under the key's lock: these directories are created only while holding it, so any that
        exist now belong to a holder that is gone.
        """
        for pattern in (f".tmp-{key}-*", f".trash/{key}-*"):
            for orphan in stage_dir.glob(pattern):
                _remove(orphan)

    def _compute_and_publish(
        self,
        stage: str,
        key: str,
        spec: Mapping[str, Any],
        version: str,
        compute: Callable[[Path], None],
        stage_dir: Path,
        entry: Path,
    ) -> float:
        tmp = stage_dir / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        # mkdir with 0o777 so the umask, not tempfile.mkdtemp's 0700, decides who can read a shared cache.
        os.mkdir(tmp, 0o777)
        try:
            t0 = time.perf_counter()
            compute(tmp)
            seconds = time.perf_counter() - t0
            _share_as_umask_allows(tmp)
            if (tmp / MANIFEST_NAME).exists():
                raise ValueError(
                    f"compute for stage {stage!r} wrote {MANIFEST_NAME!r}, a name the store reserves"
                )
            manifest = {
                "format": _MANIFEST_FORMAT,
                "stage": stage,
                "version": version,
                "key": key,
                "spec": _canonical(spec, "spec"),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "compute_seconds": round(seconds, 3),
                "files": _scan_files(tmp),
            }
            # Written last and inside the not-yet-visible directory: its presence marks a complete entry.
            with open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            entry.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, entry)  # the single publishing step
        except BaseException:
            _remove(tmp)
            raise
        _fsync_dir(entry.parent)
        return seconds
