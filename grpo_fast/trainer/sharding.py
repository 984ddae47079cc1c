"""FSDP2 for the trainer (``parallelism: fsdp``): parameters, gradients and AdamW state sharded over ranks.

``torch.distributed.fsdp.fully_shard`` is applied to every decoder layer and then to the model itself.
Parameters become ``Shard(0)`` DTensors; a layer's are all-gathered for its forward and its backward
only. The root group holds the embeddings, the final norm and the LM head (one tensor when tied).
The trainer reaches the backbone through ``model(..., grpo_fast_hidden=True)``, so the root's
forward hook gathers that group; ``grpo_loss`` then reads the gathered head weight directly, and FSDP
reduce-scatters its gradient with the rest at the end of backward. The root group is gathered once
per optimizer update (once per step with ``num_iterations`` 1): sampling's first forward gathers it,
and it stays gathered through the no-grad log-prob passes and every micro-batch until the update's
last backward (:func:`keep_head_gathered`). Gradients are reduce-scattered after every micro-batch
(no unsharded accumulation), averaged over ranks as DDP does.

Sampling runs ``generate(..., synced_gpus=True)``: a rank whose completions have all ended keeps
stepping (on dummy tokens) until every rank is done, because each forward is a collective.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..integrations.hf import unwrap


def is_sharded(model: nn.Module) -> bool:
    """True for a model ``fully_shard`` was applied to."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one: transformers names their class in ``_no_split_modules``."""
    names = set(getattr(unwrap(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"parallelism 'fsdp' cannot find the decoder layers of {type(unwrap(model)).__name__}: "
            "it shards the modules named in the model's _no_split_modules (a transformers attribute); "
            "use parallelism 'ddp' for this model"
        )
    return layers


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model`` in place over the default process group (every rank calls this)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def keep_head_gathered(model: nn.Module, keep: bool) -> None:
    """Whether the root group (embeddings, final norm, LM head) stays gathered after this backward.

    Kept between the micro-batches of one update, the head is gathered once per update (by sampling,
    whose forward gathers it first) instead of once per micro-batch; it must be resharded by the
    update's last backward, since the optimizer steps the shards and a stale gathered copy would
    otherwise be reused. Gradients are reduce-scattered after every backward either way.
    """
    model.set_reshard_after_backward(not keep, recurse=False)


def release(model: nn.Module) -> None:
    """Free the gathered root group of a sharded model that runs no backward (the reference model):
    FSDP keeps the root gathered after its forward, expecting a backward to reshard it."""
    if is_sharded(model):
        model.reshard()


def full_value(x: Tensor) -> Tensor:
    """A DTensor's global value (a collective: every rank calls it); other tensors as they are."""
    full_tensor = getattr(x, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else x


__all__ = ["decoder_layers", "full_value", "is_sharded", "keep_head_gathered", "release", "shard"]
