"""PKU-SafeRLHF preference records: loading, validation, preference pairs and prompt-disjoint splits.

Each record holds one prompt, two responses and two independent human judgements: which response is more helpful
(``better_response_id``) and which is safer (``safer_response_id``), plus a per-response safety flag. The paper
uses the helpfulness pairs for the reward side and the safety pairs for the safety constraint (PeCAN), so both
pair lists are derived from the same records. Other dataset fields (harm categories, severity, sources, hashes)
are ignored.

Sources: a local ``.jsonl`` (one record per line) or ``.json`` (a list of records) file, or anything
``datasets.load_dataset`` accepts (a hub id such as ``PKU-Alignment/PKU-SafeRLHF-30K``, or a local dataset
directory). Validation is strict and errors name the line (or row) and field, because a silently mis-parsed id
flips a preference.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "PreferenceRecord",
    "helpful_pairs",
    "load_pku_saferlhf",
    "safe_pairs",
    "split_records",
]

_TEXT_FIELDS = ("prompt", "response_0", "response_1")
_ID_FIELDS = ("better_response_id", "safer_response_id")
_FLAG_FIELDS = ("is_response_0_safe", "is_response_1_safe")
REQUIRED_FIELDS = _TEXT_FIELDS + _ID_FIELDS + _FLAG_FIELDS


@dataclass(frozen=True)
class PreferenceRecord:
    """One PKU-SafeRLHF comparison. Ids are 0 or 1 and index ``response_0`` / ``response_1``."""

    prompt: str
    response_0: str
    response_1: str
    better_response_id: int
    safer_response_id: int
    is_response_0_safe: bool
    is_response_1_safe: bool

    def response(self, index: int) -> str:
        """``response_0`` or ``response_1``."""
        if index not in (0, 1):
            raise ValueError(f"response index must be 0 or 1, got {index!r}")
        return self.response_0 if index == 0 else self.response_1


def _parse_record(raw: Any, where: str) -> PreferenceRecord:
    """Validate one raw mapping; ``where`` (e.g. ``"data.jsonl line 3"``) prefixes every error message."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in raw:
            raise ValueError(f"{where}: missing field {field!r}")
    for field in _TEXT_FIELDS:
        if not isinstance(raw[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {type(raw[field]).__name__}")
    for field in _ID_FIELDS:
        value = raw[field]
        # bool is a subclass of int: reject it, a true/false id means the columns were mixed up.
        if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1):
            raise ValueError(f"{where}: field {field!r} must be 0 or 1, got {value!r}")
    for field in _FLAG_FIELDS:
        if not isinstance(raw[field], bool):
            raise ValueError(f"{where}: field {field!r} must be true or false, got {raw[field]!r}")
    return PreferenceRecord(**{field: raw[field] for field in REQUIRED_FIELDS})


def _iter_local(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, raw record)`` from a local .jsonl or .json file; blank jsonl lines are skipped."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from err
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json source must hold a list of records, got {type(data).__name__}")
        for index, raw in enumerate(data):
            yield f"{path} record {index + 1}", raw
        return
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err})") from err
            yield where, raw


def _iter_hub(source: str, split: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, raw record)`` from ``datasets.load_dataset(source, split=split)``."""
    try:
        import datasets

        dataset = datasets.load_dataset(source, split=split)
    except Exception as err:  # offline / unknown id / missing split all land here
        raise FileNotFoundError(
            f"Could not load PKU-SafeRLHF source {source!r} (split {split!r}) with datasets.load_dataset: {err}. "
            "It is not an existing local path, and the hub is unreachable offline unless the dataset is cached. "
            f"Download it first (e.g. `huggingface-cli download --repo-type dataset {source} --local-dir <dir>`) "
            "or pass a local .jsonl file."
        ) from err
    for index, raw in enumerate(dataset):
        yield f"{source}[{split}] row {index + 1}", raw


def load_pku_saferlhf(
    source: str | Path, *, split: str = "train", limit: int | None = None
) -> list[PreferenceRecord]:
    """Load and validate PKU-SafeRLHF records, in source order.

    ``source``: a local ``.jsonl`` / ``.json`` file, a local dataset directory, or a hub id (only tried when
    ``source`` is not an existing path). ``split`` is used for directories and hub ids (a single file is one
    split). ``limit`` keeps the first ``limit`` records (and stops reading there).
    Raises ``ValueError`` naming the line / row and field for a malformed record, ``FileNotFoundError`` for a
    missing file or an unavailable hub dataset.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    path = Path(source).expanduser()
    rows: Iterable[tuple[str, Any]]
    if path.is_file():
        rows = _iter_local(path)
    elif path.is_dir():
        rows = _iter_hub(str(path), split)
    elif path.suffix in (".jsonl", ".json") or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"PKU-SafeRLHF file {str(source)!r} does not exist.")
    else:
        rows = _iter_hub(str(source), split)

    records: list[PreferenceRecord] = []
    if limit == 0:
        return records
    for where, raw in rows:
        records.append(_parse_record(raw, where))
        if limit is not None and len(records) >= limit:
            break
    return records


def helpful_pairs(records: Iterable[PreferenceRecord]) -> list[tuple[str, str, str]]:
    """``(prompt, chosen, rejected)`` per record, chosen = the more helpful response (``better_response_id``)."""
    return [
        (r.prompt, r.response(r.better_response_id), r.response(1 - r.better_response_id)) for r in records
    ]


def safe_pairs(records: Iterable[PreferenceRecord]) -> list[tuple[str, str, str]]:
    """``(prompt, chosen, rejected)`` per record, chosen = the safer response (``safer_response_id``)."""
    return [(r.prompt, r.response(r.safer_response_id), r.response(1 - r.safer_response_id)) for r in records]


def split_records(
    records: Sequence[PreferenceRecord], fractions: Mapping[str, float], seed: int
) -> dict[str, list[PreferenceRecord]]:
    """Split records into named parts by unique prompt, so no prompt appears in two parts.

    ``fractions`` maps part name -> fraction of unique prompts (non-negative, summing to 1); part sizes are the
    rounded cumulative fractions, so they add up exactly. The assignment depends only on the set of prompts and
    ``seed`` (prompts are sorted before a seeded shuffle), not on record order or Python's hash seed. Within a
    part, records keep their input order. Returns ``{name: records}`` in the order of ``fractions``.
    """
    if not fractions:
        raise ValueError("fractions must name at least one split")
    for name, fraction in fractions.items():
        if not (isinstance(fraction, int | float) and math.isfinite(fraction) and fraction >= 0):
            raise ValueError(f"fraction for split {name!r} must be a finite number >= 0, got {fraction!r}")
    total = math.fsum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {total} ({dict(fractions)})")

    prompts = sorted({r.prompt for r in records})
    random.Random(seed).shuffle(prompts)
    assignment: dict[str, str] = {}
    start, cumulative = 0, 0.0
    names = list(fractions)
    for position, name in enumerate(names):
        cumulative += fractions[name]
        stop = len(prompts) if position == len(names) - 1 else round(cumulative * len(prompts))
        for prompt in prompts[start:stop]:
            assignment[prompt] = name
        start = stop

    parts: dict[str, list[PreferenceRecord]] = {name: [] for name in names}
    for record in records:
        parts[assignment[record.prompt]].append(record)
    return parts
