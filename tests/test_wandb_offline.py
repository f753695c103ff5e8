"""Round-trip tests for tests/wandb_offline.py: log with real wandb (offline, no network), read back."""

from __future__ import annotations

import math
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.wandb_offline import OfflineRun, find_offline_runs, iter_records, read_offline_run

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

pytestmark = pytest.mark.fast  # the developers' tier (make test-fast)

_LEAKY_ENV = (
    "WANDB_API_KEY",
    "WANDB_BASE_URL",
    "WANDB_ENTITY",
    "WANDB_PROJECT",
    "WANDB_RUN_ID",
    "WANDB_RUN_GROUP",
    "WANDB_JOB_TYPE",
    "WANDB_TAGS",
    "WANDB_RESUME",
    "WANDB_NAME",
    "WANDB_NOTES",
    "WANDB_SWEEP_ID",
    "WANDB_RUN_DIR",
)


@pytest.fixture(scope="module", autouse=True)
def _stop_wandb_service() -> Iterator[None]:
    yield
    wandb.teardown()  # do not leave wandb-core running for the rest of the session


@pytest.fixture
def offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Isolate wandb in ``tmp_path``: offline, silent, no git/code/system probing, no user config."""
    for name in _LEAKY_ENV:
        monkeypatch.delenv(name, raising=False)
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB__DISABLE_STATS": "true",
        "WANDB__DISABLE_MACHINE_INFO": "true",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CONFIG_DIR": str(tmp_path / ".config"),
        "WANDB_CACHE_DIR": str(tmp_path / ".cache"),
        "WANDB_DATA_DIR": str(tmp_path / ".data"),
        "WANDB_ARTIFACT_DIR": str(tmp_path / ".artifacts"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return tmp_path


def _init(tmp_path: Path, **kwargs: Any) -> Any:
    return wandb.init(mode="offline", dir=str(tmp_path), **kwargs)


def _without_timing(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("_timestamp", "_runtime")}


CONFIG = {
    "seed": 7,
    "method": "mocan",
    "optim": {"lr": 3e-4, "betas": [0.9, 0.999], "sched": {"name": "cosine", "warmup": 10}},
    "constraints": [{"name": "safety", "threshold": 0.5}],
    "flag": True,
    "nothing": None,
}
LOSSES = [2.0, 1.5, 1.25, 1.0]


def test_roundtrip_single_run(offline_env: Path) -> None:
    tmp_path = offline_env
    run = _init(
        tmp_path, project="harness-test", group="grp-a", job_type="train", tags=["t1", "t2"], config=CONFIG
    )
    try:
        run_id = run.id
        run.config.update({"late": {"x": 1}})
        for step, loss in enumerate(LOSSES):
            run.log({"loss": loss, "acc": step / 4, "dual": {"lambda": step * 0.5}})
        table = wandb.Table(columns=["prompt", "reward"], data=[["hi", 1.0], ["bye", -0.5]])
        run.log({"samples": table})
        run.log({"weird": math.nan, "big": math.inf})
        run.summary["best_loss"] = 1.0
        run.summary["final"] = {"reward": 0.75, "cost": -0.1}
    finally:
        run.finish()

    logs = find_offline_runs(tmp_path)
    assert len(logs) == 1
    assert logs[0].name == f"run-{run_id}.wandb"
    assert logs[0].parent.name.startswith("offline-run-")
    assert find_offline_runs(tmp_path / "wandb") == logs

    rec = read_offline_run(logs[0])  # waits for wandb-core to flush the log (it does so after finish())
    assert isinstance(rec, OfflineRun)
    assert rec.complete
    assert read_offline_run(logs[0].parent) == rec  # the run directory works too

    assert rec.run_id == run_id
    assert rec.project == "harness-test"
    assert rec.group == "grp-a"
    assert rec.job_type == "train"
    assert rec.tags == ["t1", "t2"]
    assert rec.config == {**CONFIG, "late": {"x": 1}}

    assert len(rec.history) == len(LOSSES) + 2
    for step, loss in enumerate(LOSSES):
        row = rec.history[step]
        assert _without_timing(row) == {
            "_step": step,
            "loss": loss,
            "acc": step / 4,
            "dual": {"lambda": step * 0.5},
        }
        assert isinstance(row["_timestamp"], float) and row["_runtime"] >= 0
    assert [row["_step"] for row in rec.history] == list(range(len(LOSSES) + 2))
    losses = [row["loss"] for row in rec.history if "loss" in row]
    assert losses == sorted(losses, reverse=True)

    table_row = rec.history[len(LOSSES)]
    entry = table_row["samples"]
    assert entry["_type"] == "table-file"
    assert entry["path"].endswith(".table.json")
    assert entry["ncols"] == 2 and entry["nrows"] == 2
    assert entry["path"] in rec.files
    assert (logs[0].parent / "files" / entry["path"]).is_file()

    last = rec.history[-1]
    assert math.isnan(last["weird"]) and last["big"] == math.inf

    summary = rec.summary
    assert summary["best_loss"] == 1.0
    assert summary["final"] == {"reward": 0.75, "cost": -0.1}
    assert summary["loss"] == LOSSES[-1]
    assert summary["dual"] == {"lambda": 1.5}
    assert summary["_step"] == len(LOSSES) + 1
    assert summary["samples"]["_type"] == "table-file"
    assert "_wandb" not in summary and "_wandb" not in rec.config


def test_sequential_runs_are_separate(offline_env: Path) -> None:
    tmp_path = offline_env
    ids = []
    for k in range(2):
        run = _init(
            tmp_path,
            project="harness-test",
            group=f"g{k}",
            job_type=f"job{k}",
            config={"k": k, "n": {"v": k}},
        )
        try:
            ids.append(run.id)
            for step in range(3 + k):
                run.log({"loss": 10.0 * (k + 1) - step})
            run.summary["who"] = f"run{k}"
        finally:
            run.finish()

    logs = find_offline_runs(tmp_path)
    assert len(logs) == 2 and len(set(logs)) == 2
    assert len({p.parent for p in logs}) == 2
    assert [p.name for p in logs] == [f"run-{i}.wandb" for i in ids]  # oldest first

    for k, path in enumerate(logs):
        rec = read_offline_run(path)
        assert rec.complete
        assert rec.run_id == ids[k]
        assert rec.group == f"g{k}" and rec.job_type == f"job{k}" and rec.tags == []
        assert rec.config == {"k": k, "n": {"v": k}}
        assert [_without_timing(r) for r in rec.history] == [
            {"_step": step, "loss": 10.0 * (k + 1) - step} for step in range(3 + k)
        ]
        assert rec.summary["who"] == f"run{k}"
        assert rec.summary["loss"] == 10.0 * (k + 1) - (2 + k)


def test_records_spanning_blocks(offline_env: Path) -> None:
    """A >32 KiB record (split into FIRST/MIDDLE/LAST chunks) and many small ones crossing block ends."""
    tmp_path = offline_env
    blob = "".join(chr(ord("a") + i % 26) for i in range(80_000))
    run = _init(tmp_path, project="harness-test", config={"blob": blob}, tags=["x"])
    try:
        run.tags = ("x", "y")  # re-sends the run record with the new tags
        for step in range(300):
            run.log({"v": step, "s": f"step-{step}"})
    finally:
        run.finish()
    (path,) = find_offline_runs(tmp_path)
    assert path.stat().st_size > 3 * 32 * 1024
    rec = read_offline_run(path)
    assert rec.complete
    assert rec.config == {"blob": blob}
    assert rec.tags == ["x", "y"]
    assert [_without_timing(r) for r in rec.history] == [
        {"_step": step, "v": step, "s": f"step-{step}"} for step in range(300)
    ]


# ---- format-level tests on synthetic logs (no wandb run needed) ----------------------------------------


def _write_log(records: list[bytes], block: int = 32 * 1024) -> bytes:
    """Minimal LevelDB-log writer matching wandb's datastore layout."""
    out = bytearray(struct.pack("<4sHB", b":W&B", 0xBEE1, 0))
    for payload in records:
        first = True
        while True:
            left = block - len(out) % block
            if left < 7:
                out += b"\x00" * left
                left = block
            take = min(len(payload), left - 7)
            chunk, payload = payload[:take], payload[take:]
            last = not payload
            ctype = (1 if last else 2) if first else (4 if last else 3)
            crc = zlib.crc32(chunk, zlib.crc32(bytes([ctype])))
            out += struct.pack("<IHB", crc, len(chunk), ctype) + chunk
            first = False
            if last:
                break
    return bytes(out)


def _history_record(step: int, value: float) -> bytes:
    rec = wandb_internal_pb2.Record()
    for key, val in (("_step", str(step)), ("m", repr(value))):
        item = rec.history.item.add()
        item.nested_key.append(key)
        item.value_json = val
    return rec.SerializeToString()


def test_synthetic_log_and_corruption(tmp_path: Path) -> None:
    run_rec = wandb_internal_pb2.Record()
    run_rec.run.run_id = "abc123"
    run_rec.run.project = "p"
    item = run_rec.run.config.update.add()
    item.key, item.value_json = "pad", '"' + "z" * 70_000 + '"'
    exit_rec = wandb_internal_pb2.Record()
    exit_rec.exit.exit_code = 0
    payloads = [run_rec.SerializeToString()] + [_history_record(i, i / 3) for i in range(2000)]
    payloads.append(exit_rec.SerializeToString())
    data = _write_log(payloads)
    run_dir = tmp_path / "wandb" / "offline-run-20240101_000000-abc123"
    run_dir.mkdir(parents=True)
    path = run_dir / "run-abc123.wandb"
    path.write_bytes(data)

    assert len(list(iter_records(path))) == len(payloads)
    rec = read_offline_run(run_dir)
    assert rec.complete
    assert rec.run_id == "abc123" and rec.project == "p" and rec.group is None
    assert rec.config == {"pad": "z" * 70_000}
    assert rec.history == [{"_step": i, "m": i / 3} for i in range(2000)]

    torn = _write_log(payloads[:-1])[:-5]  # a run killed mid-write: no exit record, torn last record
    path.write_bytes(torn)
    started = time.monotonic()
    rec = read_offline_run(path, wait=0.2)
    assert 0.2 <= time.monotonic() - started < 5
    assert not rec.complete
    assert rec.history == [{"_step": i, "m": i / 3} for i in range(1999)]
    path.write_bytes(data)

    corrupt = bytearray(data)
    corrupt[200] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="checksum"):
        read_offline_run(path)

    path.write_bytes(b"not a wandb log at all")
    with pytest.raises(ValueError, match="header"):
        read_offline_run(path)
