"""Tests for the content-addressed artifact store (alignment/store.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from alignment.store import (
    MANIFEST_NAME,
    ArtifactStore,
    CacheResult,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    canonical_json,
)

pytestmark = pytest.mark.fast  # the developers' tier (make test-fast)

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEC = {"model": "tiny", "n": 4, "temps": [0.7, 1.0], "sampler": {"top_p": 0.9, "seed": 0}}


class Counter:
    """A compute function that records how often it ran and writes a small two-file artifact."""

    def __init__(self, payload: bytes = b"hello") -> None:
        self.calls = 0
        self.payload = payload

    def __call__(self, d: Path) -> None:
        self.calls += 1
        (d / "data.bin").write_bytes(self.payload)
        (d / "sub").mkdir()
        (d / "sub" / "meta.json").write_text('{"ok": true}')


def _leftovers(stage_dir: Path) -> list[str]:
    """Anything in a stage directory besides published entries and the lock directory."""
    if not stage_dir.exists():
        return []
    return sorted(p.name for p in stage_dir.iterdir() if p.name.startswith(".") and p.name != ".locks")


# ------------------------------------------------------------------------------------------------ keys


def test_key_is_sha256_of_documented_canonical_json(tmp_path: Path) -> None:
    # Pins the exact encoding: an accidental change would silently invalidate every existing cache.
    store = ArtifactStore(tmp_path)
    expected_text = '{"spec":{"a":1,"b":[0.1,"x",null,true]},"stage":"samples","version":"v1"}'
    expected = hashlib.sha256(expected_text.encode()).hexdigest()
    assert store.key("samples", {"b": (0.1, "x", None, True), "a": 1}, version="v1") == expected


def test_key_stable_across_dict_orderings(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    a = {"x": 1, "y": {"p": 2.5, "q": [1, {"m": None, "n": "s"}]}}
    b = {"y": {"q": [1, {"n": "s", "m": None}], "p": 2.5}, "x": 1}
    assert store.key("s", a, version="1") == store.key("s", b, version="1")


def test_key_stable_across_processes(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    code = (
        "import json, sys\n"
        "from alignment.store import ArtifactStore\n"
        "spec = json.loads(sys.argv[1])\n"
        "sys.stdout.write(ArtifactStore(sys.argv[2]).key('samples', spec, version='v3'))\n"
    )
    # A different hash seed in the child: key stability must not depend on dict/set iteration order.
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(SPEC), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert out.stdout == store.key("samples", SPEC, version="v3")


def test_key_changes_with_spec_version_and_stage(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    base = store.key("samples", SPEC, version="v1")
    keys = {
        base,
        store.key("samples", {**SPEC, "n": 5}, version="v1"),
        store.key("samples", {**SPEC, "sampler": {"top_p": 0.9, "seed": 1}}, version="v1"),
        store.key("samples", SPEC, version="v2"),
        store.key("scores", SPEC, version="v1"),
    }
    assert len(keys) == 5
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in keys)


def test_key_distinguishes_numeric_types_and_float_values(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    keys = [store.key("s", {"v": v}, version="1") for v in (1, 1.0, True, "1", 0.1 + 0.2, 0.3)]
    assert len(set(keys)) == len(keys)
    # repr round-trips, so the same float value always gives the same key.
    assert store.key("s", {"v": 0.1 + 0.2}, version="1") == store.key(
        "s", {"v": 0.30000000000000004}, version="1"
    )


@dataclass
class _Cfg:
    lr: float
    path: Path
    layers: tuple[int, ...]


def test_supported_types_encode_as_their_plain_equivalents() -> None:
    plain = {
        "lr": 0.5,
        "path": "/data/x",
        "layers": [1, 2],
        "arr": [[1.5, 2.0]],
        "i": 3,
        "f32": 0.25,
        "b": True,
    }
    fancy = {
        "lr": np.float64(0.5),
        "path": Path("/data/x"),
        "layers": (np.int64(1), 2),
        "arr": np.array([[1.5, 2.0]]),
        "i": np.int32(3),
        "f32": np.float32(0.25),
        "b": np.bool_(True),
    }
    assert canonical_json(fancy) == canonical_json(plain)
    assert canonical_json({"cfg": _Cfg(0.5, Path("/data/x"), (1, 2))}) == canonical_json(
        {"cfg": {"lr": 0.5, "path": "/data/x", "layers": [1, 2]}}
    )


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        ({"a": {"b": [1, {1, 2}]}}, "spec.a.b[1]"),
        ({"model": object()}, "spec.model"),
        ({"x": {"blob": b"raw"}}, "spec.x.blob"),
        ({"x": {3: "int key"}}, "spec.x"),
    ],
)
def test_unsupported_spec_type_raises_naming_the_key(tmp_path: Path, spec: dict, where: str) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(TypeError) as info:
        store.key("s", spec, version="1")
    assert where in str(info.value)


def test_bad_stage_names_rejected(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    for stage in ("", ".locks", "a/b", "../x"):
        with pytest.raises(ValueError):
            store.key(stage, SPEC, version="1")


# ------------------------------------------------------------------------------------- get_or_compute


def test_miss_then_hit_computes_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ArtifactStore(tmp_path)
    compute = Counter()
    with caplog.at_level(logging.INFO, logger="alignment.store"):
        first = store.get_or_compute("samples", SPEC, compute, version="v1")
        second = store.get_or_compute("samples", dict(reversed(list(SPEC.items()))), compute, version="v1")

    assert compute.calls == 1
    assert (first.hit, second.hit) == (False, True)
    key = store.key("samples", SPEC, version="v1")
    assert first == CacheResult(
        path=tmp_path / "samples" / key[:2] / key, key=key, hit=False, stage="samples"
    )
    assert second.path == first.path == store.path_for("samples", SPEC, version="v1")
    assert (first.path / "data.bin").read_bytes() == b"hello"
    assert (first.path / "sub" / "meta.json").read_text() == '{"ok": true}'
    assert store.events == [first, second]

    manifest = json.loads((first.path / MANIFEST_NAME).read_text())
    assert manifest["stage"] == "samples" and manifest["version"] == "v1" and manifest["key"] == key
    assert manifest["spec"] == SPEC and manifest["created"]
    assert manifest["files"] == {
        "data.bin": {"sha256": hashlib.sha256(b"hello").hexdigest(), "size": 5},
        "sub/meta.json": {"sha256": hashlib.sha256(b'{"ok": true}').hexdigest(), "size": 12},
    }

    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith(f"cache miss samples {key[:12]} (computed in ") and messages[0].endswith(
        "s)"
    )
    assert messages[1] == f"cache hit  samples {key[:12]}"
    assert _leftovers(tmp_path / "samples") == []


def test_new_store_instance_hits_existing_entry(tmp_path: Path) -> None:
    ArtifactStore(tmp_path).get_or_compute("samples", SPEC, Counter(), version="v1")
    compute = Counter()
    again = ArtifactStore(tmp_path).get_or_compute("samples", SPEC, compute, version="v1")
    assert again.hit and compute.calls == 0


def test_entries_are_as_readable_as_the_umask_allows(tmp_path: Path) -> None:
    """safetensors writes 0600 files; a shared cache's entries take the umask's permissions instead."""
    import torch
    from safetensors.torch import save_file

    def compute(d: Path) -> None:
        save_file({"w": torch.zeros(2)}, str(d / "adapter.safetensors"))
        (d / "sub").mkdir(mode=0o700)
        (d / "sub" / "x.bin").write_bytes(b"x")
        os.chmod(d / "sub" / "x.bin", 0o600)

    old = os.umask(0o022)
    try:
        entry = ArtifactStore(tmp_path).get_or_compute("adapter", SPEC, compute, version="v1").path
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in [entry, *entry.rglob("*")] if p.name != "manifest.json"
            } == {entry.name: "0o755", "adapter.safetensors": "0o644", "sub": "0o755", "x.bin": "0o644"}


def test_different_version_recomputes(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    compute = Counter()
    a = store.get_or_compute("samples", SPEC, compute, version="v1")
    b = store.get_or_compute("samples", SPEC, compute, version="v2")
    assert compute.calls == 2 and not a.hit and not b.hit and a.path != b.path


def test_failing_compute_leaves_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)

    def boom(d: Path) -> None:
        (d / "partial.bin").write_bytes(b"half")
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError, match="model crashed"):
        store.get_or_compute("samples", SPEC, boom, version="v1")

    entry = store.path_for("samples", SPEC, version="v1")
    assert not entry.exists() and not entry.parent.exists()
    assert _leftovers(tmp_path / "samples") == []
    assert store.events == []
    # The failure is not sticky: the next call computes normally.
    compute = Counter()
    assert not store.get_or_compute("samples", SPEC, compute, version="v1").hit and compute.calls == 1


def test_compute_may_not_write_the_manifest(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(ValueError, match="reserves"):
        store.get_or_compute("s", SPEC, lambda d: (d / MANIFEST_NAME).write_text("{}"), version="1")
    assert not store.path_for("s", SPEC, version="1").exists()
    assert _leftovers(tmp_path / "s") == []


def test_orphaned_temp_dir_from_dead_process_is_cleaned(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    key = store.key("s", SPEC, version="1")
    orphan = tmp_path / "s" / f".tmp-{key}-deadbeef"
    orphan.mkdir(parents=True)
    (orphan / "junk").write_bytes(b"x")
    store.get_or_compute("s", SPEC, Counter(), version="1")
    assert not orphan.exists()
    assert _leftovers(tmp_path / "s") == []


def _flip_first_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda e: _flip_first_byte(e / "data.bin"), "checksum mismatch for data.bin"),
        (lambda e: (e / MANIFEST_NAME).unlink(), "manifest.json is missing"),
        (lambda e: (e / "sub" / "meta.json").unlink(), "missing file sub/meta.json"),
        (lambda e: (e / "data.bin").write_bytes(b"hel"), "size mismatch for data.bin"),
        (lambda e: (e / MANIFEST_NAME).write_text("{trunc"), "manifest.json is unreadable"),
    ],
    ids=["byte-flip", "no-manifest", "missing-file", "truncated", "bad-manifest"],
)
def test_corruption_detected_logged_and_recomputed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage, reason: str
) -> None:
    store = ArtifactStore(tmp_path)
    compute = Counter()
    entry = store.get_or_compute("samples", SPEC, compute, version="v1").path
    damage(entry)

    with caplog.at_level(logging.INFO, logger="alignment.store"):
        result = store.get_or_compute("samples", SPEC, compute, version="v1")

    assert compute.calls == 2 and not result.hit and result.path == entry
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "samples" in warnings[0] and result.key in warnings[0] and reason in warnings[0]
    # The recomputed entry is intact and the corrupted copy is gone (not left in .trash).
    assert (entry / "data.bin").read_bytes() == b"hello"
    assert store.get_or_compute("samples", SPEC, compute, version="v1").hit and compute.calls == 2
    assert _leftovers(tmp_path / "samples") in ([], [".trash"])
    assert not any((tmp_path / "samples" / ".trash").glob("*"))


def test_verify_false_trusts_files_but_still_needs_manifest(tmp_path: Path) -> None:
    compute = Counter()
    entry = ArtifactStore(tmp_path).get_or_compute("s", SPEC, compute, version="1").path
    _flip_first_byte(entry / "data.bin")
    fast = ArtifactStore(tmp_path, verify=False)
    assert fast.get_or_compute("s", SPEC, compute, version="1").hit and compute.calls == 1
    (entry / MANIFEST_NAME).unlink()
    assert not fast.get_or_compute("s", SPEC, compute, version="1").hit and compute.calls == 2


def test_custom_logger_is_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test_store.custom")
    with caplog.at_level(logging.INFO, logger="test_store.custom"):
        ArtifactStore(tmp_path, logger=logger).get_or_compute("s", SPEC, Counter(), version="1")
    assert [r.name for r in caplog.records] == ["test_store.custom"]


# ------------------------------------------------------------------------------------------ concurrency


def _sleepy_compute(d: Path) -> None:
    # Append (not overwrite) so two computations would leave two lines.
    counter = d.parents[1] / "counter.txt"
    with open(counter, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(1.0)
    (d / "out.txt").write_text("done")


def _worker(root: str, barrier, queue) -> None:
    try:
        store = ArtifactStore(root)
        barrier.wait(timeout=60)  # start both calls together so they genuinely race
        result = store.get_or_compute("samples", {"n": 1}, _sleepy_compute, version="v1")
        queue.put((result.hit, str(result.path), (result.path / "out.txt").read_text()))
    except BaseException as e:  # report instead of dying silently, so the parent fails fast, not on timeout
        queue.put(("error", repr(e), ""))
        raise


def test_two_processes_compute_exactly_once(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    assert [r for r in results if r[0] == "error"] == []
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    # counter.txt sits in root/ (two levels above the temp dir inside root/samples).
    assert len((tmp_path / "counter.txt").read_text().splitlines()) == 1
    assert sorted(hit for hit, _, _ in results) == [False, True]
    assert len({path for _, path, _ in results}) == 1
    assert all(text == "done" for _, _, text in results)
    assert _leftovers(tmp_path / "samples") == []


# ----------------------------------------------------------------------------------------- atomic writes


def test_atomic_write_json_valid_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "out" / "summary.json"
    obj = {"lam": np.array([0.5, 1.25]), "n": np.int64(3), "dir": Path("/x"), "nested": {"ok": True}}
    atomic_write_json(target, obj)
    assert json.loads(target.read_text()) == {"lam": [0.5, 1.25], "n": 3, "dir": "/x", "nested": {"ok": True}}
    assert os.listdir(target.parent) == ["summary.json"]

    # Overwrite replaces; an unserialisable object fails before touching the existing file.
    atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 2}
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"v": 2}
    assert os.listdir(target.parent) == ["summary.json"]


def test_atomic_write_bytes_and_text(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "b.txt", "λ* = 0.5\n")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "λ* = 0.5\n"
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.txt"]
    # Permissions follow the umask like a normal open(), not mkstemp's private 0600.
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~umask
