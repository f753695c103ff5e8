"""Shared test setup: everything runs offline and quietly, with W&B in offline mode."""

from __future__ import annotations

import os

# Without these a hub lookup retries for ~23 s before failing; tests never touch the network.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
