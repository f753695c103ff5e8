"""Read W&B offline runs back from disk, without network or account.

A test helper: the tests read back what a run logged to W&B (tests/test_app.py, tests/test_sweeps.py, ...);
the harness itself never reads its runs back, so this is not part of the package.

Recent wandb versions (the Go ``wandb-core`` backend) no longer write ``config.yaml`` or
``wandb-summary.json`` for offline runs.  Everything a run logged lives in its transaction log
``<dir>/wandb/offline-run-<YYYYmmdd_HHMMSS>-<id>/run-<id>.wandb``, which this module parses.

File format (LevelDB log format, as used by wandb's ``datastore``):

* a 7-byte file header: ``b":W&B"``, magic ``0xBEE1`` (uint16 LE), version (uint8);
* then 32 KiB blocks (the file header counts towards the first block).  Each block holds chunks with a
  7-byte header ``crc32 (uint32 LE), length (uint16 LE), type (uint8)`` followed by ``length`` bytes.
  ``type`` is FULL=1, FIRST=2, MIDDLE=3, LAST=4; a record larger than the space left in a block is split
  into FIRST/MIDDLE*/LAST chunks.  When fewer than 7 bytes are left in a block they are zero padding.
  The checksum is zlib's CRC-32 of the payload, seeded with the CRC-32 of the type byte;
* each reassembled record is a serialized ``wandb.proto.wandb_internal_pb2.Record``.

The run's state is rebuilt by replaying the records: ``run`` (identity, tags, initial config; re-sent in
full when e.g. tags change), ``config`` (top-level key updates), ``history`` (one record per committed
step), ``summary`` (nested updates/removals) and ``files``.  All values are stored as JSON strings
(``NaN``/``Infinity`` included) and are decoded here.  W&B's internal ``_wandb`` entry is dropped from
config and summary.

wandb's summary lags in offline mode: read a run only after ``run.finish()`` returned.  Even then the log may
not be on disk yet: ``wandb-core`` buffers the log and flushes it when it closes the run's stream, which
``finish()`` requests without waiting (seen as a file holding only its 7-byte header right after
``finish()``).  A finished run's log ends with an ``exit`` record, so ``read_offline_run`` waits (up to
``wait`` seconds) for that record and reports whether it saw it in ``OfflineRun.complete``.
"""

from __future__ import annotations

import json
import re
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing wandb is slow; the protobufs are loaded lazily at read time
    from wandb.proto.wandb_internal_pb2 import Record

__all__ = ["OfflineRun", "find_offline_runs", "iter_records", "read_offline_run"]

_FILE_IDENT = b":W&B"
_FILE_MAGIC = 0xBEE1
_FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version: 7 bytes
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type: 7 bytes
_BLOCK_SIZE = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_TYPE_CRC = {t: zlib.crc32(bytes([t])) for t in (_FULL, _FIRST, _MIDDLE, _LAST)}
_INTERNAL_KEY = "_wandb"
_RUN_DIR_RE = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-(.+)$")


@dataclass
class OfflineRun:
    """A W&B run rebuilt from its offline transaction log."""

    run_id: str
    project: str | None
    group: str | None
    job_type: str | None
    tags: list[str]
    config: dict[str, Any]  # nested values decoded from JSON
    history: list[dict[str, Any]]  # one dict per logged step (keys incl. _step), values JSON-decoded
    summary: dict[str, Any]
    files: list[str] = field(default_factory=list)  # names of files saved into the run (media, tables...)
    complete: bool = False  # the log holds the run's exit record: finished and fully flushed
    exit_code: int | None = None  # the exit record's code (non-zero: W&B shows the run as failed)


def _read_chunks(data: bytes, source: str) -> Iterator[bytes]:
    """Yield the payloads of the logical records of a wandb LevelDB-style log held in ``data``.

    A record cut short at the end of the file (a run killed mid-write) is silently dropped; a corrupt
    chunk (bad checksum or chunk type) raises ``ValueError``.
    """
    if len(data) < _FILE_HEADER.size:
        raise ValueError(f"{source}: too short to be a W&B transaction log")
    ident, magic, _version = _FILE_HEADER.unpack_from(data, 0)
    if ident != _FILE_IDENT or magic != _FILE_MAGIC:
        raise ValueError(f"{source}: not a W&B transaction log (bad file header {data[:7]!r})")
    pos = _FILE_HEADER.size
    pending: list[bytes] | None = None  # chunks of a record split across blocks
    end = len(data)
    while pos < end:
        left_in_block = _BLOCK_SIZE - pos % _BLOCK_SIZE
        if left_in_block < _CHUNK_HEADER.size:  # block trailer: zero padding
            pos += left_in_block
            continue
        if pos + _CHUNK_HEADER.size > end:
            break  # truncated header at EOF
        crc, length, ctype = _CHUNK_HEADER.unpack_from(data, pos)
        if ctype == 0 and length == 0 and crc == 0:  # zero-filled rest of a block (preallocation)
            pos += left_in_block
            continue
        start = pos + _CHUNK_HEADER.size
        stop = start + length
        if stop > end:
            break  # truncated payload at EOF
        if length > left_in_block - _CHUNK_HEADER.size:
            raise ValueError(f"{source}: chunk at offset {pos} overruns its block")
        payload = data[start:stop]
        if ctype not in _TYPE_CRC:
            raise ValueError(f"{source}: unknown chunk type {ctype} at offset {pos}")
        if zlib.crc32(payload, _TYPE_CRC[ctype]) != crc:
            raise ValueError(f"{source}: checksum mismatch in chunk at offset {pos}")
        pos = stop
        if ctype == _FULL:
            pending = None
            yield payload
        elif ctype == _FIRST:
            pending = [payload]
        elif pending is None:
            raise ValueError(f"{source}: continuation chunk without a FIRST chunk at offset {start - 7}")
        elif ctype == _MIDDLE:
            pending.append(payload)
        else:  # _LAST
            pending.append(payload)
            yield b"".join(pending)
            pending = None


def iter_records(path: str | Path) -> Iterator[Record]:
    """Yield every ``wandb_internal_pb2.Record`` stored in a ``.wandb`` transaction log, in order."""
    from wandb.proto import wandb_internal_pb2

    path = Path(path)
    for payload in _read_chunks(path.read_bytes(), str(path)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _decode(value_json: str) -> Any:
    return json.loads(value_json) if value_json else None


def _item_path(key: str, nested_key: Sequence[str]) -> list[str]:
    return list(nested_key) if nested_key else [key]


def _set_path(target: dict[str, Any], keys: Sequence[str], value: Any) -> None:
    node = target
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[keys[-1]] = value


def _del_path(target: dict[str, Any], keys: Sequence[str]) -> None:
    node: Any = target
    for key in keys[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(keys[-1], None)


def _apply(target: dict[str, Any], record: Any) -> None:
    """A config or summary record's updates and removals, applied to ``target`` in that order."""
    for item in record.update:
        _set_path(target, _item_path(item.key, item.nested_key), _decode(item.value_json))
    for item in record.remove:
        _del_path(target, _item_path(item.key, item.nested_key))


def _resolve_log_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no W&B run at {path}")
    match = _RUN_DIR_RE.match(path.name)
    if match is not None and (path / f"run-{match.group(2)}.wandb").is_file():
        return path / f"run-{match.group(2)}.wandb"
    candidates = sorted(path.glob("*.wandb"))
    if len(candidates) != 1:
        found = ", ".join(c.name for c in candidates) or "none"
        raise ValueError(f"expected exactly one .wandb file in {path}, found {found}")
    return candidates[0]


def _replay(log_file: Path) -> OfflineRun:
    run_id = ""
    project = group = job_type = None
    tags: list[str] = []
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    files: dict[str, None] = {}  # ordered set
    complete = False
    exit_code: int | None = None

    for record in iter_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            # Sent at init and again, in full, when run attributes change (e.g. ``run.tags = ...``).
            run = record.run
            run_id = run.run_id or run_id
            project = run.project or project
            group = run.run_group or group
            job_type = run.job_type or job_type
            tags = list(run.tags)
            _apply(config, run.config)
        elif kind == "config":
            _apply(config, record.config)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set_path(row, _item_path(item.key, item.nested_key), _decode(item.value_json))
            if record.history.HasField("step"):
                row.setdefault("_step", record.history.step.num)
            history.append(row)
        elif kind == "summary":
            _apply(summary, record.summary)
        elif kind == "files":
            for file_item in record.files.files:
                files[file_item.path] = None
        elif kind == "exit":
            complete = True
            exit_code = record.exit.exit_code

    if not run_id:
        match = _RUN_DIR_RE.match(log_file.parent.name)
        run_id = match.group(2) if match else log_file.stem.removeprefix("run-")
    config.pop(_INTERNAL_KEY, None)
    summary.pop(_INTERNAL_KEY, None)
    return OfflineRun(
        run_id=run_id,
        project=project,
        group=group,
        job_type=job_type,
        tags=tags,
        config=config,
        history=history,
        summary=summary,
        files=list(files),
        complete=complete,
        exit_code=exit_code,
    )


def read_offline_run(path: str | Path, *, wait: float = 10.0) -> OfflineRun:
    """Rebuild a run from its ``run-<id>.wandb`` file, or from the ``offline-run-*`` dir holding it.

    If the log has no exit record yet (wandb-core still flushing it after ``finish()``, or a crashed or
    still-running run), re-read it every 50 ms for up to ``wait`` seconds, then return what is there with
    ``complete=False``.  Pass ``wait=0`` to read crashed or live runs without delay.
    """
    log_file = _resolve_log_file(Path(path))
    deadline = time.monotonic() + wait
    while True:
        run = _replay(log_file)
        if run.complete or time.monotonic() >= deadline:
            return run
        time.sleep(0.05)


def _start_time_ns(log_file: Path) -> int | None:
    """``start_time`` of the run record, read from the first blocks of the log only (None if not there)."""
    from wandb.proto import wandb_internal_pb2

    with log_file.open("rb") as fh:
        head = fh.read(2 * _BLOCK_SIZE)
    try:
        for payload in _read_chunks(head, str(log_file)):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "run" and record.run.HasField("start_time"):
                return record.run.start_time.ToNanoseconds()
    except ValueError:
        return None
    return None


def _sort_key(log_file: Path) -> tuple[str, int, str]:
    mtime_ns = log_file.stat().st_mtime_ns
    match = _RUN_DIR_RE.match(log_file.parent.name)
    stamp = match.group(1) if match else time.strftime("%Y%m%d_%H%M%S", time.localtime(mtime_ns / 1e9))
    start_ns = _start_time_ns(log_file)
    return stamp, mtime_ns if start_ns is None else start_ns, str(log_file)


def find_offline_runs(wandb_dir: str | Path) -> list[Path]:
    """The ``.wandb`` run logs under ``wandb_dir`` (searched recursively), oldest run first.

    ``wandb_dir`` may be the ``dir`` given to ``wandb.init`` or the ``wandb/`` folder inside it.  Runs are
    ordered by the start time in their directory name (second resolution), then by the exact start time in
    their run record (or, while that is not flushed yet, the log's modification time).
    """
    root = Path(wandb_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"not a directory: {root}")
    unique: dict[Path, Path] = {}
    for log_file in root.rglob("*.wandb"):
        if log_file.is_file() and _RUN_DIR_RE.match(log_file.parent.name):
            unique.setdefault(log_file.resolve(), log_file)  # ``latest-run`` is a symlink to a run dir
    return sorted(unique.values(), key=_sort_key)
