"""Loading the policy: the built-in demo, a local HF model directory, or a hub id."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
    # Offline, the hub client retries for most of a minute: ask the cache alone, and say why at once.
    offline = None if path.exists() else offline_reason()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline is not None)
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=torch.float32, local_files_only=offline is not None
        )
    except OSError as err:
        if offline is not None:
            raise ValueError(
                f"model {name!r} is not a local directory and this machine is offline ({offline}), "
                "with no copy in the Hugging Face cache: pass a local model directory instead "
                "(--model ./my-model, written by save_pretrained)"
            ) from err
        where = "directory" if path.exists() else "hub id (no local directory of that name)"
        raise ValueError(f"could not load model {name!r} as a {where}: {err}") from err
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token  # left padding is masked out, any id will do
    return model, tokenizer


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def offline_reason(timeout: float = 1.5) -> str | None:
    """Why the Hugging Face hub cannot be reached from here (None if it can), within ``timeout`` seconds:
    HF_HUB_OFFLINE, or a name lookup and TCP connect to the hub (to the HTTPS proxy, if one is set)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host, port = _hub_address(constants.ENDPOINT)
    outcome: dict[str, str | None] = {}

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["error"] = None
        except OSError as err:
            outcome["error"] = err.strerror or str(err)

    thread = threading.Thread(target=probe, daemon=True)  # a name lookup has no timeout of its own
    thread.start()
    thread.join(timeout)
    if "error" not in outcome:
        return f"{host}:{port} does not answer within {timeout:g} s"
    return None if outcome["error"] is None else f"{host}:{port} cannot be reached: {outcome['error']}"


def _hub_address(endpoint: str) -> tuple[str, int]:
    """(host, port) the hub client connects to first: the proxy if one is set, else the endpoint."""
    proxy = next((os.environ[k] for k in PROXY_VARIABLES if os.environ.get(k)), None)
    if proxy and "://" not in proxy:
        proxy = f"http://{proxy}"
    url = urlsplit(proxy or endpoint)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


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
