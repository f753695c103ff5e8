"""The one stage-2 training loop: items in, a trained policy out.

Algorithms differ only in which items they pass in (MoCAN: pairs labelled from r + λ*ᵀg, or lists of a prompt's
samples with targets r_λ/β; PeCAN, fixed λ, DPO on one objective) and in the objective: a function of the
policy and a batch returning per-item losses, built from how a policy computes log-ratios for a batch
(injected by the world) and a loss of alignment/losses.py. The loop itself is set up, train (AdamW,
accumulation, clipping, schedule), return.

Objectives (``algorithm.objective`` chooses for stage 2; DPO baselines and PeCAN's pre-alignment are pairwise):

    pairwise    pairs {prompt, y1, y0, label}: soft-label DPO, -[p log σ(h) + (1-p) log σ(-h)], h = β(ρ1 - ρ0)
    all_pairs   the same loss on every distinct pair of each prompt's K samples (built by items.make_pairs)
    listwise    lists {prompt, ys [K], target [K], base [K]}: -Σ q log softmax(ρ), q = softmax(r_λ/β)
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from alignment import distributed, engines
from alignment.compute import ComputeMeter
from alignment.config import TrainerConfig
from alignment.losses import listwise_loss, listwise_metrics, preference_metrics, pseudo_preference_loss
from alignment.store import atomic_write_json, sha256_file

logger = logging.getLogger(__name__)

# (policy, batch) -> (ρ(y1), ρ(y0)), each [B], with ρ = log π_θ - log π_ref.
LogRatios = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
# (policy, batch) -> ρ of batch["ys"], [B, K].
ListLogRatios = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
# (policy, batch) -> (per-item losses [B], metrics {name: mean over the batch's items}).
Objective = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def pairwise(logratios: LogRatios, beta: float) -> Objective:
    """Soft-label DPO on pairs (alignment.losses.pseudo_preference_loss)."""
    def objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        rho_1, rho_0 = logratios(model, batch)
        losses = pseudo_preference_loss(rho_1, rho_0, batch["label"], beta)
        return losses, preference_metrics(rho_1.detach(), rho_0.detach(), batch["label"], beta)

    return objective


def listwise(logratios: ListLogRatios, anchor: float = 0.0) -> Objective:
    """Cross-entropy to softmax(r_λ/β) over each prompt's responses, plus ``anchor`` times the squared log-mass
    (alignment.losses.listwise_loss)."""
    def objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        rho = logratios(model, batch)
        target = batch["target"].to(rho.device)
        base = batch["base"].to(rho.device) if "base" in batch else None
        losses = listwise_loss(rho, target, base, anchor)
        # With the anchor on the loss is not the cross-entropy the metrics report; the metrics compute that then.
        return losses, listwise_metrics(rho, target, base, cross_entropy=None if anchor else losses)

    return objective


def objective_for(name: str, logratios: ListLogRatios, beta: float, anchor: float = 0.0) -> Objective:
    """The objective ``name`` (``algorithm.objective``: pairwise, all_pairs, listwise) from a world's log-ratio
    function ρ(policy, batch) -> [B, J] over each item's responses (a list's K, a pair's (y1, y0));
    ``anchor``: the listwise objective's log-mass weight. pairwise and all_pairs differ in their pairs only."""
    if name == "listwise":
        return listwise(logratios, anchor)

    def pair_logratios(policy: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        both = logratios(policy, batch)
        return both[:, 0], both[:, 1]

    return pairwise(pair_logratios, beta)


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    pairs_seen: int = 0


def _schedule(cfg: TrainerConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.scheduler == "cosine":
            progress = (step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


def train_pairs(policy: nn.Module, pairs: dict[str, torch.Tensor], logratios: LogRatios, *, beta: float,
                **kwargs: Any) -> TrainResult:
    """Minimise the pseudo-preference loss over ``pairs`` (``train_items`` with the pairwise objective)."""
    return train_items(policy, pairs, pairwise(logratios, beta), **kwargs)


def train_items(
    policy: nn.Module,
    pairs: dict[str, torch.Tensor],
    objective: Objective,
    *,
    cfg: TrainerConfig,
    seed: int,
    log: Callable[[dict[str, Any], int], None] | None = None,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    meter: ComputeMeter | None = None,
) -> TrainResult:
    """Minimise the mean of ``objective`` over the items of ``pairs`` (tensors sharing a first dimension P,
    with "prompt"): pairs or lists, see the module docstring.

    ``cfg.batch_size`` is the global number of items per optimiser step, split into ``cfg.grad_accum``
    micro-batches. Shuffling uses its own generator seeded by ``seed``: the same config and seed give the same
    trained policy.

    Under a distributed launch (``accelerate launch``, see ``alignment.distributed``) every rank draws the same
    order and takes its contiguous share of each micro-batch; the engine of the user's accelerate config (DDP,
    FSDP or DeepSpeed ZeRO: ``alignment.engines``) averages the gradients, and each rank's loss is scaled by the
    world size so that the average is the global batch's mean: the same update as one process, up to float
    summation order. Logged metrics are summed over ranks first, so every rank logs the global batch's numbers.

    With ``checkpoint_dir`` and ``cfg.checkpoint_every > 0``, the trainable weights, optimiser, scheduler and
    data order are saved every ``checkpoint_every`` steps (atomically, by rank 0); a rerun with the same
    arguments resumes from the last checkpoint and ends with the same weights as an uninterrupted run. (Single
    process and DDP only: FSDP and ZeRO shard the optimiser state, and train without checkpoints.)

    A checkpoint also holds the loss history, the last step's loss and, with ``meter`` (the meter the
    objective counts its work in), the compute the training had spent: a resumed run adds it to ``meter``, so
    it reports the same ``compute/*`` and final loss as an uninterrupted one, even when it resumes at its last
    step and trains nothing. Each checkpoint has a checksum; the last two are kept, and one that fails its
    checksum or does not load is skipped with a warning naming it, for the one before or a fresh start
    (see ``_load_checkpoint``).
    """
    n_pairs = int(pairs["prompt"].shape[0])
    if n_pairs == 0:
        raise ValueError("train_items: nothing to train on")
    dist = distributed.current()
    micro = max(cfg.batch_size // cfg.grad_accum, 1)
    if micro < dist.world_size:
        raise ValueError(f"trainer.batch_size: {cfg.batch_size} pairs in {cfg.grad_accum} micro-batches leaves "
                         f"fewer than one pair per process ({dist.world_size} processes); raise batch_size "
                         "(it is global) or lower grad_accum")
    engine = engines.start(policy, lr=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                           micro_batch=micro, grad_accum=cfg.grad_accum)
    if checkpoint_dir is not None and not engine.saves_checkpoints:
        # conf/trainer/lora.yaml checkpoints by default; an error would make every sharded launch override it.
        logger.warning("trainer.checkpoint_every: not under %s (it shards the optimiser state): this training "
                       "is not checkpointed, and a killed run retrains it from the start", engine.kind)
        checkpoint_dir = None
    steps_per_epoch = math.ceil(n_pairs / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    # The scheduler is stepped by hand, once per optimiser step (accelerate's wrapper would step it once per
    # process); it sets the learning rate every engine's step reads.
    scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, _schedule(cfg, total))
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    step, loss_value = 0, float("nan")
    # Compute counts are taken from here on; a resumed run also carries what was spent before its checkpoint.
    counted_from = meter.snapshot() if meter is not None else None
    resume = _load_checkpoint(checkpoint_dir, engine.trainee)
    if resume is not None:
        engine.trainee.load_state_dict(resume["policy"], strict=False)  # keys checked by _load_checkpoint
        engine.optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        generator.set_state(resume["generator"])
        step, history, loss_value = resume["step"], resume["history"], resume["loss"]
        if dist.is_main:
            _set_global_rng(resume["rng"])
        if meter is not None and dist.is_main:
            # The saved counts are every rank's together (see _spent), so one rank adds them: summing the
            # ranks' counts afterwards (LanguageWorld._count_all_ranks) then counts them once.
            meter.add(**resume["compute"])
    model = engine.model
    model.train()
    # disable=None: bars on a terminal, silent in logs and CI; one bar per launch, on rank 0.
    bar = tqdm(total=total, initial=step, desc="stage 2", disable=None if progress and dist.is_main else True,
               leave=False)
    for epoch in range(step // steps_per_epoch, cfg.epochs):
        epoch_state = generator.get_state()
        order = torch.randperm(n_pairs, generator=generator)
        first = (step - epoch * steps_per_epoch) * cfg.batch_size if epoch == step // steps_per_epoch else 0
        for start in range(first, n_pairs, cfg.batch_size):
            batch_idx = order[start:start + cfg.batch_size]
            engine.zero_grad()
            sums: dict[str, float] = {}  # loss and the objective's metrics, summed over the global batch's items
            starts = range(0, len(batch_idx), micro)
            for m_start in starts:
                idx = batch_idx[m_start:m_start + micro]
                mine = idx[dist.shard(len(idx))]
                # A rank left without pairs (a short last batch) still joins the gradient average, with weight 0.
                weight = float(len(mine) > 0)
                batch = {k: v[mine if len(mine) else idx[:1]] for k, v in pairs.items()}
                last = m_start == starts[-1]  # only the last micro-batch reduces gradients across ranks
                with engine.accumulating(last):
                    losses, metrics = objective(model, batch)
                    # Sum over micro-batches and ranks of (sum / batch) = mean over the global batch, whatever
                    # the split; x world size because the ranks' gradients are averaged.
                    engine.backward(losses.sum() * (weight * dist.world_size) / len(batch_idx), last)
                n = len(mine)
                for name, value in {"loss": float(losses.detach().mean()), **metrics}.items():
                    sums[name] = sums.get(name, 0.0) + value * n
            totals = dict(zip(sums, (v / len(batch_idx) for v in dist.sum(list(sums.values())))))
            grad_norm = engine.step()
            scheduler.step()
            step += 1
            loss_value = totals["loss"]
            if step % cfg.log_every == 0 or step == total:
                row = {f"train/{k}": v for k, v in totals.items()}
                row.update({"train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0]})
                history.append({"step": step, **row})
                if log is not None and dist.is_main:
                    log(row, step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if checkpoint_dir is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                spent = _spent(meter, counted_from, dist)  # collective: every rank, before rank 0 writes
                if dist.is_main:
                    # At an epoch's end the generator already holds the next epoch's starting state.
                    state = generator.get_state() if step % steps_per_epoch == 0 else epoch_state
                    _save_checkpoint(checkpoint_dir, {
                        "format": CHECKPOINT_FORMAT, "step": step, "loss": loss_value, "history": history,
                        "compute": spent, "generator": state, "rng": _global_rng(),
                        "policy": _trainable_state(policy),
                        "optimizer": engine.optimizer.state_dict(), "scheduler": scheduler.state_dict()})
    bar.close()
    del model
    engine.finish()
    policy.eval()
    return TrainResult(steps=step, final_loss=loss_value, history=history, pairs_seen=step * cfg.batch_size)


def _trainable_state(policy: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in policy.named_parameters() if p.requires_grad}
    return {k: v for k, v in policy.state_dict().items() if k in names}


def _spent(meter: ComputeMeter | None, start: dict[str, int] | None,
           dist: distributed.Distributed) -> dict[str, int]:
    """The compute this training has spent so far, over every rank (what a resume from here must carry).

    Each rank counts its own share of the batches, so the counts are summed over ranks; a collective, called
    by every rank at every checkpoint.
    """
    if meter is None or start is None:
        return {}
    return dist.sum_counts(meter.since(start))


# Checkpoints of one training live in one folder: ``step-<step>.pt`` (torch.save of tensors and plain
# containers only) and, written after it, ``step-<step>.pt.json`` with its size and sha256. A file is never
# rewritten once its manifest exists, so a kill at any point leaves every older verified checkpoint intact.
CHECKPOINT_FORMAT = 1
_KEEP_CHECKPOINTS = 2  # the newest and its predecessor, to fall back to if the newest is damaged
_LEGACY_CHECKPOINT = "checkpoint.pt"  # one unchecked pickle, written before checkpoints had checksums
_STATE_KEYS = frozenset({"format", "step", "loss", "history", "compute", "generator", "rng", "policy",
                         "optimizer", "scheduler"})


def _global_rng() -> dict[str, Any]:
    """torch's global generators (CPU, and every GPU's once CUDA is in use), as tensors.

    The data order has its own generator; these drive what else is random inside a step (LoRA dropout), so a
    resumed single-process run draws what the uninterrupted one would have. (Under DDP only rank 0's are saved
    and restored: the other ranks' dropout after a resume differs.)
    """
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _set_global_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    # A resume on a machine with other GPUs than the run that saved keeps its own GPU generators.
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoint_path(directory: Path, step: int) -> Path:
    # Zero-padded so that names sort by step.
    return directory / f"step-{step:08d}.pt"


def _manifest_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + ".json")


def _plain(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` reduced to what ``torch.load(weights_only=True)`` accepts: tensors, numbers, strings, None and
    lists, tuples and dicts of them. Anything else is refused here, at save time, rather than found
    unloadable when a killed run tries to resume."""
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"{where}: a {type(obj).__qualname__} cannot be checkpointed (checkpoints load with "
                    "weights_only=True: tensors and plain containers only)")


def _save_checkpoint(directory: Path, state: dict[str, Any]) -> None:
    """Write the checkpoint of ``state["step"]`` with its checksum, then drop all but the newest two.

    The generator state saved is the one at the start of the current epoch, so a resume redraws the same
    permutation and skips the batches already done.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = _checkpoint_path(directory, state["step"])
    tmp = directory / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        torch.save(_plain(state), tmp)
        # Hashing what reached the disk (and syncing it) before the rename: the manifest vouches for the bytes
        # a resume will read.
        digest, size = sha256_file(tmp, sync=True), tmp.stat().st_size
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    atomic_write_json(_manifest_path(path), {"format": CHECKPOINT_FORMAT, "file": path.name,
                                             "step": state["step"], "size": size, "sha256": digest})
    _prune_checkpoints(directory)


def _prune_checkpoints(directory: Path) -> None:
    """Keep the newest ``_KEEP_CHECKPOINTS`` checkpoints; delete older ones, files without a manifest (a save
    killed half-way), temporary files and a legacy ``checkpoint.pt``."""
    manifests = sorted(directory.glob("step-*.pt.json"))
    keep = {m.name for m in manifests[-_KEEP_CHECKPOINTS:]}
    keep |= {m.name.removesuffix(".json") for m in manifests[-_KEEP_CHECKPOINTS:]}
    for old in manifests[:-_KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)  # the manifest first: a checkpoint without one is never loaded
    for path in [*directory.glob("step-*.pt"), *directory.glob(".step-*.tmp"), directory / _LEGACY_CHECKPOINT]:
        if path.name not in keep:
            path.unlink(missing_ok=True)


def _read_checkpoint(manifest: Path, trainable: set[str]) -> dict[str, Any]:
    """The state of the checkpoint ``manifest`` describes, verified; raises if it is damaged or foreign.

    ``weights_only=True``: the cache may be shared, and a pickle can run code when loaded; a checkpoint is
    tensors and plain containers only (``_plain``), which that loader accepts.
    """
    meta = json.loads(manifest.read_text(encoding="utf-8"))
    path = manifest.with_suffix("")  # step-N.pt, beside its manifest step-N.pt.json
    if not isinstance(meta, dict) or meta.get("file") != path.name or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"its manifest {manifest.name} does not describe it")
    size = path.stat().st_size
    if size != meta["size"]:
        raise ValueError(f"{size} bytes, {meta['size']} written (truncated?)")
    if sha256_file(path) != meta["sha256"]:
        raise ValueError("checksum mismatch")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or set(state) != _STATE_KEYS or state["step"] != meta["step"]:
        raise ValueError("not a checkpoint of this format")
    # strict=False loading ignores unknown names, so check them here, before anything is applied.
    if set(state["policy"]) != trainable:
        raise ValueError("its weights are not this model's trainable parameters")
    known = set(ComputeMeter().snapshot())
    state["compute"] = {k: int(v) for k, v in state["compute"].items() if k in known}
    return state


def _load_checkpoint(directory: Path | None, policy: nn.Module) -> dict[str, Any] | None:
    """The newest usable checkpoint's state, or ``None`` for a fresh start.

    A damaged checkpoint (truncated, altered, unreadable, refused by the weights-only loader) is skipped with
    a warning naming it, and the one before it tried: one bad file must not block every rerun.
    """
    if directory is None or not directory.is_dir():
        return None
    if (directory / _LEGACY_CHECKPOINT).exists():
        logger.warning("%s: a checkpoint without a checksum, from an older version; not loaded (the training "
                       "restarts or resumes from a newer checkpoint)", directory / _LEGACY_CHECKPOINT)
    trainable = set(_trainable_state(policy))
    manifests = sorted(directory.glob("step-*.pt.json"), reverse=True)  # newest first
    for i, manifest in enumerate(manifests):
        path = manifest.with_suffix("")
        try:
            return _read_checkpoint(manifest, trainable)
        except Exception as e:  # whatever a damaged file raises (zip, pickle, json, OS...): skip it
            fallback = "falling back to the previous one" if i + 1 < len(manifests) else "training from the start"
            logger.warning("checkpoint %s is unusable (%s: %s); %s", path, type(e).__name__, e, fallback)
    return None
