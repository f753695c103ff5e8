"""What a run prints: its own log lines and progress bars, and none of the libraries' noise a user cannot act on.

Each silenced message is named here with the reason, at its source where the source allows:

- DeepSpeed's "Setting accelerator to CPU. If you have GPU ... unable to detect it" warning, printed whenever
  anything imports deepspeed on a machine without a GPU (accelerate does when it saves or unwraps any model,
  DeepSpeed or not): a CPU run names its accelerator (``DS_ACCELERATOR=cpu``), which is what DeepSpeed asks for.
- transformers' "Loading weights" and "Writing model shards" bars, one per model load or save, dozens per
  run: the run's own bars (sampling, scoring, stage 2, evaluation) say where the time goes.
- fontTools' INFO lines ("glyf subsetted", hundreds per PDF figure), which it logs through the root logger's
  level that Hydra sets to INFO.

peft's FutureWarning about transformers' deprecated ``is_gradient_checkpointing`` is filtered where peft wraps
the model (``alignment/policies.py``). Warnings that do matter (a package that differs from the lock, a
checkpoint that cannot be kept, a margin the dual finds hard) are ours and stay.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["quiet_libraries"]


def quiet_libraries(device: str = "cpu") -> None:
    """Silence the messages above for this process (idempotent; call before the libraries are imported)."""
    if device.split(":")[0] == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("fontTools").setLevel(logging.WARNING)
    # Read by huggingface_hub, and through it by transformers, when they are first imported; a process that
    # imported transformers already (a test session, a notebook) is told directly.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
