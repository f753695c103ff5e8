"""The one stage-2 training loop: items in, a trained policy out.

Algorithms differ only in which items they pass in (MoCAN: pairs labelled from r + λ*ᵀg, or lists of a prompt's
samples with targets r_λ/β; PeCAN, fixed λ, DPO on one objective) and in the objective: a function of the
policy and a batch returning per-item losses, built from how a policy computes log-ratios for a batch
(injected by the world) and a loss of alignment/losses.py. The loop itself is set up, train (AdamW,
accumulation, clipping, schedule), return.

Objectives (``algorithm.objective`` chooses for stage 2; DPO baselines and PeCAN's pre-alignment are pairwise):

    pairwise    pairs {prompt, y1, y0, label}: soft-label DPO, -[p log σ(h) + (1-p) log σ(-h)], h = β(ρ1 - ρ0)
    all_pairs   the same loss on every distinct pair of each prompt's K samples (built by stages.make_pairs)
    listwise    lists {prompt, ys [K], target [K], base [K]}: -Σ q log softmax(ρ), q = softmax(r_λ/β)
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from alignment import distributed, engines
from alignment.config import TrainerConfig
from alignment.losses import listwise_loss, listwise_metrics, preference_metrics, pseudo_preference_loss

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


def listwise(logratios: ListLogRatios) -> Objective:
    """Cross-entropy to softmax(r_λ/β) over each prompt's responses (alignment.losses.listwise_loss)."""
    def objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        rho = logratios(model, batch)
        target = batch["target"].to(rho.device)
        base = batch["base"].to(rho.device) if "base" in batch else None
        losses = listwise_loss(rho, target, base)
        return losses, listwise_metrics(rho, target, base, losses=losses)

    return objective


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
    resume = _load_checkpoint(checkpoint_dir, engine.trainee, engine.optimizer, scheduler)
    if resume is not None:
        step, history = resume["step"], resume["history"]
        generator.set_state(resume["generator"])
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
            if (checkpoint_dir is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0
                    and dist.is_main):
                # At an epoch's end the generator already holds the next epoch's starting state.
                state = generator.get_state() if step % steps_per_epoch == 0 else epoch_state
                _save_checkpoint(checkpoint_dir, policy, engine.optimizer, scheduler, step, history, state)
    bar.close()
    del model
    engine.finish()
    policy.eval()
    return TrainResult(steps=step, final_loss=loss_value, history=history, pairs_seen=step * cfg.batch_size)


def _trainable_state(policy: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in policy.named_parameters() if p.requires_grad}
    return {k: v for k, v in policy.state_dict().items() if k in names}


def _save_checkpoint(directory: Path, policy: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                     step: int, history: list, epoch_generator_state: torch.Tensor) -> None:
    """Atomically replace ``checkpoint.pt``: a crash mid-write leaves the previous checkpoint intact.

    The generator state saved is the one at the start of the current epoch, so a resume redraws the same
    permutation and skips the batches already done.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "checkpoint.pt.tmp"
    torch.save({"step": step, "history": history, "generator": epoch_generator_state,
                "policy": _trainable_state(policy), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, tmp)
    os.replace(tmp, directory / "checkpoint.pt")


def _load_checkpoint(directory: Path | None, policy: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any) -> dict[str, Any] | None:
    path = None if directory is None else directory / "checkpoint.pt"
    if path is None or not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    policy.load_state_dict(state["policy"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state
