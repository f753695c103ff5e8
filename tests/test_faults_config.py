"""Faults caught before any work (issue 16): config groups that do not make one world, an unwritable cache_dir,
reused sweep jobs whose outputs changed, and the infeasible dual's numbers in the summary and the report."""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from alignment.algorithms import InfeasibleMarginError
from alignment.config import (
    GOLD_TEXT_SCORERS,
    LEARNED_SCORERS,
    AlgorithmConfig,
    Config,
    DualConfig,
    EvalConfig,
    HFModelConfig,
    IncompatibleGroupsError,
    SafetyConfig,
    SamplingConfig,
    ScorerConfig,
    TabularDatasetConfig,
    TabularModelConfig,
    TrackerConfig,
    TrainerConfig,
)
from alignment.experiment import CacheDirError, format_report, run_experiment
from alignment.hydra_app import register_configs
from alignment.jobs import JobRegistry, job_key, run_sweep_job

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
WORLD_GROUPS = ("dataset", "model", "scorer")
register_configs()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


# ----------------------------------------------------------------------------------------------------------
# Point 4: groups that do not fit together fail at conversion, naming the groups, the options and the fix

# The combinations that make a world: the tabular world's own three pieces; a text dataset with a causal LM (the
# toy Llama only on the toy world it is built from) and text scorers.
TEXT_SCORERS = ("beaver", "learned", "toy")
VALID = {("tabular", "tabular", "tabular")} | {
    (dataset, model, scorer)
    for dataset in ("toy", "real-prompts", "pku-saferlhf-30k")
    for model in ("alpaca-7b-reproduced", "smollm2-135m", *(("toy-llama",) if dataset == "toy" else ()))
    for scorer in TEXT_SCORERS
}


def test_every_world_combination_converts_or_names_the_misfit():
    """Every dataset x model x scorer option: a world converts, a misfit fails with IncompatibleGroupsError
    (never an AttributeError or KeyError, never later), naming the dataset, the piece that does not fit and a
    fix. Checked at conversion (what run.py does before any work) plus each valid world's cheap parts (gold
    scorers, the tabular world's stages); running a stage of the language worlds would take minutes per world.

    Each option is composed once by Hydra and the 64 combinations are assembled from those nodes (Hydra puts
    each group under its own key, so this is the composition itself, as checked on one combination below):
    ~4 s instead of ~15 s for 64 compositions."""
    from alignment.scorers import build_scorer
    from alignment.worlds import build_world

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        # experiment=tabular sets no key of these groups (the default experiment=smollm2 sets dataset keys that
        # the tabular and toy datasets do not have; see test_default_experiment_misfit_names_the_groups)
        base = compose(config_name="config", overrides=["experiment=tabular"])
        nodes = {g: {o: compose(config_name="config", overrides=["experiment=tabular", f"{g}={o}"])[g]
                     for o in options(g)} for g in WORLD_GROUPS}
        full = compose(config_name="config", overrides=["experiment=tabular", "dataset=toy", "model=smollm2-135m",
                                                        "scorer=learned"])
    converted, refused = set(), {}
    for combo in itertools.product(*(options(g) for g in WORLD_GROUPS)):
        cfg = base.copy()
        cfg.dataset, cfg.model, cfg.scorer = (nodes[g][o] for g, o in zip(WORLD_GROUPS, combo))
        if combo == ("toy", "smollm2-135m", "learned"):
            assert OmegaConf.to_container(cfg) == OmegaConf.to_container(full)
        try:
            obj = OmegaConf.to_object(cfg)
        except IncompatibleGroupsError as err:
            refused[combo] = str(err)
            continue
        converted.add(combo)
        if obj.dataset.kind == "tabular":
            build_world(obj)
        else:
            for spec in [obj.scorer.reward, *obj.scorer.safety]:
                if spec.kind == "gold":
                    build_scorer(spec)
    assert converted == VALID
    for (dataset, model, scorer), message in refused.items():
        assert message.startswith("config groups do not fit together: ")
        assert f"dataset={dataset} (" in message  # the world, by the option the user chose
        # The piece that does not fit: the model when it has no place in this world, else the scorer.
        model_misfits = (model == "tabular") != (dataset == "tabular") or (model == "toy-llama" and dataset != "toy")
        culprit = (f"model '{nodes['model'][model].name}'" if model_misfits
                   else f"scorer.kind={nodes['scorer'][scorer].kind}")
        assert culprit in message, (dataset, model, scorer, message)
        assert "; use " in message  # a fix: the groups' options that do fit
    # Each experiment is one of the worlds.
    for path in (CONF / "experiment").glob("*.yaml"):
        chosen = OmegaConf.load(path).defaults
        world = tuple(next(d[f"override /{g}"] for d in chosen if f"override /{g}" in d) for g in WORLD_GROUPS)
        assert world in VALID, path.name


@pytest.mark.fast
def test_scorer_names_known_to_the_config_are_the_scorers_modules():
    """The config refuses unknown gold and learned scorer names at conversion; its lists must be the ones that
    alignment/scorers.py builds from."""
    from alignment import scorers

    assert set(GOLD_TEXT_SCORERS) == set(scorers._gold_scorers())
    learned = inspect.getsource(scorers._learned_scorer)
    assert all(f'"{name}"' in learned for name in LEARNED_SCORERS)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # The examples: an HF model recorded on a tabular run, tables asked to score text (which failed
        # after π_ref was built), a checkpoint path the toy model silently ignored.
        (["experiment=tabular", "model=smollm2-135m"],
         r"model 'smollm2-135m' \(a causal LM\) does not fit dataset=tabular .*use model=tabular scorer=tabular"),
        (["experiment=toy", "scorer=tabular"], r"scorer.kind=tabular .* does not fit dataset=toy .*use a text scorer"),
        (["experiment=toy", "model.name_or_path=/nonexistent"],
         r"model.name_or_path='/nonexistent': model=toy-llama .* loads no checkpoint.*model=smollm2-135m"),
        (["experiment=toy", "model.revision=main"], r"model.revision='main'"),
        (["experiment=toy", "model=tabular"], r"model 'tabular-logits' .* does not fit dataset=toy"),
        (["experiment=smollm2", "model=toy-llama"], r"model 'toy-llama' .* does not fit dataset=real-prompts"),
        # lm-eval needs held-out prompts marked harmful: it failed after training on the preference dataset.
        (["experiment=smollm2", "dataset=pku-saferlhf-30k"], r"eval.lmeval=true does not fit dataset=pku"),
        (["experiment=toy", "scorer.safety.0.name=toy/safty"], r"scorer.safety\[0\] 'toy/safty' \(kind gold\)"),
        (["experiment=smollm2", "scorer.reward.name=minilm/helpful"], r"'minilm/helpful' \(kind learned\)"),
        (["experiment=tabular", "scorer.reward.kind=learned"], r"scorer.reward.kind=learned does not fit"),
        (["experiment=tabular", "dataset.kind=toy"], r"dataset.kind='toy': the kind is fixed"),
        (["experiment=toy", "scorer.kind=txt"], r"scorer.kind: 'tabular' .* or 'text'"),
    ],
)
def test_misfits_fail_at_conversion_naming_groups_and_fix(overrides, message):
    cfg = compose_config(overrides)
    with pytest.raises(ValueError, match=message):
        OmegaConf.to_object(cfg)


@pytest.mark.fast
def test_default_experiment_misfit_names_the_groups():
    """`dataset=toy model=tabular` on the default experiment: the misfit, not a key the user never typed."""
    cfg = compose_config(["dataset=toy", "model=tabular"])  # composes: no experiment sets another world's key
    with pytest.raises(IncompatibleGroupsError, match=r"model 'tabular-logits' .* does not fit dataset=toy"):
        OmegaConf.to_object(cfg)


def tabular_config(tmp_path: Path, *, margin: float = 0.3, cache_dir: str | Path | None = None) -> Config:
    """A tabular job of about a second."""
    return Config(
        dataset=TabularDatasetConfig(n_prompts=30),
        model=TabularModelConfig(),
        scorer=ScorerConfig(),
        safety=SafetyConfig(margin=margin),
        algorithm=AlgorithmConfig(beta=0.5, pairs_per_prompt=16, dual=DualConfig(bootstrap=20)),
        sampling=SamplingConfig(num_samples=16),
        trainer=TrainerConfig(lr=0.3, epochs=5, batch_size=2048),
        eval=EvalConfig(bootstrap=50, insample_samples=4),
        tracker=TrackerConfig(kind="none"),
        cache_dir=str(cache_dir if cache_dir is not None else tmp_path / "cache"),
        run_dir=str(tmp_path / "run"),
    )


@pytest.mark.fast
def test_run_experiment_rechecks_groups_changed_after_conversion(tmp_path):
    cfg = tabular_config(tmp_path)
    cfg.model = HFModelConfig(name="my-lm", name_or_path="/somewhere")
    start = time.perf_counter()
    with pytest.raises(IncompatibleGroupsError, match="model 'my-lm' .* does not fit dataset=tabular"):
        run_experiment(cfg, progress=False)
    assert time.perf_counter() - start < 1.0
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # before any work


# ----------------------------------------------------------------------------------------------------------
# Point 8: an unwritable cache_dir fails before any work, naming the path


@pytest.mark.fast
def test_uncreatable_cache_dir_fails_before_any_work(tmp_path):
    # A folder under a regular file cannot be made, even by root (for whom chmod does not stop writes).
    (tmp_path / "afile").write_text("")
    cache = tmp_path / "afile" / "cache"
    cfg = tabular_config(tmp_path, cache_dir=cache)
    start = time.perf_counter()
    with pytest.raises(CacheDirError, match=rf"cache_dir={cache}: cannot write to {cache} .*set cache_dir="):
        run_experiment(cfg, progress=False)
    assert time.perf_counter() - start < 1.0
    assert not (tmp_path / "run").exists()  # no run_info, no summary, no sampling
    # A sweep job raises it too, rather than recording a failure in the registry it cannot write: every job of
    # the sweep would fail alike, after its work.
    with pytest.raises(CacheDirError, match="cache_dir="):
        run_sweep_job(cfg, asdict(cfg), group=None)
    assert not (tmp_path / "run").exists()


@pytest.mark.fast
def test_read_only_cache_dir_fails_before_any_work(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o500)
    try:
        if os.access(cache, os.W_OK):
            pytest.skip("running as root (or a file system that ignores modes): a read-only folder stays writable")
        with pytest.raises(CacheDirError, match=rf"cannot write to {cache} \(PermissionError"):
            run_experiment(tabular_config(tmp_path, cache_dir=cache), progress=False)
        assert not (tmp_path / "run").exists()
    finally:
        cache.chmod(0o700)


# ----------------------------------------------------------------------------------------------------------
# Point 5: a reused sweep job's outputs are checked against the registry's checksums


def test_reused_job_with_changed_outputs_reruns(tmp_path, caplog):
    cache = tmp_path / "cache"

    def job(folder: str) -> tuple[Config, dict]:
        cfg = replace(tabular_config(tmp_path, cache_dir=cache), run_dir=str(tmp_path / folder))
        return cfg, asdict(cfg)

    cfg, resolved = job("first")
    first = run_sweep_job(cfg, resolved, group=None)
    assert first["status"] == "completed"
    key = job_key(resolved)
    entry = json.loads((cache / "jobs" / f"{key}.json").read_text())
    assert {"summary.json", "arrays.npz", "run_info.json", "metrics.jsonl"} <= set(entry["outputs"])
    # Untouched: reused, and the registry still points at the first folder.
    reused = run_sweep_job(*job("second"), group=None)
    assert reused["resumed_from"] == str((tmp_path / "first").resolve())
    # One digit of λ changed in the completed job's summary: rerun, with a warning naming the file.
    path = tmp_path / "first" / "summary.json"
    summary = json.loads(path.read_text())
    summary["dual/lambda"] = [summary["dual/lambda"][0] + 1.0]
    path.write_text(json.dumps(summary))
    with caplog.at_level(logging.WARNING, logger="alignment.jobs"):
        rerun = run_sweep_job(*job("third"), group=None)
    assert "resumed_from" not in rerun and rerun["dual/lambda"] == first["dual/lambda"]
    assert any(str(path) in r.getMessage() and "changed" in r.getMessage() for r in caplog.records)
    assert JobRegistry(cache).completed_run(key) == (tmp_path / "third").resolve()
    # Relaunched in place, unchanged: kept as it is, no rerun.
    again = run_sweep_job(*job("third"), group=None)
    assert again == json.loads((tmp_path / "third" / "summary.json").read_text()) and "resumed_from" not in again
    # A truncated arrays.npz (what figures read) or a missing one is no reusable result either.
    arrays = tmp_path / "third" / "arrays.npz"
    arrays.write_bytes(arrays.read_bytes()[:100])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alignment.jobs"):
        assert JobRegistry(cache).completed_run(key) is None
    assert any(str(arrays) in r.getMessage() for r in caplog.records)
    arrays.unlink()
    assert JobRegistry(cache).completed_run(key) is None


# ----------------------------------------------------------------------------------------------------------
# Point 9: the infeasible dual's reachable margin in the summary; the bootstrap's infeasible share in the report


@pytest.mark.fast
def test_infeasible_summary_records_the_reachable_margin(tmp_path):
    with pytest.raises(InfeasibleMarginError) as raised:
        run_experiment(tabular_config(tmp_path, margin=50.0), progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "infeasible" and summary["dual/feasible"] is False
    (reach,) = summary["dual/reachable_margin"]
    assert 0 < reach < 50 and f"{reach:.6g}" in str(raised.value)
    assert summary["dual/message"] in summary["error"]


def test_report_says_when_lambda_interval_leaves_out_infeasible_resamples(tmp_path):
    summary = run_experiment(tabular_config(tmp_path), progress=False)
    assert summary["dual/bootstrap_infeasible_fraction"] == 0
    assert "feasible resamples" not in format_report(summary)
    near = {**summary, "dual/bootstrap_infeasible_fraction": 0.35}
    (line,) = [x for x in format_report(near).splitlines() if x.startswith("lambda*")]
    assert "CI" in line and "over the feasible resamples: 35% of the dual's bootstrap resamples" in line


def test_a_rerun_in_the_same_folder_resumes_its_wandb_run(tmp_path, monkeypatch):
    """A job that failed and is rerun in its folder (a sweep relaunched in place) stays one W&B run: the same
    id, resumed, its steps after the first attempt's, ending with the rerun's exit code."""
    from tests.wandb_offline import find_offline_runs, read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # wandb exports its service's address for child processes; undone after the test, so that the CLI runs of
    # later tests start services of their own.
    monkeypatch.setenv("WANDB_SERVICE", "")
    failing = replace(tabular_config(tmp_path, margin=50.0), tracker=TrackerConfig(kind="wandb"))
    with pytest.raises(InfeasibleMarginError):
        run_experiment(failing, progress=False)
    run_experiment(replace(failing, safety=SafetyConfig(margin=0.3)), progress=False)
    first, second = (read_offline_run(p) for p in find_offline_runs(tmp_path / "run"))
    assert first.run_id == second.run_id == (tmp_path / "run" / "wandb_run_id").read_text()
    assert (first.exit_code, second.exit_code) == (1, 0)
    steps = lambda run: [row["_step"] for row in run.history if "_step" in row]  # noqa: E731
    assert min(steps(second)) > max(steps(first))
