"""PKU-SafeRLHF preference records: loading, validation, preference pairs and prompt-disjoint splits.

Each record holds one prompt, two responses and two independent human judgements: which response is more helpful
(``better_response_id``) and which is safer (``safer_response_id``), plus a per-response safety flag. The paper
uses the helpfulness pairs for the reward side and the safety pairs for the safety constraint (PeCAN), so both
pair lists are derived from the same records. Other dataset fields (harm categories, severity, sources, hashes)
are ignored.

Sources: a local ``.jsonl`` (one record per line) or ``.json`` (a list of records) file, or anything
``datasets.load_dataset`` accepts (a hub id such as ``PKU-Alignment/PKU-SafeRLHF-30K``, or a local dataset
directory). Validation is strict and errors name the line (or row) and field, because a silently mis-parsed id
flips a preference. Local files are UTF-8 (a leading byte-order mark, as some Windows editors write, is accepted);
an undecodable byte, an empty file or a split a dataset folder does not have is an error naming the file (and
line) and the fix, never an empty record list that fails much later.
"""

from __future__ import annotations

import json
import math
import random
import re
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


_BOM = b"\xef\xbb\xbf"


def _decode_error(path: Path, lineno: int, line: bytes, err: UnicodeDecodeError) -> ValueError:
    """A ``ValueError`` for a non-UTF-8 byte: file, line, byte and the fix (the codec's own message names only a
    position in whatever chunk it was decoding). ``err`` positions are relative to ``line``."""
    bad = line[err.start : err.end].hex(" ")
    return ValueError(
        f"{path} line {lineno}: byte {err.start + 1} of the line (0x{bad}) is not valid UTF-8 ({err.reason}). "
        "PKU-SafeRLHF files are UTF-8; re-encode this one from the encoding it was saved in, e.g. "
        f"`iconv -f cp1252 -t utf-8 {path} > fixed{path.suffix}`, or re-export it as UTF-8."
    )


def _empty_error(path: Path, what: str) -> ValueError:
    return ValueError(
        f"{path}: no records ({what}). Point the source at a PKU-SafeRLHF file with one JSON record per line "
        "(.jsonl) or a JSON list of records (.json); was the download or export interrupted?"
    )


def _iter_local(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, raw record)`` from a local .jsonl or .json file; blank jsonl lines are skipped.

    Bytes are decoded line by line (not by the text layer in 8 KiB chunks), so a non-UTF-8 byte is reported with
    its physical line; a UTF-8 byte-order mark at the start is dropped, as ``utf-8-sig`` does.
    """
    if path.suffix == ".json":
        body = path.read_bytes().removeprefix(_BOM)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as err:
            # Whole-file positions -> the physical line and the byte within it.
            line_start = body.rfind(b"\n", 0, err.start) + 1
            line_end = body.find(b"\n", err.start)
            line = body[line_start : None if line_end < 0 else line_end]
            in_line = UnicodeDecodeError(
                "utf-8", line, err.start - line_start, err.end - line_start, err.reason
            )
            raise _decode_error(path, body.count(b"\n", 0, err.start) + 1, line, in_line) from err
        if not text.strip():
            raise _empty_error(path, "the file is empty")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from err
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json source must hold a list of records, got {type(data).__name__}")
        if not data:
            raise _empty_error(path, "the JSON list is empty")
        for index, raw in enumerate(data):
            yield f"{path} record {index + 1}", raw
        return
    n_records = 0
    with path.open("rb") as handle:
        for lineno, line_bytes in enumerate(handle, start=1):
            if lineno == 1:
                line_bytes = line_bytes.removeprefix(_BOM)
            try:
                line = line_bytes.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _decode_error(path, lineno, line_bytes, err) from err
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err})") from err
            n_records += 1
            yield where, raw
    if n_records == 0:
        raise _empty_error(path, "the file is empty or holds only blank lines")


def _split_names(split: str) -> list[str]:
    """Split names in a ``datasets`` split expression: ``"train[:10%]+test"`` -> ``["train", "test"]``."""
    return [part.split("[", 1)[0].strip() for part in re.split(r"\+", split)]


def _folder_data_files(folder: Path) -> dict[str, list[Path]] | None:
    """``{split: data files}`` that ``datasets`` finds in a local dataset folder (from file names / README),
    resolved without reading any data. ``None`` when ``datasets`` cannot make sense of the folder;
    ``load_dataset`` then reports why.
    """
    try:
        import datasets

        builder = datasets.load_dataset_builder(str(folder))
        return {
            str(name): [Path(f) for f in files] for name, files in (builder.config.data_files or {}).items()
        }
    except Exception:  # no data files, bad README...: left to load_dataset's own message
        return None


def _is_blank_file(path: Path) -> bool:
    """Empty, or (for a small file) only whitespace and a BOM; big files are not read here."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    return size == 0 or (size <= 1024 and not path.read_bytes().removeprefix(_BOM).strip())


def _iter_folder(folder: Path, split: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, raw record)`` from a local dataset folder's ``split``, which must exist in it.

    Checked before ``datasets`` runs because its own errors mislead here: an unknown split is only reported after
    every split has been converted, and an empty data file fails with a bare ``StopIteration``.
    """
    data_files = _folder_data_files(folder)
    if data_files is not None:
        names = [name for name in _split_names(split) if name != "all"]
        unknown = [name for name in names if name not in data_files]
        if unknown:
            raise ValueError(
                f"PKU-SafeRLHF dataset folder {str(folder)!r} has no split {unknown[0]!r}; its splits are "
                f"{list(data_files)}. Pass one of them as the split (dataset.train_split / dataset.test_split), or "
                "name the data files after the split (e.g. train.jsonl, test.jsonl)."
            )
        for name in names:
            for file in data_files[name]:
                if _is_blank_file(file):
                    raise _empty_error(file, f"the data file of split {name!r} is empty")
    yield from _iter_hub(str(folder), split, local=True)


def _iter_hub(source: str, split: str, *, local: bool = False) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, raw record)`` from ``datasets.load_dataset(source, split=split)``.

    ``local``: ``source`` is an existing dataset folder, so the error must not blame the hub.
    """
    try:
        import datasets

        dataset = datasets.load_dataset(source, split=split)
    except Exception as err:  # offline / unknown id / missing split all land here
        if local:
            raise ValueError(
                f"Could not load the PKU-SafeRLHF dataset folder {source!r} (split {split!r}) with "
                f"datasets.load_dataset: {type(err).__name__}: {err}. The folder needs data files datasets "
                "recognises (e.g. train.jsonl and test.jsonl, or data/train-*.parquet); or pass a single .jsonl file."
            ) from err
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
    Raises ``ValueError`` naming the line / row and field for a malformed record, the file and line for a
    non-UTF-8 byte, the file for an empty one, the existing splits for a split a local folder lacks, and
    ``FileNotFoundError`` for a missing file or an unavailable hub dataset.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    path = Path(source).expanduser()
    rows: Iterable[tuple[str, Any]]
    if path.is_file():
        rows = _iter_local(path)
    elif path.is_dir():
        rows = _iter_folder(path, split)
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
    if not records:  # local files say so themselves; this is an empty split of a folder or hub dataset
        raise ValueError(
            f"PKU-SafeRLHF source {str(source)!r} split {split!r} holds no records; check the split name and "
            "that its data files are not empty."
        )
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
