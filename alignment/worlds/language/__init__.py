"""The language-model worlds: the toy world's tiny Llama, SmolLM2 on real prompts, a 7B model on PKU-SafeRLHF.

``world`` holds the stages (``LanguageWorld``: cached sampling, scoring, log-probabilities and training),
``prompts`` the dual/held-out split, ``model`` the one LoRA model and its adapters, ``rollouts`` online
sampling for Safe-RLHF's loop, ``evaluation`` held-out gains and lm-eval.
"""

from alignment.worlds.language.model import TrainedAdapter
from alignment.worlds.language.world import LanguageWorld

__all__ = ["LanguageWorld", "TrainedAdapter"]
