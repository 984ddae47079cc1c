"""Loading the policy: the built-in demo, a local HF model directory, or a hub id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import demo

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def load_model_and_tokenizer(name: str, seed: int = 0) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` in fp32 on the CPU; the tokenizer always has a pad token."""
    if name == demo.DEMO:
        tokenizer = demo.build_tokenizer()
        return demo.build_model(tokenizer, seed=seed), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name)
    if path.exists():
        _check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except OSError as err:
        where = "directory" if path.exists() else "hub id (no local directory of that name)"
        raise ValueError(f"could not load model {name!r} as a {where}: {err}") from err
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token  # left padding is masked out, any id will do
    return model, tokenizer


def _check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise ValueError(f"--model {str(path)!r} is a file; pass the model's directory (with config.json)")
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model directory {str(path)!r} has no config.json; is it a Hugging Face model directory?"
        )
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        raise ValueError(
            f"model directory {str(path)!r} has a config.json but no weights "
            "(model.safetensors or pytorch_model.bin); save them with model.save_pretrained(...)"
        )


def disable_dropout(model: nn.Module) -> None:
    """RL ratios compare log-probs of the same tokens across passes: dropout would make them noise."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of the decoder layers (non-reentrant: works with frozen inputs)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
