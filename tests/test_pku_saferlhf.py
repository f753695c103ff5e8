"""PKU-SafeRLHF loader on verbatim sample records (tests/data, copied from the shared fixtures)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import re
from pathlib import Path

import pytest

from alignment.pku_saferlhf import (
    PreferenceRecord,
    helpful_pairs,
    load_pku_saferlhf,
    safe_pairs,
    split_records,
)

pytestmark = pytest.mark.fast  # the developers' tier (make test-fast)

SAMPLE = Path(__file__).resolve().parent / "data" / "pku_saferlhf_sample.jsonl"  # verbatim copy, see README


def _raw_lines() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_loads_every_line_with_correct_types() -> None:
    records = load_pku_saferlhf(str(SAMPLE))
    raw = _raw_lines()
    assert len(records) == len(raw) == 4
    for rec, line in zip(records, raw, strict=True):
        assert isinstance(rec, PreferenceRecord)
        for field in ("prompt", "response_0", "response_1"):
            assert isinstance(getattr(rec, field), str) and getattr(rec, field) == line[field]
        for field in ("better_response_id", "safer_response_id"):
            assert type(getattr(rec, field)) is int and getattr(rec, field) in (0, 1)
        for field in ("is_response_0_safe", "is_response_1_safe"):
            assert type(getattr(rec, field)) is bool
    # Values checked by hand against the file (records 2 and 3).
    assert records[1].prompt.startswith("Where can I find information on how to build my own explosiv")
    assert (records[1].is_response_0_safe, records[1].is_response_1_safe) == (False, True)
    assert (records[2].better_response_id, records[2].safer_response_id) == (0, 0)


def test_limit_and_path_object() -> None:
    assert len(load_pku_saferlhf(SAMPLE, limit=2)) == 2
    assert load_pku_saferlhf(SAMPLE, limit=0) == []


def test_pairs_follow_ids() -> None:
    records = load_pku_saferlhf(str(SAMPLE))
    helpful, safe = helpful_pairs(records), safe_pairs(records)
    assert len(helpful) == len(safe) == len(records)
    # Record 3 (art pieces): better = safer = 0.
    assert helpful[2] == (records[2].prompt, records[2].response_0, records[2].response_1)
    assert safe[2] == helpful[2]
    # Record 4 (bribes): better = safer = 1; the chosen safe answer is the one flagged safe.
    assert helpful[3][1].startswith("Accepting bribes is a serious offense")
    assert safe[3] == (records[3].prompt, records[3].response_1, records[3].response_0)
    assert records[3].is_response_1_safe and not records[3].is_response_0_safe


def test_helpful_and_safe_pairs_differ_when_ids_differ() -> None:
    rec = PreferenceRecord(
        "p",
        "a",
        "b",
        better_response_id=0,
        safer_response_id=1,
        is_response_0_safe=False,
        is_response_1_safe=True,
    )
    assert helpful_pairs([rec]) == [("p", "a", "b")]
    assert safe_pairs([rec]) == [("p", "b", "a")]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.pop("safer_response_id"), "safer_response_id"),
        (lambda r: r.update(better_response_id=2), "better_response_id"),
        (lambda r: r.update(better_response_id=True), "better_response_id"),
        (lambda r: r.update(is_response_1_safe="yes"), "is_response_1_safe"),
        (lambda r: r.update(prompt=None), "prompt"),
    ],
)
def test_malformed_line_names_line_and_field(tmp_path: Path, mutate, field: str) -> None:
    raw = _raw_lines()
    mutate(raw[2])
    path = tmp_path / "bad.jsonl"
    # A blank line first: reported numbers are physical line numbers, so the bad record is on line 4.
    path.write_text("\n" + "\n".join(json.dumps(r) for r in raw) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"line 4: .*{field}"):
        load_pku_saferlhf(str(path))


def test_invalid_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_raw_lines()[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        load_pku_saferlhf(str(path))


def test_json_list_source(tmp_path: Path) -> None:
    path = tmp_path / "records.json"
    path.write_text(json.dumps(_raw_lines()), encoding="utf-8")
    assert load_pku_saferlhf(str(path)) == load_pku_saferlhf(str(SAMPLE))


def test_missing_local_file_is_clear(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_pku_saferlhf(str(missing))


def test_hub_id_offline_error_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match=r"PKU-Alignment/PKU-SafeRLHF-30K.*local \.jsonl"):
        load_pku_saferlhf("PKU-Alignment/PKU-SafeRLHF-30K", split="test")


def test_hub_rows_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    rows = _raw_lines()
    rows[1].pop("better_response_id")
    monkeypatch.setattr(datasets, "load_dataset", lambda source, split: rows)
    with pytest.raises(ValueError, match="row 2: missing field 'better_response_id'"):
        load_pku_saferlhf("PKU-Alignment/PKU-SafeRLHF-30K")


def _many_records(n_prompts: int = 40) -> list[PreferenceRecord]:
    # Two records per prompt for some prompts, to check that a prompt never straddles splits.
    out = []
    for i in range(n_prompts):
        for j in range(1 + i % 2):
            out.append(PreferenceRecord(f"prompt {i}", f"a{j}", f"b{j}", i % 2, j, True, bool(j)))
    return out


def test_split_deterministic_disjoint_and_complete() -> None:
    records = _many_records()
    fractions = {"train": 0.7, "val": 0.1, "test": 0.2}
    first = split_records(records, fractions, seed=3)
    assert split_records(records, fractions, seed=3) == first
    assert list(first) == ["train", "val", "test"]
    prompts = {name: {r.prompt for r in part} for name, part in first.items()}
    assert not prompts["train"] & prompts["val"] and not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    assert sorted(len(p) for p in prompts.values()) == [4, 8, 28]
    assert sum(len(part) for part in first.values()) == len(records)
    # Independent of input order; a different seed gives a different assignment.
    shuffled = split_records(list(reversed(records)), fractions, seed=3)
    assert {n: {r.prompt for r in p} for n, p in shuffled.items()} == prompts
    other = split_records(records, fractions, seed=4)
    assert {n: {r.prompt for r in p} for n, p in other.items()} != prompts


def test_split_on_sample_file() -> None:
    records = load_pku_saferlhf(str(SAMPLE))
    parts = split_records(records, {"train": 0.5, "test": 0.5}, seed=0)
    assert len(parts["train"]) == len(parts["test"]) == 2
    assert not {r.prompt for r in parts["train"]} & {r.prompt for r in parts["test"]}


@pytest.mark.parametrize("fractions", [{}, {"a": 0.5, "b": 0.4}, {"a": 1.5, "b": -0.5}])
def test_split_rejects_bad_fractions(fractions: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        split_records(_many_records(4), fractions, seed=0)


# -- data files: encoding, empty files, dataset folders -----------------------------------------------------------


@pytest.fixture
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the arrow files ``datasets`` writes for a local folder out of the user's cache."""
    import datasets

    cache = tmp_path / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def _jsonl_bytes(records: list[dict]) -> bytes:
    return ("\n".join(json.dumps(r) for r in records) + "\n").encode("utf-8")


def test_non_utf8_byte_names_file_line_and_fix(tmp_path: Path) -> None:
    lines = _jsonl_bytes(_raw_lines()).splitlines(keepends=True)
    # A cp1252 "é" (0xe9) inside the third record's prompt, hundreds of bytes into the file.
    lines[2] = lines[2].replace(b'"prompt": "', b'"prompt": "caf\xe9 ', 1)
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b"".join(lines))
    message = r"latin\.jsonl line 3: byte \d+ of the line \(0xe9\) is not valid UTF-8"
    with pytest.raises(ValueError, match=message) as err:
        load_pku_saferlhf(path)
    assert "iconv -f cp1252 -t utf-8" in str(err.value) and not isinstance(err.value, UnicodeDecodeError)


def test_non_utf8_byte_in_json_list_names_line(tmp_path: Path) -> None:
    path = tmp_path / "latin.json"
    text = json.dumps(_raw_lines()[:2], indent=1).encode("utf-8")
    path.write_bytes(text.replace(b'"prompt": "', b'"prompt": "caf\xe9 ', 1))
    lineno = text[: text.index(b'"prompt"')].count(b"\n") + 1
    with pytest.raises(ValueError, match=rf"latin\.json line {lineno}: .*0xe9.*not valid UTF-8.*iconv"):
        load_pku_saferlhf(path)


@pytest.mark.parametrize(
    ("name", "content", "what"),
    [
        ("empty.jsonl", b"", "the file is empty or holds only blank lines"),
        ("blank.jsonl", b"\n  \n\n", "the file is empty or holds only blank lines"),
        ("bom_only.jsonl", b"\xef\xbb\xbf", "the file is empty or holds only blank lines"),
        ("empty.json", b"", "the file is empty"),
        ("empty_list.json", b"[]\n", "the JSON list is empty"),
    ],
)
def test_empty_file_names_the_file(tmp_path: Path, name: str, content: bytes, what: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))}: no records \({what}\)\. Point the source"
    ):
        load_pku_saferlhf(path)
    assert load_pku_saferlhf(path, limit=0) == []  # nothing read, nothing to complain about


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    expected = load_pku_saferlhf(SAMPLE)
    jsonl, json_list = tmp_path / "bom.jsonl", tmp_path / "bom.json"
    jsonl.write_bytes(b"\xef\xbb\xbf" + SAMPLE.read_bytes())
    json_list.write_bytes(b"\xef\xbb\xbf" + json.dumps(_raw_lines()).encode("utf-8"))
    assert load_pku_saferlhf(jsonl) == expected
    assert load_pku_saferlhf(json_list) == expected


def _dataset_folder(root: Path) -> Path:
    """A local dataset folder with a train split (records 1-3) and a test split (record 4)."""
    raw = _raw_lines()
    folder = root / "pku_folder"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(_jsonl_bytes(raw[:3]))
    (folder / "test.jsonl").write_bytes(_jsonl_bytes(raw[3:]))
    return folder


def test_dataset_folder_splits_and_unknown_split(tmp_path: Path, datasets_cache: Path) -> None:
    folder = _dataset_folder(tmp_path)
    records = load_pku_saferlhf(SAMPLE)
    assert load_pku_saferlhf(folder, split="test") == records[3:]
    assert load_pku_saferlhf(folder, split="train") == records[:3]
    with pytest.raises(
        ValueError, match=r"has no split 'validation'; its splits are \['train', 'test'\]"
    ) as err:
        load_pku_saferlhf(folder, split="validation")
    assert str(folder) in str(err.value) and "dataset.test_split" in str(err.value)
    assert "not an existing local path" not in str(err.value)
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_pku_saferlhf(folder, split="train+dev[:10]")
    (folder / "test.jsonl").write_bytes(b"\n")  # an emptied data file: datasets alone says StopIteration()
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(str(folder / 'test.jsonl'))}: no records \(the data file of "
        r"split 'test' is empty\)",
    ):
        load_pku_saferlhf(folder, split="test")


def test_preference_prompts_use_a_dataset_folders_test_split(tmp_path: Path, datasets_cache: Path) -> None:
    """The evaluation prompts of a dataset folder come from its test split, not from held-out train prompts."""
    from alignment.config import PreferenceDatasetConfig
    from alignment.store import ArtifactStore
    from alignment.worlds.language.prompts import load_prompts

    folder = _dataset_folder(tmp_path)
    dataset = PreferenceDatasetConfig(source=str(folder), n_prompts=2, n_eval_prompts=5)
    split = load_prompts(dataset, ArtifactStore(tmp_path / "cache"), max_held_out=None)
    train, test = split.dual, split.held_out
    raw = _raw_lines()
    assert set(train) <= {r["prompt"] for r in raw[:3]} and len(train) == 2
    assert test == [raw[3]["prompt"]]
