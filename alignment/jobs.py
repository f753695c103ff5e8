"""Resumable sweeps: a job's identity, a registry of finished jobs, and running one job of a sweep.

A job is identified by the hash of its resolved config and of the code that runs it (the source of this
package), so relaunching a sweep, into the same folder or a new one, skips every job that already completed
with the same config and code, reusing its outputs, and reruns jobs that failed or never ran. A code change
invalidates every job, as it should. The key leaves out what does not change a job's results
(``NOT_IN_JOB_KEY``): where its outputs and the cache live, and where it is tracked.

A job reused from another folder is copied there, marked ``resumed_from`` the folder it came from, and logged
as a short W&B run in the new sweep's group (tagged ``reused``, carrying the summary), so the group lists every
job. A job relaunched in place is left as it was: its W&B run is in the group already.

The registry lives in the artifact cache (``<cache_dir>/jobs/<key>.json``), which sweeps share already. Each
completed entry lists the sha256 of every output a reuse copies; a job whose outputs changed since (an edited
``summary.json``, a truncated ``arrays.npz``) is rerun instead of reused, with a warning naming the file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from alignment.config import Config
from alignment.store import atomic_write_json, digest, sha256_file

log = logging.getLogger(__name__)

# What a reused job copies into its new folder: everything reports and figures read.
REUSED = ("summary.json", "arrays.npz", "run_info.json", "metrics.jsonl", "tables", "figures")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 of this package's source files (names and contents), independent of git."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


# Top-level config keys that do not change a job's results: its output folder, the content-addressed cache's
# location (the same artifacts, however the path is written) and the tracker (W&B or not, project, tags, ...).
NOT_IN_JOB_KEY = ("run_dir", "cache_dir", "tracker")


def job_key(resolved: dict[str, Any]) -> str:
    identity = {k: v for k, v in resolved.items() if k not in NOT_IN_JOB_KEY}
    return digest({"config": identity, "code": code_version()})


def output_checksums(run_dir: Path) -> dict[str, str]:
    """sha256 of every file a reuse copies (``REUSED``, folders recursively), keyed by POSIX path in the run."""
    sums: dict[str, str] = {}
    for name in REUSED:
        top = run_dir / name
        for path in sorted(top.rglob("*")) if top.is_dir() else [top] if top.is_file() else []:
            if path.is_file():
                sums[path.relative_to(run_dir).as_posix()] = sha256_file(path)
    return sums


class JobRegistry:
    """Finished jobs by key: ``{"status": ..., "run_dir": ..., "outputs": {file: sha256}}``, written atomically.

    ``outputs`` (completed jobs) is what a later launch reuses without looking: results.csv and the figures are
    read from those files, so one that changed after the job (by hand or by a broken copy) must not pass for
    the job's result."""

    def __init__(self, cache_dir: str | Path):
        self.root = Path(cache_dir) / "jobs"

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def completed_run(self, key: str) -> Path | None:
        """The folder of a completed run with this key whose outputs are still the ones recorded, else None
        (the job then reruns; a changed or missing output is logged as a warning naming the file)."""
        try:
            entry = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None
        run_dir = Path(entry.get("run_dir", ""))
        summary = run_dir / "summary.json"
        if entry.get("status") != "completed" or not summary.exists():
            return None
        try:
            if json.loads(summary.read_text()).get("status") != "completed":
                return None
        except ValueError:
            return None
        recorded = entry.get("outputs")
        if not isinstance(recorded, dict) or "summary.json" not in recorded:
            # Recorded without checksums: nothing vouches for its outputs.
            log.warning("job %s in %s has no recorded checksums of its outputs: rerunning it", key[:12], run_dir)
            return None
        found = output_checksums(run_dir)
        for name, recorded_sum in sorted(recorded.items()):
            if found.get(name) != recorded_sum:
                state = "is missing" if name not in found else "changed since the job completed (sha256 differs)"
                log.warning("job %s: %s %s: rerunning the job instead of reusing its outputs", key[:12],
                            run_dir / name, state)
                return None
        return run_dir

    def record(self, key: str, run_dir: str | Path, status: str) -> None:
        run_dir = Path(run_dir).resolve()
        entry: dict[str, Any] = {"status": status, "run_dir": str(run_dir)}
        if status == "completed":
            entry["outputs"] = output_checksums(run_dir)
        atomic_write_json(self._path(key), entry)


def reuse(previous: Path, run_dir: Path) -> dict[str, Any]:
    """Copy a completed job's outputs into this job's folder and return its summary, marked ``resumed_from``
    the folder it came from. A job relaunched in its own folder is returned as it is: its provenance stays."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if previous.resolve() == run_dir.resolve():
        return json.loads((run_dir / "summary.json").read_text())
    for name in REUSED:
        src = previous / name
        if src.is_dir():
            shutil.copytree(src, run_dir / name, dirs_exist_ok=True)
        elif src.exists():
            shutil.copy2(src, run_dir / name)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.update({"resumed_from": str(previous.resolve()), "run_dir": str(run_dir)})
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def log_reused(cfg: Config, resolved: dict[str, Any], summary: dict[str, Any], group: str | None) -> None:
    """A reused job's W&B run in this sweep's group: its config, its final metrics and its summary (with
    ``resumed_from``), tagged ``reused``. Local files are the copied ones, so only W&B is written."""
    if cfg.tracker.kind != "wandb":
        return
    from alignment.experiment import FINAL_METRICS, chartable, tracker_settings
    from alignment.tracking import WandbTracker

    run_dir = Path(cfg.run_dir or ".")
    run = WandbTracker(run_dir, **tracker_settings(cfg, run_dir, resolved, group, tags=("reused",)))
    run.log(chartable(summary, FINAL_METRICS))
    run.finish(summary)


def run_sweep_job(cfg: Config, resolved: dict[str, Any], *, group: str | None,
                  processes_at_once: int = 1) -> dict[str, Any] | None:
    """One job of a multirun: skipped (outputs reused) when an identical job completed before; otherwise run,
    with a failure recorded and logged instead of raised, so the sweep goes on and reports it at the end."""
    from alignment import distributed
    from alignment.experiment import check_cache_dir, run_experiment

    # Raised, not recorded as the job's failure: the registry lives in this folder, and every job of the sweep
    # would fail alike, so the sweep stops here, before any job's work.
    check_cache_dir(cfg.cache_dir)
    registry, key = JobRegistry(cfg.cache_dir), job_key(resolved)
    run_dir = Path(cfg.run_dir or ".")
    main = distributed.current().is_main  # the ranks of a multi-task job decide alike; rank 0 keeps the books
    previous = registry.completed_run(key)
    if previous is not None:
        if not main:
            return None
        summary = reuse(previous, run_dir)
        if previous.resolve() == run_dir.resolve():  # relaunched in place: its W&B run is in the group already
            log.info("job %s completed before in this folder: kept as it is", key[:12])
        else:
            log.info("job %s completed before in %s: reusing its outputs", key[:12], previous)
            log_reused(cfg, resolved, summary, group)
        return summary
    try:
        summary = run_experiment(cfg, resolved_config=resolved, group=group, processes_at_once=processes_at_once)
    except Exception:
        if not main:
            raise  # a rank's failure must end its task, so that the scheduler stops the job's other ranks
        log.exception("job failed (outputs in %s); the sweep continues and reports failures at the end", run_dir)
        registry.record(key, run_dir, "failed")
        return None
    if main:
        registry.record(key, run_dir, "completed")
    return summary
