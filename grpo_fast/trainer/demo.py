"""The built-in demo: a tiny Qwen2 model, a word-level tokenizer and a task it learns from scratch.

Nothing is downloaded.

The task: a prompt such as ``"copy 3"`` or ``"say 7"`` names a digit; the answer is that digit and
then end-of-sequence. The reward (in [0, 1]) gives 0.7 for starting with the right digit and 0.3
for stopping right after one symbol. A random model scores ~0.05; the default run (300 steps,
~30 s on 2 CPU cores) ends near 0.7-0.95.
"""

from __future__ import annotations

import random
from typing import Any

# Imports nothing of the trainer: config, data and models import this module.
DEMO = "demo"  # model/dataset name of the built-in demo (no downloads)

SPECIALS = ["<pad>", "<eos>", "<unk>"]
SYMBOLS = list("0123456789")  # what prompts name; letters are in the vocabulary as distractors only
VERBS = ["copy", "say", "repeat", "echo", "write"]
VOCAB = SPECIALS + SYMBOLS + list("abcdefghijklmnopqrstuvwxyz") + VERBS

# Values of TrainConfig that `grpo-fast train` uses for the demo unless set explicitly.
DEMO_PRESET: dict[str, Any] = {
    "dataset": DEMO,
    "rewards": ["grpo_fast.trainer.demo:reward"],
    "output_dir": "runs/demo",
    "num_threads": 1,  # its matrices are so small that more threads only add synchronisation
    "num_generations": 8,
    "prompts_per_step": 8,
    "max_completion_length": 4,
    "learning_rate": 3e-3,
    "warmup_steps": 10,
    "max_steps": 300,
    "beta": 0.04,
    "save_every": 100,
    "print_completions_every": 100,
}


def build_tokenizer() -> Any:
    """A word-level tokenizer over the task's words, left-padding, with <pad> and <eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=32,
    )
    # Saved beside a Qwen2 config, AutoTokenizer would rebuild the folder as a byte-level BPE
    # Qwen2Tokenizer ("say" -> s, a, y); an auto_map entry naming this class (transformers' own, no
    # remote code) makes it load tokenizer.json as written. Checkpoints save it the same way.
    tokenizer.init_kwargs["auto_map"] = {"AutoTokenizer": [None, type(tokenizer).__name__]}
    return tokenizer


def build_model(tokenizer: Any, seed: int = 0, hidden_size: int = 64, num_layers: int = 2) -> Any:
    """A randomly initialised Qwen2ForCausalLM sized for the task (tied embeddings, like small Qwen2s)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng():  # a fixed init that does not disturb the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def make_rows(n: int = 512, seed: int = 0) -> list[dict[str, str]]:
    """Task rows ``{"prompt": "say 7", "answer": "7"}``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        symbol = rng.choice(SYMBOLS)
        rows.append({"prompt": f"{rng.choice(VERBS)} {symbol}", "answer": symbol})
    return rows


def reward(prompts: list[str], completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
    """0.7 for starting with the named digit, 0.3 for stopping right after one symbol."""
    scores = []
    for completion, want in zip(completions, answer, strict=True):
        words = completion.split()
        scores.append(0.7 * (bool(words) and words[0] == want) + 0.3 * (len(words) == 1))
    return scores


def save_pretrained(path: str, seed: int = 0) -> None:
    """Write the demo model and tokenizer as a normal HF model directory (used by tests and examples)."""
    tokenizer = build_tokenizer()
    build_model(tokenizer, seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
