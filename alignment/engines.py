"""The distributed engine under the one training loop: DDP, FSDP or DeepSpeed ZeRO, as the user's accelerate
config chose.

``accelerate launch --config_file conf/accelerate/<engine>.yaml run.py ...`` picks the engine; the training loop
(``alignment/training.py``) is written once against :class:`Engine` and the engines differ in four places only:

========================  =====================================  ==============================================
                          DDP (and a single process), FSDP       DeepSpeed ZeRO 1/2/3
========================  =====================================  ==============================================
accumulate without sync   ``accelerator.no_sync`` (DDP, FSDP2)   ``set_gradient_accumulation_boundary(False)``
backward                  ``accelerator.backward``               ``engine.backward(scale_wrt_gas=False)``, and
                                                                 ``engine.step()`` on the last micro-batch
optimiser step            clip, then ``optimizer.step()``        done by the engine (clipping at
                                                                 ``trainer.max_grad_norm``); norm read back
the trained weights       DDP: in the policy already             ZeRO 1/2: in the policy already
                          FSDP: gathered from the shards         ZeRO-3: gathered from the partitions
========================  =====================================  ==============================================

The loop scales every loss itself (sum over the global batch / its size, x world size), so the engines never
rescale by their accumulation steps: all of them then make the single-process update on the same global batch.

**Weight-sharding engines (FSDP, ZeRO-3) train a copy.** They rewrite the module they are given in place
(parameters become shards) and there is no public way back, while the rest of a run needs the whole policy on
rank 0 (sampling, log-probabilities, evaluation). So they shard a deep copy, and at the end the trained weights
(only those that require gradients: the LoRA adapter) are gathered into the policy and the copy is dropped.
That holds a second copy of the policy on each device until the engine has sharded it; since rank 0 samples
with the whole model anyway, these engines save training memory (gradients, optimiser state, weights during
the step) but do not raise the largest model one device must hold. For LoRA, DDP or ZeRO-2 is the usual
choice (``conf/accelerate/``).

Mixed precision from the accelerate config is refused: the policy's own dtype (``model.dtype``) is the
precision, as it is for π_ref's cached log-probabilities the loss compares against.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from alignment import distributed

__all__ = ["Engine", "start"]

DATA_PARALLEL, FSDP, DEEPSPEED = "ddp", "fsdp", "deepspeed"


@dataclass
class Engine:
    """A policy prepared for training by ``accelerate`` under one engine.

    ``model`` is what the loss calls (the prepared wrapper), ``optimizer`` the torch optimiser over the
    trained module's parameters (what the scheduler and checkpoints see), ``policy`` the module the caller
    passed in, which holds the trained weights after :meth:`finish`.
    """

    kind: str
    accelerator: Any
    policy: nn.Module
    trainee: nn.Module  # the module the engine trains: ``policy`` itself, or a copy for FSDP and ZeRO-3
    model: nn.Module
    optimizer: torch.optim.Optimizer
    prepared_optimizer: Any
    max_grad_norm: float

    @property
    def shards_weights(self) -> bool:
        return _shards_weights(self.kind, self.accelerator)

    @property
    def saves_checkpoints(self) -> bool:
        """Whether the loop's own checkpoints (the trainee's trainable weights and the torch optimiser's state)
        describe the training: not when the engine shards the optimiser state or the weights."""
        return self.kind == DATA_PARALLEL

    def zero_grad(self) -> None:
        self.prepared_optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: gradients are reduced across ranks on the last only."""
        if self.kind == DEEPSPEED:
            self.model.set_gradient_accumulation_boundary(last)
            yield
        elif last:
            yield
        else:
            with self.accelerator.no_sync(self.model):
                yield

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        if self.kind == DEEPSPEED:
            self.model.backward(loss, scale_wrt_gas=False)
            if last:
                self.model.step()  # clip, step, zero the gradients
        else:
            self.accelerator.backward(loss)

    def step(self) -> float:
        """End the optimiser step (after the last micro-batch's backward); returns the pre-clipping grad norm."""
        if self.kind == DEEPSPEED:
            return float(self.model.get_global_grad_norm())
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.prepared_optimizer.step()
        return float(norm)

    def sync_policy(self) -> None:
        """Bring ``policy`` up to date with the training (every rank must call it: under FSDP and ZeRO-3 the
        trained weights are gathered from the shards; otherwise the engine trains the policy itself)."""
        if self.shards_weights:
            trained = self._gather_trainable()
            with torch.no_grad():
                for name, value in trained.items():
                    self.policy.get_parameter(name).copy_(value)

    def finish(self) -> None:
        """Leave the trained weights in ``policy`` (every rank) and release the engine: its hooks, buffers and
        wrappers, so that the next training wraps the policy afresh."""
        self.sync_policy()
        # Drop our references first: free_memory releases accelerate's, and DeepSpeed's engine is destroyed.
        self.model = self.prepared_optimizer = self.trainee = None  # type: ignore[assignment]
        self.accelerator.free_memory()

    def _gather_trainable(self) -> dict[str, torch.Tensor]:
        """The full values of the trainee's trainable parameters, by name, on every rank."""
        if self.kind == FSDP:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                               ignore_frozen_params=True))
            return {name: value.full_tensor() if hasattr(value, "full_tensor") else value
                    for name, value in state.items()}
        import deepspeed

        named = [(name, p) for name, p in self.trainee.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {name: p.detach().clone() for name, p in named}


def _shards_weights(kind: str, accelerator: Any) -> bool:
    """FSDP and ZeRO-3 rewrite the trained module into shards (see the module docstring)."""
    return kind == FSDP or (kind == DEEPSPEED and int(accelerator.state.deepspeed_plugin.zero_stage) == 3)


def start(policy: nn.Module, *, lr: float, weight_decay: float, max_grad_norm: float, micro_batch: int,
          grad_accum: int) -> Engine:
    """Prepare ``policy`` for training under the engine of this launch (AdamW over its trainable parameters).

    ``micro_batch`` is the number of pairs one micro-batch holds over all ranks, ``grad_accum`` the number
    of micro-batches per optimiser step: DeepSpeed's batch bookkeeping is filled from them.
    """
    from accelerate import Accelerator

    dist = distributed.current()
    device = next(policy.parameters()).device
    accelerator = Accelerator(cpu=distributed.accelerate_cpu(device.type))
    kind = {"FSDP": FSDP, "DEEPSPEED": DEEPSPEED}.get(accelerator.distributed_type.name, DATA_PARALLEL)
    if accelerator.distributed_type.name == "MEGATRON_LM":
        raise NotImplementedError("accelerate config: distributed_type MEGATRON_LM is not supported; use DDP, FSDP "
                                  "or DeepSpeed (conf/accelerate/)")
    if accelerator.mixed_precision != "no":
        raise ValueError(f"accelerate config: mixed_precision {accelerator.mixed_precision!r}; set it to 'no'. The "
                         "policy's dtype (model.dtype, e.g. bf16) is the training precision, as it is for the cached "
                         "π_ref log-probabilities the loss compares against")
    if kind == DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        per_rank = -(-micro_batch // dist.world_size)
        # The loop owns accumulation and scaling; these only keep DeepSpeed's own batch arithmetic consistent.
        ds.update({"train_micro_batch_size_per_gpu": per_rank, "gradient_accumulation_steps": grad_accum,
                   "train_batch_size": per_rank * grad_accum * dist.world_size, "gradient_clipping": max_grad_norm})
        # Else ZeRO-3 replaces torch.nn.functional.linear process-wide and for good (its "memory efficient
        # linear"), also under everything rank 0 computes after the training.
        ds.setdefault("zero_optimization", {})["memory_efficient_linear"] = False
    trainee = copy.deepcopy(policy) if _shards_weights(kind, accelerator) else policy
    trainee.train()
    params = [p for p in trainee.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model, prepared_optimizer = accelerator.prepare(trainee, optimizer)
    return Engine(kind=kind, accelerator=accelerator, policy=policy, trainee=trainee, model=model,
                  optimizer=optimizer, prepared_optimizer=prepared_optimizer, max_grad_norm=max_grad_norm)
