"""Named sweeps, resumable multiruns, the sweep report (results.csv, Pareto fronts, a W&B summary run) and the
paper's figures, on small tabular sweeps through the real CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from alignment.figures import make_figures
from alignment.intervals import hierarchical_interval
from alignment.sweep import load_sweep, pareto_mask, sweep_points
from alignment.threads import available_cores
from tests.wandb_offline import find_offline_runs, read_offline_run

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["experiment=tabular", "dataset.n_prompts=30", "sampling.num_samples=16", "algorithm.pairs_per_prompt=16",
         "trainer.epochs=20", "algorithm.dual.bootstrap=20", "eval.bootstrap=200",
         "algorithm.primal_dual.iterations=3", "algorithm.primal_dual.num_samples=16"]


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args, "cache_dir=cache"], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """`sweeps=margins` with an algorithm axis added: MoCAN, cold primal-dual and π_ref over three margins."""
    cwd = tmp_path_factory.mktemp("sweep")
    out = cli(["sweeps=margins", *SMALL, "safety.margin=0.1,0.3,0.5",
               "algorithm=mocan,primal_dual,reference", "hydra.sweep.dir=sweep"], cwd)
    assert out.returncode == 0, out.stderr[-4000:]
    return cwd, out


def test_named_sweep_runs_every_job_and_reports(sweep):
    cwd, _ = sweep
    root = cwd / "sweep"
    loaded = load_sweep(root)
    assert len(loaded.jobs) == 9 and not loaded.failed
    with open(root / "report" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9
    by_dir = {r["run_dir"]: r for r in rows}
    for job in loaded.jobs:
        row = by_dir[str(job.run_dir)]
        assert float(row["eval/safety_gain_0"]) == pytest.approx(job.summary["eval/safety_gain"][0])
        assert row["algorithm/label"] == job.label
    # Each margin its own job and folder; a larger margin needs a larger λ.
    mocan = sorted((j for j in loaded.jobs if j.label == "mocan"), key=lambda j: j.margin)
    assert [j.summary["margin"] for j in mocan] == [[0.1], [0.3], [0.5]]
    lams = [j.summary["dual/lambda"][0] for j in mocan]
    assert lams == sorted(lams) and lams[0] < lams[-1]
    assert len({j.run_dir for j in loaded.jobs}) == 9
    # One W&B run per job (never merged) plus the sweep's summary run, all in one group.
    runs = [read_offline_run(p) for p in find_offline_runs(root)]
    assert len(runs) == 10 and len({r.run_id for r in runs}) == 10 and len({r.group for r in runs}) == 1
    assert next(iter({r.group for r in runs})).startswith("sweep")
    job_runs = [r for r in runs if r.job_type != "sweep-report"]
    assert sorted(r.config["safety"]["margin"] for r in job_runs) == sorted(j.summary["margin"][0] for j in loaded.jobs)
    assert all(r.exit_code == 0 for r in runs)
    # points.json: with one seed per point, the intervals are the job's own, to the digit.
    for point in json.loads((root / "report" / "points.json").read_text()):
        (job,) = [j for j in loaded.jobs if j.label == point["label"] and list(j.margin) == point["margin"]]
        lo, hi = job.summary["eval/safety_gain_ci"]
        assert point["safety_ci"] == [lo[0], hi[0]] and point["reward_ci"] == job.summary["eval/reward_gain_ci"]
    assert all(f"eval/safety_gain/{j.config['safety']['constraints'][0]}" in j.summary for j in job_runs)
    report_runs = [r for r in runs if r.job_type == "sweep-report"]
    assert len(report_runs) == 1 and report_runs[0].summary["sweep/jobs"] == 9
    # The Pareto table stays a table in the report run's summary; its chart has a key of its own.
    assert report_runs[0].summary["sweep/pareto"]["_type"] == "table-file"
    assert report_runs[0].summary["sweep/pareto_plot"]["_type"] == "image-file"


def test_relaunch_skips_completed_jobs_and_reports_failures(sweep):
    cwd, _ = sweep
    start = time.perf_counter()
    again = cli(["sweeps=margins", *SMALL, "safety.margin=0.1,0.3,0.5",
                 "algorithm=mocan,primal_dual,reference", "hydra.sweep.dir=again"], cwd)
    assert again.returncode == 0, again.stderr[-3000:]
    relaunched = load_sweep(cwd / "again")
    assert len(relaunched.jobs) == 9 and all(j.summary.get("resumed_from") for j in relaunched.jobs)
    first = {(j.label, j.margin): j.summary["eval/safety_gain"] for j in load_sweep(cwd / "sweep").jobs}
    assert {(j.label, j.margin): j.summary["eval/safety_gain"] for j in relaunched.jobs} == first
    assert time.perf_counter() - start < 120  # 9 reused jobs: copies and short W&B runs, no training
    # The new folder's W&B group lists every job: each reused job is a short run there, tagged and linked.
    runs = [read_offline_run(p) for p in find_offline_runs(cwd / "again")]
    jobs = [r for r in runs if r.job_type != "sweep-report"]
    assert len(jobs) == 9 and len({r.group for r in runs}) == 1 and all("reused" in r.tags for r in jobs)
    assert {r.summary["resumed_from"] for r in jobs} == {str(j.run_dir.resolve()) for j in load_sweep(cwd / "sweep").jobs}
    assert next(iter({r.group for r in runs})) != next(iter({r.group for r in
                                                             map(read_offline_run, find_offline_runs(cwd / "sweep"))}))
    # Relaunched in place: nothing reruns, no job run is added, provenance stays, and the report run is the same
    # W&B run (a fixed id), not a second one in the group.
    before = set(find_offline_runs(cwd / "sweep"))
    in_place = cli(["sweeps=margins", *SMALL, "safety.margin=0.1,0.3,0.5",
                    "algorithm=mocan,primal_dual,reference", "hydra.sweep.dir=sweep"], cwd)
    assert in_place.returncode == 0, in_place.stderr[-3000:]
    after = [read_offline_run(p) for p in find_offline_runs(cwd / "sweep") if p not in before]
    assert [r.job_type for r in after] == ["sweep-report"]
    first_report = [run for run in map(read_offline_run, before) if run.job_type == "sweep-report"]
    assert after[0].run_id == first_report[0].run_id
    assert not any(j.summary.get("resumed_from") for j in load_sweep(cwd / "sweep").jobs)
    # An infeasible margin fails its job only; the sweep finishes, lists it and exits non-zero, and the job's
    # W&B run ends failed.
    failing = cli(["-m", *SMALL, "safety.margin=0.3,50", "hydra.sweep.dir=failing"], cwd)
    assert failing.returncode != 0
    assert "failed job" in failing.stderr and "infeasible" in failing.stdout + failing.stderr
    partial = load_sweep(cwd / "failing")
    assert len(partial.jobs) == 1 and len(partial.failed) == 1
    assert partial.jobs[0].summary.get("resumed_from")  # margin 0.3 with MoCAN ran in the first sweep
    exits = {r.config["safety"]["margin"]: r.exit_code for r in map(read_offline_run, find_offline_runs(cwd / "failing"))
             if r.job_type == "mocan"}
    assert exits == {0.3: 0, 50: 1}


@pytest.mark.fast
def test_chartable_scalars_and_one_name_per_kind(tmp_path):
    from alignment.experiment import chartable
    from alignment.tracking import make_tracker

    summary = {"constraints": ["harm", "bias"], "margin": [0.1, 0.2], "eval/safety_gain": [0.3, 0.4],
               "eval/safety_gain_ci": [[0.2, 0.3], [0.4, 0.5]], "eval/kl": 1.5, "eval/constraint_met": True,
               "fit/component_slopes": [1.0, 0.9, 0.8], "time/train": 2.0}
    assert chartable(summary, ("margin", "eval/", "fit/")) == {
        "margin/harm": 0.1, "margin/bias": 0.2, "eval/safety_gain/harm": 0.3, "eval/safety_gain/bias": 0.4,
        "eval/kl": 1.5}  # not the intervals, the booleans, other prefixes or vectors of another length
    tracker = make_tracker("none", tmp_path)
    tracker.log_table("dual/curve", ["a"], [[1]])
    with pytest.raises(ValueError, match="dual/curve"):
        import matplotlib.pyplot as plt

        tracker.log_figure("dual/curve", plt.figure())
    tracker.finish()


@pytest.mark.fast
def test_the_group_is_the_folder_however_it_is_written_and_the_key_what_decides_results(tmp_path, monkeypatch):
    from alignment.jobs import job_key
    from alignment.sweep import sweep_group

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "multirun" / "d" / "t").mkdir(parents=True)
    written = ["outputs/multirun/d/t", str(tmp_path / "outputs/multirun/d/t"), "outputs/multirun/d/../d/t/"]
    assert len({sweep_group(w) for w in written}) == 1
    assert sweep_group("outputs/multirun/d/t").startswith("sweep-d-t-")
    assert sweep_group("outputs/multirun/d/t") != sweep_group("other/multirun/d/t")  # same tail, other folder
    resolved = {"seed": 0, "safety": {"margin": 0.3}, "run_dir": "a", "cache_dir": "cache",
                "tracker": {"kind": "wandb", "tags": []}}
    same = {**resolved, "run_dir": "b", "cache_dir": str(tmp_path / "cache"), "tracker": {"kind": "none"}}
    assert job_key(resolved) == job_key(same)
    assert job_key(resolved) != job_key({**resolved, "safety": {"margin": 0.4}})


def test_unknown_sweep_name_fails_loudly(tmp_path):
    out = cli(["sweeps=margin", *SMALL], tmp_path)
    assert out.returncode != 0 and "sweeps" in out.stderr
    assert not list(tmp_path.rglob("summary.json"))  # no default job ran instead


def test_figures_regenerate_from_outputs_and_match_summaries(sweep, tmp_path):
    cwd, _ = sweep
    start = time.perf_counter()
    data = make_figures(cwd / "sweep", tmp_path / "figs")
    elapsed = time.perf_counter() - start
    assert elapsed < 30, elapsed
    expected = {"fig1a_reference_scores", "fig1b_dual_curves", "fig1c_solver_error", "fig1d_lambda_vs_margin",
                "fig2a_predicted_vs_achieved", "fig2b_score_distributions", "fig3a_tradeoff", "fig4_lambda_vs_data",
                "fig5_compute"}
    assert expected <= set(data)
    assert set(data.skipped) == {"fig3b_win_rates"}  # an exact world has no model-based win rates, and says so
    for key in expected:
        assert (tmp_path / "figs" / f"{key}.pdf").stat().st_size > 0 and (tmp_path / "figs" / f"{key}.png").exists()
    jobs = load_sweep(cwd / "sweep").jobs
    mocan = {j.margin[0]: j.summary for j in jobs if j.label == "mocan"}
    # Plotted values are the summaries' values.
    fig2 = data["fig2a_predicted_vs_achieved"]
    for margin, pred, ins, ach in zip(fig2["margin"], fig2["predicted"], fig2["insample"], fig2["achieved"]):
        assert pred == pytest.approx(mocan[margin]["predicted/safety_gain"][0])
        assert ins == pytest.approx(mocan[margin]["insample/safety_gain"][0])
        assert ach == pytest.approx(mocan[margin]["eval/safety_gain"][0])
    for margin, curve in data["fig1b_dual_curves"].items():
        assert curve["lambda_star"] == pytest.approx(mocan[margin]["dual/lambda"][0], rel=1e-6)
    lams = data["fig1d_lambda_vs_margin"]  # λ against the margin: the summaries' multipliers, per algorithm
    assert set(lams) == {"mocan", "primal_dual_cold"}
    for label, d in lams.items():
        own = {j.margin[0]: j.summary["dual/lambda"][0] for j in jobs if j.label == label}
        assert dict(zip(d["margin"], d["lambda"])) == pytest.approx(own)
    trade = data["fig3a_tradeoff"]
    for job in jobs:  # one seed per point: the plotted point is the job's own pair of gains
        assert any(np.isclose(x, job.summary["eval/reward_gain"]) and np.isclose(y, job.summary["eval/safety_gain"][0])
                   for x, y in trade[job.label])
    compute = data["fig5_compute"]
    for job in jobs:
        if job.label != "reference":
            tokens, _ = compute[f"{job.label} b={job.margin[0]:g}"]
            assert tokens == job.summary["compute/forward_tokens"] + job.summary["compute/backward_tokens"]
    assert data["fig1c_solver_error"]["projected Newton (ours)"][-1] < 1e-8
    assert len(data["fig1c_solver_error"]["projected Newton (ours)"]) < len(
        data["fig1c_solver_error"]["projected gradient (paper)"])


def test_report_cli_and_fronts(sweep):
    cwd, _ = sweep
    out = subprocess.run([sys.executable, "-m", "alignment.report", str(cwd / "sweep")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    points = json.loads((cwd / "sweep" / "report" / "points.json").read_text())
    assert {p["label"] for p in points} == {"mocan", "primal_dual_cold", "reference"}
    assert all(p["safety_ci"][0] <= p["safety_gain"] <= p["safety_ci"][1] for p in points)
    loaded = sweep_points(load_sweep(cwd / "sweep"))
    assert any(p.on_front for p in loaded if p.label == "mocan")


def test_pareto_mask_and_hierarchical_interval():
    pts = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.2, 0.2], [1.0, 0.0]])
    assert pareto_mask(pts).tolist() == [True, True, True, False, True]  # ties are not dominated
    one = hierarchical_interval([np.linspace(0, 1, 101)], 0.9)
    assert one == pytest.approx((0.05, 0.95), abs=0.02)  # one seed: its own prompt interval
    wide = hierarchical_interval([np.full(50, 0.0), np.full(50, 1.0)], 0.95)
    assert wide[0] == pytest.approx(0.0) and wide[1] == pytest.approx(1.0)  # seed spread dominates


def test_parallel_launchers_run_and_resume_jobs(tmp_path):
    """hydra-joblib-launcher runs the jobs in parallel processes, one thread each on 2 cores (the cores divided
    among the jobs at once); the Slurm preset's launcher (hydra-submitit-launcher, run locally, each job in its
    own submitit process) relaunched into a new folder skips them through the registry in the cache. (A
    submitit job that trains is run by tests/test_distributed.py::test_slurm_job_tasks_train_as_ranks.)"""
    common = ["-m", *SMALL, "safety.margin=0.2,0.4", "tracker=none"]
    out = cli([*common, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweep.dir=par"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    done = load_sweep(tmp_path / "par")
    assert sorted(j.margin for j in done.jobs) == [(0.2,), (0.4,)]
    assert not any(j.summary.get("resumed_from") for j in done.jobs)
    assert [j.summary["threads"] for j in done.jobs] == [max(available_cores() // 2, 1)] * 2
    assert (tmp_path / "par" / "report" / "results.csv").exists()  # the report callback ran after the pool
    again = cli([*common, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                 "hydra.sweep.dir=again"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = load_sweep(tmp_path / "again")
    assert all(j.summary.get("resumed_from") for j in resumed.jobs) and len(resumed.jobs) == 2
    by_margin = {j.margin: j.summary["eval/safety_gain"] for j in done.jobs}
    assert {j.margin: j.summary["eval/safety_gain"] for j in resumed.jobs} == by_margin
