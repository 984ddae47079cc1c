"""Prompts -> G sampled completions each, with ``model.generate``, and the masks the loss needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .data import Prompt


@dataclass
class Rollout:
    """N = prompts * G sampled completions, prompts repeated G times in a row."""

    prompt_ids: Tensor  # [N, P] left-padded
    prompt_mask: Tensor  # [N, P]
    completion_ids: Tensor  # [N, L]
    completion_mask: Tensor  # [N, L], 1 up to and including the first EOS
    truncated: Tensor  # [N] bool: no EOS within max_completion_length
    completions: list[Any]  # decoded text (chat prompts: [{"role": "assistant", "content": text}])

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def rows(self, index: Tensor) -> Rollout:
        """The sub-batch of the given rows (a micro-batch)."""
        pick = [self.completions[i] for i in index.tolist()]
        return Rollout(
            self.prompt_ids[index],
            self.prompt_mask[index],
            self.completion_ids[index],
            self.completion_mask[index],
            self.truncated[index],
            pick,
        )


def prompt_text(tokenizer: Any, prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the dataset has chat-message prompts but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def context_length(model: nn.Module) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None)


def encode_prompts(
    tokenizer: Any,
    texts: list[str],
    places: list[str],
    *,
    context: int | None,
    max_completion_length: int,
) -> tuple[Tensor, Tensor]:
    """Left-padded ``(ids, mask)``; a prompt leaving no room for the completion is an error naming its
    place (``PromptDataset.where``: ``"d.jsonl, line 3"``)."""
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    lengths = enc["attention_mask"].sum(1).tolist()
    for text, length, where in zip(texts, lengths, places, strict=True):
        if length == 0:
            raise ValueError(f"{where}: the prompt {text[:60]!r} encodes to no tokens")
        if context is not None and length + max_completion_length > context:
            raise ValueError(
                f"{where}: the prompt is {length} tokens; with max_completion_length="
                f"{max_completion_length} that exceeds the model's context of {context} tokens "
                "(max_position_embeddings). Shorten or drop the prompt, or lower max_completion_length."
            )
    return enc["input_ids"], enc["attention_mask"]


def eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    ids.discard(None)
    if not ids:
        raise ValueError("the tokenizer has no eos_token and the model's generation_config no eos_token_id")
    return sorted(ids)


def completion_mask(completion_ids: Tensor, eos_ids: list[int]) -> tuple[Tensor, Tensor]:
    """``(mask, truncated)``: tokens up to and including the first EOS; rows without an EOS are truncated."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    has_eos = is_eos.any(dim=1)
    length = completion_ids.shape[1]
    first = torch.where(
        has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, length, dtype=torch.long)
    )
    positions = torch.arange(length, device=completion_ids.device).unsqueeze(0)
    return (positions <= first.unsqueeze(1)).long(), ~has_eos


@torch.no_grad()
def sample(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_completion_length: int,
    temperature: float,
    top_p: float,
    top_k: int,
    repetition_penalty: float = 1.0,
    conversational: bool = False,
    synced: bool = False,
) -> Rollout:
    """One completion per row of prompt_ids (rows already repeated G times).

    Every sampling setting is passed explicitly, so none comes from the model's generation_config
    (instruct models often ship top_k/top_p/repetition_penalty there). ``synced``: the model is
    sharded over ranks (each forward a collective), so every rank steps until all have finished.
    """
    eos_ids = eos_token_ids(model, tokenizer)
    was_training = model.training
    model.eval()  # generation never needs dropout or gradient checkpointing
    try:
        out = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            max_new_tokens=max_completion_length,
            eos_token_id=eos_ids,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            synced_gpus=synced,
        )
    finally:
        model.train(was_training)
    completion_ids = out[:, prompt_ids.shape[1] :]
    mask, truncated = completion_mask(completion_ids, eos_ids)
    # Padding after the first EOS is masked; make it the pad id so the batch is tidy.
    completion_ids = completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    lengths = mask.sum(1) - (~truncated).long()  # tokens before the EOS
    texts = tokenizer.batch_decode(
        [ids[:n] for ids, n in zip(completion_ids.tolist(), lengths.tolist(), strict=True)],
        skip_special_tokens=True,
    )
    completions: list[Any] = (
        [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    )
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, truncated, completions)
