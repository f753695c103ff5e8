"""The worlds an experiment runs in, each an implementation of ``World`` (alignment/worlds/base.py).

- ``tabular``: reward and safety tables over listed candidates; everything exact, seconds to run.
- ``toy``: a seeded synthetic safety world of templated text and a tiny Llama π_ref built by SFT.
- ``language``: causal LMs with LoRA and text scorers (the toy world's model, SmolLM2, 7B models).

``build_world`` is where the config's groups are unpacked into the values a world needs.
"""

from __future__ import annotations

from alignment.config import Config
from alignment.store import ArtifactStore
from alignment.worlds.base import Rollouts, World

__all__ = ["Rollouts", "World", "build_world"]


def build_world(cfg: Config, store: ArtifactStore | None = None) -> World:
    """The world of ``cfg``'s dataset, model and scorer groups (checked to fit by ``config.check_world``)."""
    if cfg.dataset.kind == "tabular":
        from alignment.worlds.tabular import TabularWorld

        return TabularWorld(cfg.dataset, cfg.scorer, cfg.sampling, cfg.eval, seed=cfg.seed)
    from alignment.worlds.language import LanguageWorld

    if store is None:
        raise ValueError("a language-model world needs an artifact store (its samples, scores and adapters)")
    return LanguageWorld(cfg.dataset, cfg.model, cfg.scorer, cfg.sampling, cfg.eval, seed=cfg.seed,
                         cache_dir=cfg.cache_dir, store=store)
