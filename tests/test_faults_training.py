"""Stage 2 under faults (issue 16, points 6 and 7): a training killed after a checkpoint and rerun, or rerun from
a leftover checkpoint at its last step, reports the same compute, final loss and weights as one run in one go;
a truncated, altered or code-carrying checkpoint is skipped with a warning naming it, for the previous one or a
fresh start; and a published adapter leaves no checkpoints behind."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from test_language_algorithms import lm_config

from alignment.compute import ComputeMeter
from alignment.config import TrainerConfig
from alignment.store import ArtifactStore, sha256_file
from alignment.training import TrainResult, train_pairs
from alignment.worlds.tabular import TabularPolicy, make_tables

# 3 epochs of 10 steps; checkpoints at 5, 10, ..., 30 (the last step included, as a finished run leaves it).
CFG = TrainerConfig(lr=0.1, epochs=3, batch_size=64, checkpoint_every=5, log_every=1, scheduler="cosine")


class Killed(Exception):
    """Stands for a kill -9: the run stops between two steps, after its last checkpoint."""


def _kill_at(step: int):
    def log(row: dict[str, Any], at: int) -> None:
        if at == step:
            raise Killed

    return log


def _train(meter: ComputeMeter | None = None, **kwargs: Any) -> tuple[torch.Tensor, TrainResult]:
    """The tabular world's training on fixed soft-labelled pairs, counting its work in ``meter`` the way the
    stages do (inside the objective, one token per response)."""
    world = make_tables(30, 6, 1, 0.6, 1.0, 0)
    g = torch.Generator().manual_seed(0)
    n = 30 * 20
    pairs = {"prompt": torch.arange(30).repeat_interleave(20), "y1": torch.randint(0, 6, (n,), generator=g),
             "y0": torch.randint(0, 6, (n,), generator=g), "label": torch.rand(n, generator=g, dtype=torch.float64)}
    meter = meter if meter is not None else ComputeMeter()

    def logratios(policy: TabularPolicy, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = 2 * len(batch["prompt"])
        meter.add(forward_tokens=tokens, backward_tokens=tokens if torch.is_grad_enabled() else 0)
        x = batch["prompt"]
        return (policy.log_prob(x, batch["y1"]) - policy.ref_log_prob(x, batch["y1"]),
                policy.log_prob(x, batch["y0"]) - policy.ref_log_prob(x, batch["y0"]))

    policy = TabularPolicy(world.ref_logits)
    result = train_pairs(policy, pairs, logratios, beta=0.5, cfg=CFG, seed=3, progress=False, meter=meter,
                         **kwargs)
    return policy.logits.detach().clone(), result


@pytest.fixture(scope="module")
def uninterrupted() -> tuple[torch.Tensor, TrainResult, dict[str, int]]:
    meter = ComputeMeter()
    weights, result = _train(meter)
    return weights, result, meter.snapshot()


def _assert_same(run: tuple[torch.Tensor, TrainResult], meter: ComputeMeter, reference: tuple) -> None:
    weights, result = run
    ref_weights, ref_result, ref_counts = reference
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-12)
    assert meter.snapshot() == ref_counts  # compute/* as if it had run in one go
    assert result.final_loss == ref_result.final_loss and result.steps == ref_result.steps == 30
    assert result.history == ref_result.history


def _killed_after_step_10(directory: Path) -> None:
    with pytest.raises(Killed):
        _train(checkpoint_dir=directory, log=_kill_at(12))
    assert sorted(p.name for p in directory.glob("step-*.pt")) == ["step-00000005.pt", "step-00000010.pt"]


@pytest.mark.fast
def test_a_resumed_training_reports_the_compute_and_loss_of_one_run(tmp_path, uninterrupted):
    """Point 6: the checkpoint carries the compute spent and the losses so far, so a resume adds what the
    killed run had spent instead of reporting only its own share (1,093,176 forward tokens for 1,215,763)."""
    _killed_after_step_10(tmp_path)
    meter = ComputeMeter()
    _assert_same(_train(meter, checkpoint_dir=tmp_path), meter, uninterrupted)


@pytest.mark.fast
def test_a_rerun_from_the_last_steps_checkpoint_keeps_the_true_final_loss(tmp_path, uninterrupted):
    """Point 6: a finished training's last checkpoint (left if the run dies before its adapter is published,
    or found when a corrupted adapter is recomputed) trains nothing, and still reports the final loss and
    the compute of the training, not NaN and 0 backward tokens."""
    _train(checkpoint_dir=tmp_path)
    meter = ComputeMeter()
    run = _train(meter, checkpoint_dir=tmp_path)
    assert meter.backward_tokens > 0 and run[1].final_loss == run[1].final_loss  # not NaN
    _assert_same(run, meter, uninterrupted)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum sees it
    path.write_bytes(bytes(data))


@pytest.mark.fast
@pytest.mark.parametrize("damage, damaged, fallback", [
    (_truncate, ["step-00000010.pt"], "previous"),
    (_flip_a_byte, ["step-00000010.pt"], "previous"),
    (_truncate, ["step-00000010.pt", "step-00000005.pt"], "start"),
], ids=["truncated", "altered", "both-truncated"])
def test_a_damaged_checkpoint_is_skipped_with_a_warning(tmp_path, caplog, uninterrupted, damage, damaged,
                                                        fallback):
    """Point 7: a truncated checkpoint.pt no longer blocks every rerun inside torch's zip reader: its checksum
    fails, a warning names it, and the run resumes from the one before (or starts afresh), to the same end."""
    _killed_after_step_10(tmp_path)
    for name in damaged:
        damage(tmp_path / name)
    meter = ComputeMeter()
    with caplog.at_level(logging.WARNING, logger="alignment.training"):
        run = _train(meter, checkpoint_dir=tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(damaged)
    for name, message in zip(damaged, warnings):
        assert str(tmp_path / name) in message
    assert ("training from the start" if fallback == "start" else "falling back to the previous") in warnings[-1]
    _assert_same(run, meter, uninterrupted)
    # The run's own checkpoints replace the damaged ones: the last two, each with its checksum.
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [
        "step-00000025.pt", "step-00000025.pt.json", "step-00000030.pt", "step-00000030.pt.json"]


MARKER: list[str] = []


def _payload(path: str) -> None:
    """What a malicious pickle would run on load: here it only leaves a trace."""
    Path(path).write_text("ran")
    MARKER.append(path)


class _Exploit:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return _payload, (self.path,)


@pytest.mark.fast
def test_checkpoints_load_weights_only(tmp_path, caplog, uninterrupted):
    """Point 7: checkpoints are read with weights_only=True. One carrying a pickled object (with a valid
    checksum: someone with write access to a shared cache) is refused without running it, and skipped."""
    _killed_after_step_10(tmp_path)
    newest = tmp_path / "step-00000010.pt"
    state = torch.load(newest, weights_only=True)
    trace = tmp_path / "exploited"
    torch.save({**state, "history": [_Exploit(str(trace))]}, newest)
    manifest = newest.with_name(newest.name + ".json")
    meta = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**meta, "size": newest.stat().st_size, "sha256": sha256_file(newest)}))
    meter = ComputeMeter()
    with caplog.at_level(logging.WARNING, logger="alignment.training"):
        run = _train(meter, checkpoint_dir=tmp_path)
    assert not trace.exists() and not MARKER
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(newest) in message and "UnpicklingError" in message
    _assert_same(run, meter, uninterrupted)
    # Nothing but tensors and plain containers is ever written, so every checkpoint passes that loader.
    from alignment.training import _save_checkpoint

    with pytest.raises(TypeError, match="weights_only"):
        _save_checkpoint(tmp_path / "other", {"step": 1, "history": [object()]})


@pytest.mark.fast
def test_the_work_folder_goes_once_the_entry_is_published(tmp_path):
    """Point 6: checkpoints are kept while the training can still be resumed (a failed attempt) and deleted
    once its result is published, or found left over next to a published entry (a kill in between)."""
    store = ArtifactStore(tmp_path / "cache")
    spec = {"a": 1}
    work = store.root / "checkpoints" / store.key("adapter", spec, version="1")

    def failing(out: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        (work / "step-00000001.pt").write_bytes(b"state")
        raise Killed

    def succeeding(out: Path) -> None:
        assert (work / "step-00000001.pt").exists()  # what the failed attempt left, to resume from
        (out / "weights").write_bytes(b"w")

    with pytest.raises(Killed):
        store.get_or_compute("adapter", spec, failing, version="1", work=work)
    assert not store.get_or_compute("adapter", spec, succeeding, version="1", work=work).hit
    assert not work.exists()
    work.mkdir(parents=True)  # a kill between publishing and deleting
    assert store.get_or_compute("adapter", spec, succeeding, version="1", work=work).hit
    assert not work.exists()


def test_a_killed_language_model_training_resumes_to_the_same_adapter_and_compute(tiny_lm, tmp_path):
    """Point 6 through ``LanguageWorld`` on a tiny Llama with LoRA, each run in a new ``LanguageWorld`` (a new
    process's meter) on one cache: a run killed mid stage 2 and rerun reports the compute, final loss and
    weights of one run in one go, and its published adapter leaves no checkpoints; so when that adapter is
    later found corrupt, it is retrained from scratch (not "resumed" at its last step with 0 backward tokens
    and a NaN loss), to the same numbers."""
    from safetensors.torch import load_file

    from alignment.items import make_pairs
    from alignment.worlds import build_world

    cache = tmp_path / "cache"

    def train(log: Any = None) -> tuple[dict[str, int], dict[str, Any], dict[str, torch.Tensor]]:
        cfg = lm_config(tiny_lm, tmp_path, cache)
        cfg.dataset = dataclasses.replace(cfg.dataset, n_prompts=12, test_fraction=0.5)  # 11 dual prompts
        cfg.sampling = dataclasses.replace(cfg.sampling, num_samples=2, max_new_tokens=4)
        cfg.trainer = dataclasses.replace(cfg.trainer, epochs=1, batch_size=6, checkpoint_every=1)
        torch.manual_seed(0)
        stages = build_world(cfg, ArtifactStore(cache))
        responses, _ = stages.sample_reference(torch.Generator().manual_seed(1))
        reward, _ = stages.score(responses)
        pairs = make_pairs(responses, reward, None, pairs_per_prompt=1, labels="soft",
                           generator=torch.Generator().manual_seed(2))
        _, info = stages.train(pairs, trainer=cfg.trainer, beta=1.0, log=log or (lambda row, step: None), progress=False)
        # Copied out of the file's memory map: the test damages that file later.
        weights = {k: v.clone() for k, v in load_file(Path(info["train/adapter"]) / "adapter_model.safetensors")
                   .items()}
        return stages.compute.snapshot(), info, weights

    with pytest.raises(Killed):
        train(_kill_at(2))
    (work,) = (cache / "checkpoints").iterdir()
    assert sorted(p.name for p in work.glob("*.pt")) == ["step-00000001.pt"]
    counts, resumed, weights = train()
    assert resumed["train/steps"] == 2 and not resumed["train/cached"]  # 11 pairs, 6 a step
    assert not work.exists()
    # The adapter goes bad on disk: the store retrains it, from π_ref since no checkpoint is left.
    stored = Path(resumed["train/adapter"]) / "adapter_model.safetensors"
    stored.write_bytes(stored.read_bytes()[:100])
    one_go_counts, one_go, one_go_weights = train()
    assert not one_go["train/cached"] and not work.exists()
    assert counts == one_go_counts and counts["backward_tokens"] > 0
    assert resumed["train/final_loss"] == one_go["train/final_loss"]
    assert weights.keys() == one_go_weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, one_go_weights[name], rtol=0, atol=1e-6)
