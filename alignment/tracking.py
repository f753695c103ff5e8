"""Run tracking: one small interface, local files always, W&B when asked (offline unless the user logs in).

    tracker.log({"train/loss": 0.3}, step=10)
    tracker.log_table("dual/curve", columns, rows)
    tracker.log_figure("dual/curve_plot", fig)
    tracker.finish(summary, exit_code=0)

Keys are namespaced: dual/, predicted/, train/, eval/, compute/, time/. A table and a figure never share a key
(W&B would keep whichever came last in the run's summary): figures end in ``_plot``, and ``MultiTracker``
refuses a name used for both. ``finish``'s exit code is what W&B's run table shows as the run's state: a job
that did not complete ends failed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from alignment.store import atomic_write_json

log = logging.getLogger(__name__)


class Tracker(Protocol):
    def log(self, metrics: dict[str, Any], step: int | None = None) -> None: ...

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None: ...

    def log_figure(self, name: str, figure: Any) -> None: ...

    def finish(self, summary: dict[str, Any] | None = None, exit_code: int = 0) -> None: ...


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class LocalTracker:
    """Writes ``metrics.jsonl`` (one line per log call), ``tables/<name>.json`` and ``figures/<name>.{png,pdf}``
    under the run directory; figures built later read these files, not a tracker."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def last_step(self) -> int:
        """The largest step an earlier attempt in this folder logged (0 if none): a rerun continues after it."""
        steps = [0]
        for line in (self.run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                step = json.loads(line).get("step")
            except ValueError:  # a line cut short by a kill
                continue
            if isinstance(step, int):
                steps.append(step)
        return max(steps)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()  # a crashed run keeps every step it logged

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        data = {"columns": list(columns), "rows": [[_jsonable(v) for v in row] for row in rows]}
        atomic_write_json(self.run_dir / "tables" / f"{_slug(name)}.json", data)

    def log_figure(self, name: str, figure: Any) -> None:
        out = self.run_dir / "figures"
        out.mkdir(parents=True, exist_ok=True)
        for ext in ("png", "pdf"):
            tmp = out / f".{_slug(name)}.tmp.{ext}"
            figure.savefig(tmp, bbox_inches="tight")
            os.replace(tmp, out / f"{_slug(name)}.{ext}")

    def finish(self, summary: dict[str, Any] | None = None, exit_code: int = 0) -> None:
        if summary is not None:
            atomic_write_json(self.run_dir / "summary.json", summary)
        if not self._metrics.closed:
            self._metrics.close()


class WandbTracker:
    """A W&B run per job: group = the sweep, job_type = the algorithm, the resolved config attached.

    Mode: ``mode`` if given, else WANDB_MODE, else online when an API key is configured, else offline, so a
    first run needs no account. ``finish`` always ends the run, so a multirun in one process never merges jobs.
    """

    def __init__(self, run_dir: str | Path, *, project: str, config: dict[str, Any], group: str | None,
                 job_type: str, tags: Sequence[str], name: str | None, entity: str | None = None,
                 mode: str | None = None, run_id: str | None = None):
        import wandb

        self._wandb = wandb
        self.mode = mode or os.environ.get("WANDB_MODE") or ("online" if _has_api_key() else "offline")
        # run_id: a fixed id (resumed if it exists) for a run that must stay one run however often it is logged,
        # e.g. a sweep's report run; None: a new run.
        self.run = wandb.init(project=project, entity=entity, group=group, job_type=job_type, tags=list(tags),
                              # absolute: a wandb-core service started by another process (WANDB_SERVICE) would
                              # resolve a relative dir against its own working directory
                              name=name, config=config, dir=str(Path(run_dir).absolute()), mode=self.mode,
                              reinit="finish_previous",
                              id=run_id, resume="allow" if run_id else None,
                              # W&B's own end-of-run dump (history sparklines, summary) would repeat the run's
                              # report in the log; finish() says where the run is instead.
                              settings=wandb.Settings(quiet=True))
        log.info("W&B run %s (%s) in %s", self.run.id, self.mode, run_dir)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.run.log({name: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def log_figure(self, name: str, figure: Any) -> None:
        self.run.log({name: self._wandb.Image(figure)})

    def finish(self, summary: dict[str, Any] | None = None, exit_code: int = 0) -> None:
        if summary:
            self.run.summary.update({k: v for k, v in summary.items() if not isinstance(v, dict)})
        sync_dir, url = self.run.settings.sync_dir, self.run.url  # read before finish() closes the run
        self.run.finish(exit_code=exit_code)
        if self.mode == "offline":
            log.info("W&B run %s saved offline; upload it with: wandb sync %s", self.run.id, sync_dir)
        elif url:
            log.info("W&B run %s: %s", self.run.id, url)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class MultiTracker:
    """Fans every call out to several trackers (local first, so its files exist even if W&B fails)."""

    def __init__(self, trackers: Sequence[Tracker]):
        self.trackers = list(trackers)
        self.last_step = 0
        self._kinds: dict[str, str] = {}  # name -> "table" | "figure"

    def _claim(self, name: str, kind: str) -> None:
        if self._kinds.setdefault(name, kind) != kind:
            raise ValueError(f"tracker: {name!r} was logged as a {self._kinds[name]} already; give the {kind} its "
                             "own name (W&B keeps one value per key)")

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if step is not None:
            self.last_step = max(self.last_step, step)
        for t in self.trackers:
            t.log(metrics, step)

    def phase(self, prefix: str) -> Callable[[dict[str, Any], int], None]:
        """A logger for one training phase: keys ``train/x`` become ``<prefix>/x`` and the phase's steps continue
        after the last logged step, because W&B drops rows whose step goes backwards (primal-dual and PeCAN run
        several trainings in one run)."""
        base = self.last_step

        def log_phase(row: dict[str, Any], step: int) -> None:
            renamed = {(f"{prefix}/{k.split('/', 1)[1]}" if k.startswith("train/") else k): v for k, v in row.items()}
            self.log(renamed, step=base + step)

        return log_phase

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self._claim(name, "table")
        for t in self.trackers:
            t.log_table(name, columns, rows)

    def log_figure(self, name: str, figure: Any) -> None:
        self._claim(name, "figure")
        for t in self.trackers:
            t.log_figure(name, figure)

    def finish(self, summary: dict[str, Any] | None = None, exit_code: int = 0) -> None:
        for t in self.trackers:
            t.finish(summary, exit_code)


def make_tracker(kind: str, run_dir: str | Path, **wandb_kwargs: Any) -> MultiTracker:
    """``kind``: "wandb" (local + W&B) or "none" (local files only)."""
    local = LocalTracker(run_dir)
    trackers: list[Tracker] = [local]
    if kind == "wandb":
        trackers.append(WandbTracker(run_dir, **wandb_kwargs))
    elif kind != "none":
        raise ValueError(f"tracker.kind: 'wandb' or 'none', got {kind!r}")
    multi = MultiTracker(trackers)
    # A rerun in a folder that holds an earlier attempt (its W&B run resumed by id) logs after that attempt's
    # steps: W&B drops rows whose step goes backwards.
    previous = local.last_step()
    multi.last_step = previous + 1 if previous else 0
    return multi


def _slug(name: str) -> str:
    return name.replace("/", "_")
