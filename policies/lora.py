"""LoRA adapters: the learner trains them with peft; engines apply them merged into their weights.

The learner wraps its model with ``peft.get_peft_model`` (``wrap``): only the adapter's ``lora_A``
/ ``lora_B`` matrices require gradients, so the optimizer holds only them. What it publishes each
step is the adapter in peft's own format (``save_adapter``: ``adapter_config.json`` +
``adapter_model.safetensors``), the directory SGLang's ``/load_lora_adapter`` and
``peft.PeftModel.from_pretrained`` both load.

The embedded engine applies an adapter by merging it into its weights (``merged_weights``):
W = W_base + scaling * B @ A on each targeted linear layer, from the base weights it keeps.
Merged, not applied per request: an engine serves one policy at a time, and merged weights
give exactly the logits of the base model with the adapter (the same product peft's
``merge_and_unload`` computes) at no per-token cost. SGLang applies it per request instead
(its LoRA kernels), through the same routes.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import torch
from safetensors.torch import load_file, save_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's prefix on every adapter tensor name


class LoraSpec(msgspec.Struct, frozen=True, kw_only=True):
    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"  # module name suffixes, or peft's "all-linear"


class AdapterError(ValueError):
    """An adapter directory the engine cannot apply exactly (missing files, unsupported options)."""


def wrap(model: torch.nn.Module, spec: LoraSpec) -> torch.nn.Module:
    """``model`` with fresh adapters (B = 0: the wrapped model computes exactly what ``model`` does)."""
    from peft import LoraConfig, get_peft_model  # the [lora] extra; imported only when LoRA is asked for

    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=spec.target_modules, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's saved names."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(model: torch.nn.Module, out_dir: Path) -> Path:
    """Write the adapter in peft's format (what ``PeftModel.from_pretrained`` reads); returns ``out_dir``.
    Written here rather than by ``PeftModel.save_pretrained``, which also writes a model card
    each time: this runs once per step into shared memory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(out_dir / WEIGHTS_FILE))
    model.peft_config["default"].save_pretrained(str(out_dir))
    return out_dir


def load_adapter(model: torch.nn.Module, adapter_dir: Path) -> None:
    """Set the wrapped model's adapter to the one saved in ``adapter_dir`` (a resume)."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_file(str(adapter_dir / WEIGHTS_FILE)))
    if result.unexpected_keys:
        raise AdapterError(f"adapter in {adapter_dir} does not match the model: {result.unexpected_keys[:3]}")


def merged_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The wrapped model's weights with the adapter merged, under the base model's names (an HF
    checkpoint of the policy); the live model is left as it is."""
    base = {_base_name(k): v for k, v in model.state_dict().items() if "lora_" not in k}
    adapter = adapter_state(model)
    config = model.peft_config["default"]
    return base | dict(merged_weights(base, adapter, _scaling(config.lora_alpha, config.r, config.use_rslora)))


def _base_name(peft_name: str) -> str:
    return peft_name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def _scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / rank**0.5 if rslora else alpha / rank


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, torch.Tensor], float]:
    """(tensors, scaling) of a peft LoRA adapter directory; refuses what a plain merge would get wrong."""
    path = Path(adapter_dir)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise AdapterError(f"{path} has no {CONFIG_FILE} and {WEIGHTS_FILE} (a peft LoRA adapter)")
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    for option in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if config.get(option):
            raise AdapterError(f"{path}: {option} is not supported by the engine's merge")
    scaling = _scaling(float(config["lora_alpha"]), int(config["r"]), bool(config.get("use_rslora")))
    return load_file(str(path / WEIGHTS_FILE)), scaling


def merged_weights(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor],
                   scaling: float) -> list[tuple[str, torch.Tensor]]:
    """(name, W_base + scaling * B @ A) for every layer ``adapter`` targets, in ``base``'s dtype.
    ``base``: the model's weights by HF name; ``adapter``: peft's tensors
    (``base_model.model.<module>.lora_A.weight``). Computed in float32, as peft's merge is on CPU."""
    out = []
    for name_a, a in adapter.items():
        if not name_a.endswith(".lora_A.weight"):
            continue
        module = name_a.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        b = adapter.get(name_a.replace(".lora_A.", ".lora_B."))
        target = base.get(module + ".weight")
        if b is None or target is None:
            raise AdapterError(f"adapter layer {module} has no lora_B or no such weight in the model")
        delta = (b.float() @ a.float()) * scaling
        if tuple(delta.shape) != tuple(target.shape):
            raise AdapterError(f"adapter for {module}: {tuple(delta.shape)} vs the weight's {tuple(target.shape)}")
        out.append((module + ".weight", (target.float() + delta.to(target.device)).to(target.dtype)))
    if not out:
        raise AdapterError("the adapter has no lora_A/lora_B pairs")
    return out


def sync_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the adapter, bytes of the full weights): what one sync sends with LoRA, and what it
    would send without (each tensor once: tied weights count once), both as the model holds them."""
    params = {id(p): (n, p) for n, p in model.named_parameters()}.values()
    adapter = sum(p.numel() * p.element_size() for n, p in params if "lora_" in n)
    full = sum(p.numel() * p.element_size() for n, p in params if "lora_" not in n)
    return adapter, full


def save_checkpoint(model: torch.nn.Module, out_dir: Path) -> None:
    """A resumable LoRA policy: ``model/`` the merged policy as an HF directory (transformers
    loads it; an RL run can start from it), ``adapter/`` the adapter in peft's format, and
    ``base/`` the frozen weights it adapts (peft loads ``adapter/`` onto it)."""
    hf = model.get_base_model()
    base = {_base_name(k): v for k, v in model.state_dict().items() if "lora_" not in k}
    hf.save_pretrained(out_dir / "base", state_dict=base)
    hf.save_pretrained(out_dir / "model", state_dict=merged_state(model))
    save_adapter(model, out_dir / "adapter")


def sglang_flags(spec: LoraSpec) -> dict[str, str | bool | int]:
    """What SGLang must be launched with to load this run's adapters at runtime: LoRA on, room
    for the rank, and every module it supports ("all": a superset of any adapter's targets)."""
    return {"enable-lora": True, "max-lora-rank": spec.rank, "lora-target-modules": "all"}
