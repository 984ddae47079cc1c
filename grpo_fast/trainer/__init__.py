"""A thin, readable GRPO trainer for Hugging Face causal LMs, on grpo_fast's fused loss.

    from grpo_fast.trainer import TrainConfig, Trainer
    Trainer(TrainConfig(model="Qwen/Qwen2.5-0.5B", dataset="prompts.jsonl",
                        rewards=["my_rewards:correct"], learning_rate=1e-6)).train()

``grpo-fast train`` is the same from the command line; with no arguments it runs the built-in demo.
"""

from .config import TrainConfig
from .loop import Trainer, TrainResult, train
from .rewards import RewardError

__all__ = ["RewardError", "TrainConfig", "TrainResult", "Trainer", "train"]
