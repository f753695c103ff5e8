"""A language-model world's stages (``World``, alignment/worlds/base.py): a causal LM with LoRA, text scorers,
and every expensive artifact (samples, scores, log-probabilities, adapters) cached by content.

The world keeps one flat table of texts (``texts``, whether each ended at EOS, and the token ids the model drew
for it); response ids [N, K] index into it, so the algorithms and the training loop handle ids only and the
responses are read back here (ρ: of the drawn token ids, :meth:`LanguageWorld.response`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from alignment import distributed
from alignment.compute import ComputeMeter
from alignment.config import EvalConfig, HFModelConfig, SamplingConfig, ScorerConfig, TrainerConfig
from alignment.items import items_digest, response_ids
from alignment.losses import preference_labels
from alignment.sampling import Samples
from alignment.store import ArtifactStore, atomic_write_json, content_digest
from alignment.training import Objective, objective_for, train_items
from alignment.worlds.base import TrainingRun
from alignment.worlds.language.evaluation import evaluate_held_out, lmeval_entries
from alignment.worlds.language.model import PolicyModel, TrainedAdapter, resolve_model
from alignment.worlds.language.prompts import load_prompts
from alignment.worlds.language.rollouts import LanguageRollouts


def _complete(rows: list[list[str]]) -> Samples:
    """A dataset's responses [N][J]: complete texts, so each counts as ended (scored with EOS where a scorer
    appends it)."""
    return Samples(rows, [[True] * len(row) for row in rows])


class LanguageWorld:
    """Stages over a causal LM with LoRA: prompts from ``dataset``, the model ``model`` (its LoRA seeded from
    ``seed``), ``scorer``'s reward and safety scorers, ``sampling`` for π_ref's and policies' samples,
    ``evaluation`` for held-out prompts; artifacts in ``store`` (learned scorers' files under ``cache_dir``)."""

    SAMPLES_VERSION = "4"  # 2: top_k disabled (pure π_ref samples); 3: each prompt run once for its K samples;
                           # 4: the generated token ids recorded with the texts
    SCORES_VERSION = "1"
    # Log-probabilities and adapters from before each prompt ran once per group of its responses (policies.
    # prompt_logprob) differ from today's by float rounding only; the versions are bumped so that a warm run
    # gives exactly what a cold one does.
    LOGPROB_VERSION = "3"  # 2: one run of the prompt per group of its responses; 3: samples as their drawn ids
    ADAPTER_VERSION = "5"  # 2: one adapter stage for every training; 3: LoRA initialised from the run seed;
                           # 4: the prompt run once per group of its responses; 5: trained on the drawn ids

    def __init__(self, dataset: Any, model: HFModelConfig, scorer: ScorerConfig, sampling: SamplingConfig,
                 evaluation: EvalConfig, *, seed: int, cache_dir: str, store: ArtifactStore):
        from alignment.sampling import require_backend
        from alignment.scorers import build_scorer

        require_backend(sampling.backend)  # a missing vLLM fails here, before any work
        self.dataset, self.scorer, self.sampling, self.evaluation = dataset, scorer, sampling, evaluation
        self.seed, self.store = seed, store
        self.prompts = load_prompts(dataset, store, max_held_out=evaluation.max_prompts)
        self.model_cfg, self.model_id = resolve_model(model, dataset, self.prompts.toy_world, store)
        self.model = PolicyModel(self.model_cfg, seed)
        self.reward_scorer = build_scorer(scorer.reward, cache_dir)
        self.safety_scorers = [build_scorer(s, cache_dir) for s in scorer.safety]
        self._vllm_sampler: Any = None  # sampling.backend=vllm: the engine, built on first use
        self.texts: list[str] = []  # flat table of generated responses; response ids index into it
        self.ended: list[bool | None] = []  # whether each text ended at EOS (else cut at max_new_tokens)
        self.token_ids: list[tuple[int, ...] | None] = []  # the ids the model drew (None: a dataset's text)
        self.sample_ids: np.ndarray | None = None  # π_ref's samples [N, K], once drawn
        # A scorer that appends EOS to the responses that ended needs to know which did (alignment/scorers.py).
        self._scores_need_ended = any(s.append_eos for s in [self.reward_scorer, *self.safety_scorers])
        self.compute = ComputeMeter()
        self.rollouts = LanguageRollouts(self.prompts.dual, self.model, sampling, self.reward_scorer,
                                         self.safety_scorers, self.compute)

    def _resolved_autocast(self, setting: str) -> str:
        """An autocast setting as it runs on this world's device ("auto" is bf16 on one machine, float32 on
        another), for cache keys."""
        from alignment.sampling import resolve_autocast

        return resolve_autocast(setting, torch.device(distributed.current().device(self.model_cfg.device)))

    @property
    def _temperature_key(self) -> dict[str, float]:
        """The sampling temperature T in the keys of what depends on it (log-probabilities, adapters): π_ref and
        every policy are their logits at T. Absent at T = 1, so entries made before T entered the keys stay valid."""
        t = self.sampling.temperature
        return {} if t == 1.0 else {"temperature": t}

    @property
    def sample_prompts(self) -> list[str]:
        """The dual's prompts: the rows of response ids index into them."""
        return self.prompts.dual

    @property
    def eval_prompts(self) -> list[str]:
        return self.prompts.held_out

    @property
    def prompt_record(self) -> dict[str, Any] | None:
        return self.prompts.record

    @property
    def records(self) -> list[Any] | None:
        """The preference dataset's records (dataset=pku-saferlhf-30k), else None."""
        return self.prompts.records

    @property
    def has_preference_data(self) -> bool:
        return self.prompts.records is not None

    # -- samples, scores, log-probabilities (cached) -------------------------------------------------------

    def generate(self, stage: str, prompts: list[str], num_samples: int, seed: int, *,
                 adapter: TrainedAdapter | None) -> Samples:
        """K samples per prompt from π_ref (``adapter=None``) or from a trained adapter, through the configured
        backend; cached by content."""
        from alignment.sampling import GenerationSpec, autocast, sample_responses

        s = self.sampling
        gen = GenerationSpec(num_samples=num_samples, temperature=s.temperature, top_p=s.top_p,
                             max_new_tokens=s.max_new_tokens, batch_size=s.batch_size)
        spec = {"model": self.model_id, "adapter": adapter and adapter.key, "prompts": content_digest(prompts),
                "gen": asdict(gen), "seed": seed}
        if s.backend != "hf":  # hf keys stay as they were; other engines draw other (equally valid) samples
            spec.update(backend=s.backend, engine_args=dict(s.vllm_engine_args))
        elif s.autocast != "none":  # as it runs here: "auto" is bf16 on one machine and float32 on another
            spec["autocast"] = self._resolved_autocast(s.autocast)
        if self._scores_need_ended:  # entries written before "ended" was recorded lack it: not reused then
            spec["ended"] = True

        def compute(out: Path) -> None:
            if s.backend == "vllm":
                responses = self._vllm().sample(prompts, gen, seed=seed, adapter=adapter and adapter.path)
            else:
                handle = self.model.handle
                with self.model.acting_as(adapter), autocast(s.autocast, handle.device):
                    responses = sample_responses(handle.model, handle.tokenizer, prompts, gen, seed=seed,
                                                 desc=stage)
            atomic_write_json(out / "samples.json", {"prompts": prompts, "responses": responses,
                                                     "ended": responses.ended, "token_ids": responses.token_ids})

        result = self.store.get_or_compute(stage, spec, compute=compute, version=self.SAMPLES_VERSION)
        saved = json.loads((result.path / "samples.json").read_text())
        token_ids = [[tuple(ids) for ids in row] for row in saved["token_ids"]]
        responses = Samples(saved["responses"], saved.get("ended"), token_ids)
        self.compute.add(generated_tokens=self.model.response_tokens(responses, s.max_new_tokens),
                         policy_samples=len(prompts) * num_samples)
        return responses

    def _vllm(self) -> Any:
        """The vLLM engine over the policy's model folder, built on first use (rank 0 only: sampling is)."""
        if self._vllm_sampler is None:
            from alignment.sampling import VLLMSampler

            m = self.model_cfg
            self._vllm_sampler = VLLMSampler(m.name_or_path, self.model.tokenizer,
                                             max_lora_rank=m.lora.r if m.lora else 16,
                                             dtype="auto" if m.dtype == "float32" else m.dtype,
                                             max_model_len=m.max_length,
                                             engine_args=dict(self.sampling.vllm_engine_args))
        return self._vllm_sampler

    def register(self, responses: list[list[str]]) -> np.ndarray:
        """Append texts (and whether each ended and its drawn token ids, from a :class:`Samples`) to the flat
        table; their ids, [N, K]."""
        start = len(self.texts)
        ended = getattr(responses, "ended", None)
        token_ids = getattr(responses, "token_ids", None)
        for i, row in enumerate(responses):
            self.texts.extend(row)
            self.ended.extend(ended[i] if ended is not None else [None] * len(row))
            self.token_ids.extend(token_ids[i] if token_ids is not None else [None] * len(row))
        k = len(responses[0])
        return np.arange(start, len(self.texts)).reshape(len(responses), k)

    def response(self, i: int) -> str | tuple[int, ...]:
        """Response ``i`` as its log-probabilities are taken (alignment.policies.Response): the token ids the
        model drew for a sample; the text (tokenised, + EOS) for a dataset's complete response."""
        ids = self.token_ids[i]
        return self.texts[i] if ids is None else ids

    def sample_reference(self, generator: torch.Generator) -> tuple[np.ndarray, None]:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        responses = self.generate("samples", self.sample_prompts, self.sampling.num_samples, seed, adapter=None)
        self.sample_ids = self.register(responses)
        return self.sample_ids, None

    def score_texts(self, prompts: list[str], responses: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Reward [N, K] and safety [N, K, m] of responses [N][K] (a :class:`Samples` says which ended; a
        scorer with append_eos needs it), cached by the texts, the scorers and, when a scorer appends EOS,
        which responses ended."""
        from alignment.scorers import score_all, scorer_identity

        flat_p = [p for p, row in zip(prompts, responses) for _ in row]
        flat_r = [r for row in responses for r in row]
        ended = getattr(responses, "ended", None)
        flat_e = None if ended is None else [bool(e) if e is not None else None for row in ended for e in row]
        spec = {"texts": content_digest([flat_p, flat_r]), "reward": scorer_identity(self.scorer.reward),
                "safety": [scorer_identity(s) for s in self.scorer.safety]}
        if self._scores_need_ended:
            if flat_e is None or None in flat_e:
                raise ValueError("a scorer appends EOS to the responses that ended (append_eos), but these "
                                 "responses do not say which ended")
            spec["ended"] = content_digest(flat_e)  # absent otherwise, so caches of scorers without EOS stay valid

        def compute(out: Path) -> None:
            reward, safety = score_all(self.reward_scorer, self.safety_scorers, flat_p, flat_r, flat_e)
            np.savez(out / "scores.npz", reward=reward, safety=safety)

        result = self.store.get_or_compute("scores", spec, compute=compute, version=self.SCORES_VERSION)
        self.compute.add(scorer_calls=len(flat_r))
        data = np.load(result.path / "scores.npz")
        n, k = len(responses), len(responses[0])
        return data["reward"].reshape(n, k), data["safety"].reshape(n, k, -1)

    def score(self, responses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reward [N, K] and safety [N, K, m] of response ids [N, K] of the dual's prompts (cached)."""
        texts = Samples([[self.texts[i] for i in row] for row in responses],
                        [[self.ended[i] for i in row] for row in responses])
        return self.score_texts(self.sample_prompts, texts)

    def sequence_logprob(self, policy: TrainedAdapter | None, prompts: list[str], responses: list[Any]
                         ) -> torch.Tensor:
        """log π(y|x) of a trained policy (``None``: π_ref) for each (prompt, response), cached by content."""
        from alignment.policies import LOGPROB_BATCH, sequence_logprob

        spec = {"model": self.model_id, "texts": content_digest([prompts, responses]),
                "max_length": self.model_cfg.max_length, **self._temperature_key}
        if policy is not None:
            spec["adapter"] = policy.key

        def compute(out: Path) -> None:
            handle = self.model.handle
            with self.model.acting_as(policy):
                lp = sequence_logprob(handle.model, handle.tokenizer, prompts, responses,
                                      max_length=self.model_cfg.max_length, temperature=self.sampling.temperature)
            np.save(out / "logprob.npy", lp.numpy())

        stage = "ref_logprob" if policy is None else "policy_logprob"
        result = self.store.get_or_compute(stage, spec, compute=compute, version=self.LOGPROB_VERSION)
        self.compute.add(forward_tokens=self.model.token_count(prompts, responses, batch_size=LOGPROB_BATCH))
        return torch.as_tensor(np.load(result.path / "logprob.npy"))

    def _flat(self, responses: np.ndarray, rows: np.ndarray | None = None) -> tuple[list[str], list[Any]]:
        """Each response of ``responses`` [N, K] (or of its ``rows``) with its prompt, flat."""
        rows = range(len(responses)) if rows is None else rows
        return ([self.sample_prompts[x] for x in rows for _ in responses[x]],
                [self.response(i) for x in rows for i in responses[x]])

    def reference_logprob(self, responses: np.ndarray) -> np.ndarray:
        """log π_ref(y|x) of the dual's responses [N, K] (cached)."""
        return self.sequence_logprob(None, *self._flat(responses)).numpy().reshape(responses.shape)

    def logratio(self, policy: TrainedAdapter, responses: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """log π(y|x) - log π_ref(y|x) of the dual's responses [N, K] (PeCAN's implicit rewards, up to β); with
        ``rows``, of those prompts' only, [len(rows), K] (π_ref's from the one cached pass over all of them)."""
        rows = np.arange(len(responses)) if rows is None else np.asarray(rows)
        logp = self.sequence_logprob(policy, *self._flat(responses, rows)).numpy().reshape(len(rows), -1)
        return logp - self.reference_logprob(responses)[rows]

    def policy_scores(self, policy: TrainedAdapter, num_samples: int, generator: torch.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Per-prompt mean reward [N] and safety [N, m] of ``num_samples`` fresh samples of a trained policy on
        the dual's prompts (primal-dual's constraint estimate; cached by the adapter)."""
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        responses = self.generate("policy_samples", self.sample_prompts, num_samples, seed, adapter=policy)
        reward, safety = self.score_texts(self.sample_prompts, responses)
        return reward.mean(axis=1), safety.mean(axis=1)

    # -- the dataset's own pairs (PKU-SafeRLHF) ------------------------------------------------------------

    def _dataset_records(self) -> tuple[list[Any], dict[str, int]]:
        if self.records is None:
            raise ValueError("algorithm.pair_source=dataset needs a preference dataset (dataset=pku-saferlhf-30k)")
        index = {p: i for i, p in enumerate(self.sample_prompts)}
        return [r for r in self.records if r.prompt in index], index

    def dataset_pairs(self, lam: np.ndarray, labels: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The dataset's own response pairs of the dual's prompts (the paper's MoCAN code on PKU-SafeRLHF-30K),
        scored by the configured scorers and labelled by σ(r_λ(y1) - r_λ(y0))."""
        records, index = self._dataset_records()
        responses = _complete([[r.response_0, r.response_1] for r in records])
        ids = torch.as_tensor(self.register(responses))
        reward, safety = self.score_texts([r.prompt for r in records], responses)
        composite = torch.as_tensor(reward + safety @ lam)
        label = preference_labels(composite[:, 1], composite[:, 0], mode=labels, generator=generator)
        prompts = torch.tensor([index[r.prompt] for r in records])
        return {"prompt": prompts, "y1": ids[:, 1], "y0": ids[:, 0], "label": label}

    def dataset_preferences(self, objective: str) -> dict[str, torch.Tensor]:
        """The dataset's own preference pairs of the dual's prompts with hard labels: y1 is the better
        (``helpful``) or the safer (``safe``) response (PKU-SafeRLHF's better/safer ids)."""
        records, index = self._dataset_records()
        chosen = [r.better_response_id if objective == "helpful" else r.safer_response_id for r in records]
        ids = torch.as_tensor(self.register(_complete([[r.response(1 - c), r.response(c)]
                                                       for r, c in zip(records, chosen)])))
        return {"prompt": torch.tensor([index[r.prompt] for r in records]), "y1": ids[:, 1], "y0": ids[:, 0],
                "label": torch.ones(len(records), dtype=torch.float64)}

    # -- training ------------------------------------------------------------------------------------------

    def _objective(self, items: dict[str, torch.Tensor], objective: str, beta: float, anchor: float,
                   share_prompt: bool = True, autocast: str = "none") -> Objective:
        """The training loop's objective; π_ref log-probabilities of every response in ``items`` (pairs or
        lists) come from the cache (computed once, adapter disabled)."""
        from alignment.policies import prompt_logprob, shares_prompt
        from alignment.sampling import autocast as autocast_context

        all_ids = response_ids(items)
        used = torch.unique(all_ids)
        ref = torch.full((len(self.texts),), float("nan"), dtype=torch.float64)
        samples = torch.as_tensor(self.sample_ids)
        if bool(torch.isin(used, samples.flatten()).all()):
            # Pairs of π_ref samples: one cached pass over all samples serves every training on them (MoCAN,
            # PeCAN's three runs, each primal-dual step) instead of one pass per subset of used responses.
            ref[samples.flatten()] = torch.as_tensor(self.reference_logprob(self.sample_ids)).flatten()
        else:
            prompt_of = {}
            for x, row in zip(items["prompt"].tolist(), all_ids.tolist()):
                prompt_of.update(dict.fromkeys(row, x))
            order = sorted(used.tolist(), key=lambda i: (prompt_of[i], i))  # a prompt's responses together
            ref[order] = self.sequence_logprob(None, [self.sample_prompts[prompt_of[i]] for i in order],
                                               [self.response(i) for i in order])
        tokenizer, max_length = self.model.tokenizer, self.model_cfg.max_length
        share = shares_prompt(share_prompt)

        def rho(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            ys = response_ids(batch)  # [B, J]
            b, j = ys.shape
            ids = ys.flatten()
            prompts = [self.sample_prompts[int(x)] for x in batch["prompt"] for _ in range(j)]
            # Each distinct prompt of the batch run once for its responses (two forwards), or one flat forward.
            with autocast_context(autocast, next(model.parameters()).device):
                logp, tokens = prompt_logprob(model, tokenizer, prompts, [self.response(int(i)) for i in ids],
                                              max_length=max_length, share_prompt=share,
                                              temperature=self.sampling.temperature)
            self.compute.add(forward_tokens=tokens, backward_tokens=tokens if torch.is_grad_enabled() else 0)
            return (logp.double() - ref[ids].to(logp.device)).reshape(b, j)

        return objective_for(objective, rho, beta, anchor)

    def trained(self, spec: dict[str, Any], run: TrainingRun) -> tuple[TrainedAdapter, dict[str, Any]]:
        """A LoRA adapter trained from π_ref by ``run(model, work_dir) -> info``, cached by ``spec`` (plus the
        model, LoRA settings and seed). The adapter carries the compute its training spent, so a cache hit
        reports the same ``compute/*`` as the run that made it.

        ``work_dir`` (``<cache_dir>/checkpoints/<key>``) holds the training's checkpoints; a checkpoint carries
        the compute and losses so far, so a run resumed after a kill reports what an uninterrupted one would.
        The store deletes the folder once the adapter is published: it is useless then, and a leftover would
        otherwise be resumed from if the adapter were ever found corrupt and recomputed."""
        full = {"model": self.model_id, "lora": asdict(self.model_cfg.lora), "seed": self.seed,
                **self._temperature_key, **spec}
        key = self.store.key("adapter", full, version=self.ADAPTER_VERSION)
        work = self.store.root / "checkpoints" / key

        def compute(out: Path) -> None:
            model = self.model.handle.model
            self.model.reset()
            before = self.compute.snapshot()
            info = run(model, work)
            self._count_all_ranks(before)
            model.save_pretrained(str(out))
            self.model.active = key
            atomic_write_json(out / "train.json", {**info, "compute": self.compute.since(before)})

        # Collective: under a distributed launch every rank trains (its share of each batch); rank 0 publishes.
        result = self.store.get_or_compute("adapter", full, compute=compute, version=self.ADAPTER_VERSION,
                                           collective=True, work=work)
        saved = json.loads((result.path / "train.json").read_text())
        adapter = TrainedAdapter(result.key, result.path)
        if result.hit:
            self.compute.add(**saved["compute"])
            self.model.activate(adapter)
        self.model.handle.model.eval()
        info = {k: v for k, v in saved.items() if k not in ("history", "compute")}
        return adapter, {**info, "train/cached": result.hit, "train/adapter": str(result.path)}

    def _count_all_ranks(self, before: dict[str, int]) -> None:
        """After a collective training: the work every rank did since ``before`` (each counted its own share of
        the batches and rollouts) becomes this rank's count, so a run reports the same compute on any number of
        processes. ``training_runs`` counts trainings, not ranks, and is kept."""
        spent = {name: n for name, n in self.compute.since(before).items() if name != "training_runs"}
        totals = distributed.current().sum_counts(spent)
        self.compute.add(**{name: totals[name] - n for name, n in spent.items()})

    def train(self, items: dict[str, torch.Tensor], *, trainer: TrainerConfig, beta: float, log: Any,
              progress: bool, objective: str = "pairwise", anchor: float = 0.0) -> tuple[TrainedAdapter, dict[str, Any]]:
        """The one stage-2 loop with LoRA on labelled pairs (or lists), from π_ref, with coefficient ``beta``;
        the adapter is keyed by the texts, the items and their labels or targets, the objective, β, the trainer
        config and the seed, so reruns and sweeps reuse it."""
        used = sorted(set(response_ids(items).flatten().tolist()))
        spec = {"texts": content_digest([self.sample_prompts, [self.response(i) for i in used]]),
                "pairs": items_digest(items),
                "beta": beta, "trainer": {**asdict(trainer), "autocast": self._resolved_autocast(trainer.autocast)},
                # (absent for pairs, so that adapters trained before the key existed stay valid)
                **({"objective": objective} if objective != "pairwise" else {}),
                **({"anchor": anchor} if anchor else {})}

        def run(model: nn.Module, work: Path) -> dict[str, Any]:
            objective_fn = self._objective(items, objective, beta, anchor, trainer.share_prompt, trainer.autocast)
            result = train_items(model, items, objective_fn, cfg=trainer, seed=self.seed, log=log, progress=progress,
                                 checkpoint_dir=work if trainer.checkpoint_every else None,
                                 meter=self.compute)  # checkpoints carry the compute spent before them
            self.compute.add(training_runs=1)
            return {"train/final_loss": result.final_loss, "train/steps": result.steps, "history": result.history}

        return self.trained(spec, run)

    def online_policy(self, spec: dict[str, Any], run: TrainingRun) -> tuple[TrainedAdapter, dict[str, Any]]:
        return self.trained({"online": spec, "prompts": content_digest(self.sample_prompts)}, run)

    # -- evaluation ----------------------------------------------------------------------------------------

    def evaluate(self, policy: TrainedAdapter | None, lam: np.ndarray | None, beta: float, rng: np.random.Generator,
                 tracker: Any) -> dict[str, Any]:
        """Held-out prompts (alignment/worlds/language/evaluation.py); ``lam`` and ``beta`` are not used: the
        target π_λ has no closed form over free text."""
        held_out = evaluate_held_out(self, self.model, self.eval_prompts, self.evaluation, policy, rng, tracker)
        lmeval = lmeval_entries(self.model, self.model_id, self.prompts, self.evaluation, self.dataset.seed,
                                self.store, policy)
        return {**lmeval, **held_out}  # lm-eval after the samples, its keys first
