"""``TrainConfig``: every knob of the thin trainer, loadable from YAML, with unknown keys rejected by name."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, GRPOConfig

DEMO = "demo"  # model/dataset name of the built-in demo (no downloads)
SCALE_REWARDS = ("group", "batch", "none")
BACKENDS = ("auto", "triton", "native", "torch")
PARALLELISMS = ("ddp", "fsdp")
CHOICES = {
    "parallelism": PARALLELISMS,
    "loss_type": LOSS_TYPES,
    "importance_sampling_level": IMPORTANCE_SAMPLING_LEVELS,
    "scale_rewards": SCALE_REWARDS,
    "backend": BACKENDS,
}


def _opt(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse's name
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Options of ``grpo-fast train``; names and defaults follow TRL's GRPOConfig where it has the option."""

    # What to train on.
    model: str = _opt(DEMO, "local HF model directory or hub id; 'demo' builds the tiny built-in model")
    dataset: str | None = _opt(None, "JSONL file, hub dataset id, or 'demo' (the built-in task)")
    dataset_split: str = _opt("train", "split of a hub dataset")
    prompt_column: str = _opt("prompt", "dataset column holding the prompt (text or chat messages)")
    rewards: list[str] = _opt(
        [], "reward functions as importable 'module:function' (repeat the flag)", flag="reward"
    )
    reward_weights: list[float] | None = _opt(None, "one weight per reward function (default: all 1)")
    output_dir: str = _opt("runs/grpo", "run directory: metrics.jsonl, the plot and checkpoints")
    seed: int = _opt(0, "seed of the model init (demo), sampling and data order")
    device: str = _opt(
        "auto", "cpu, cuda, cuda:1, ... (auto: cuda when available; under torchrun cuda is cuda:LOCAL_RANK)"
    )
    num_threads: int | None = _opt(None, "torch CPU threads (default: torch's choice)")
    parallelism: str = _opt(
        "ddp",
        "several processes (torchrun): 'ddp' keeps a replica per rank; 'fsdp' shards parameters, "
        "gradients and optimizer state (FSDP2). Checkpoints are the same either way",
    )

    # Sampling.
    num_generations: int = _opt(8, "completions sampled per prompt (G)")
    prompts_per_step: int = _opt(4, "prompts per step (the step's batch is prompts_per_step * G completions)")
    max_completion_length: int = _opt(256, "most tokens generated per completion")
    temperature: float = _opt(1.0, "sampling temperature (also divides the logits in the loss, as in TRL)")
    top_p: float = _opt(1.0, "nucleus sampling threshold")
    top_k: int = _opt(0, "top-k sampling (0: off)")
    repetition_penalty: float = _opt(1.0, "penalty on repeated tokens while sampling (1: none)")
    mask_truncated_completions: bool = _opt(
        False, "leave completions that hit max_completion_length out of the loss"
    )

    # The GRPO objective (grpo_fast.GRPOConfig).
    loss_type: str = _opt("dapo", "GRPO loss variant (TRL's names)")
    epsilon: float = _opt(0.2, "lower clip epsilon")
    epsilon_high: float | None = _opt(None, "upper clip epsilon (default: epsilon)")
    delta: float | None = _opt(None, "two-sided clipping: cap of the unclipped ratio")
    beta: float = _opt(0.0, "KL coefficient; > 0 keeps a frozen reference model")
    importance_sampling_level: str = _opt("token", "importance ratio per token, or per sequence (GSPO)")
    use_bias_correction_kl: bool = _opt(True, "multiply the KL term by the importance ratio")
    sapo_temperature_pos: float = _opt(1.0, "SAPO temperature for positive advantages")
    sapo_temperature_neg: float = _opt(1.05, "SAPO temperature for negative advantages")
    scale_rewards: str = _opt("group", "advantage scaling: std of the group, of the batch, or none")
    backend: str = _opt("auto", "grpo_fast backend of the loss and log-probs")
    chunk_size: int | None = _opt(None, "tokens per logits tile (default: chosen by grpo_fast)")

    # Optimisation.
    max_steps: int = _opt(
        200, "steps; each step samples one batch and makes num_iterations optimizer updates"
    )
    num_iterations: int = _opt(1, "optimizer updates per sampled batch (mu in the GRPO paper)")
    gradient_accumulation_steps: int = _opt(1, "micro-batches each update is split into")
    learning_rate: float = _opt(1e-6, "peak AdamW learning rate")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon")
    warmup_steps: int = _opt(0, "optimizer updates of linear warm-up before the cosine decay")
    min_lr_ratio: float = _opt(0.0, "floor of the cosine decay, as a fraction of learning_rate")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: no clipping)")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    bf16: bool | None = _opt(None, "bf16 autocast (default: on for CUDA, off on the CPU)")
    freeze_lm_head: bool = _opt(False, "keep the LM head frozen (LoRA-style); tied embeddings freeze with it")

    # Logs and checkpoints.
    print_completions_every: int = _opt(20, "print a few sample completions every N steps (0: never)")
    num_completions_to_print: int = _opt(2, "how many completions to print each time")
    save_every: int = _opt(50, "checkpoint every N steps (0: only at the end)")
    save_total_limit: int = _opt(2, "checkpoints kept in output_dir (oldest removed)")
    max_reward_failures: int = _opt(3, "consecutive steps a reward function may fail before the run stops")
    progress: bool = _opt(True, "show a progress bar")

    def __post_init__(self) -> None:
        _check_types(self)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        positive = (
            "num_generations",
            "prompts_per_step",
            "max_completion_length",
            "max_steps",
            "num_iterations",
            "gradient_accumulation_steps",
            "save_total_limit",
            "max_reward_failures",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        non_negative = (
            "learning_rate",
            "weight_decay",
            "warmup_steps",
            "max_grad_norm",
            "save_every",
            "print_completions_every",
            "num_completions_to_print",
            "top_k",
            "min_lr_ratio",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError(
                "num_generations must be >= 2: advantages compare completions of the same prompt"
            )
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.reward_weights is not None and self.rewards and len(self.reward_weights) != len(self.rewards):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values for {len(self.rewards)} rewards"
            )
        self.loss_config()  # GRPOConfig checks the loss options and names the bad one

    def loss_config(self) -> GRPOConfig:
        """The grpo_fast.GRPOConfig of these options."""
        return GRPOConfig(
            loss_type=self.loss_type,
            epsilon_low=self.epsilon,
            epsilon_high=self.epsilon_high,
            delta=self.delta,
            beta=self.beta,
            importance_sampling_level=self.importance_sampling_level,
            temperature=self.temperature,
            max_completion_length=self.max_completion_length,
            use_bias_correction_kl=self.use_bias_correction_kl,
            sapo_temperature_pos=self.sapo_temperature_pos,
            sapo_temperature_neg=self.sapo_temperature_neg,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a dict, naming any unknown key (with the closest known one)."""
        if not isinstance(values, dict):
            raise TypeError(
                f"{source} must be a mapping of option names to values, got {type(values).__name__}"
            )
        known = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
                raise ValueError(f"{source}: unknown option {key!r}{hint}")
        values = {key: _coerce(key, value) for key, value in values.items()}
        if values.get("model", DEMO) == DEMO:
            from .demo import DEMO_PRESET

            values = {**DEMO_PRESET, **values}  # the demo's tuned values, unless set explicitly
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ValueError(
                f"{path} must hold a mapping of option names to values, got {type(values).__name__}"
            )
        return cls.from_dict({**values, **(overrides or {})}, source=str(path))


def field_types() -> dict[str, Any]:
    """Resolved type of each TrainConfig field (strings under ``from __future__ import annotations``)."""
    return typing.get_type_hints(TrainConfig)


def allowed_types(tp: Any) -> tuple[tuple[type, ...], type | None]:
    """(accepted scalar types, list element type or None) for a field type."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        scalars, elem = allowed_types(inner[0])
        return scalars + (type(None),), elem
    if typing.get_origin(tp) is list:
        return (list,), args[0]
    if tp is float:
        return (float, int), None  # an int is a fine float
    return (tp,), None


def _coerce(name: str, value: Any) -> Any:
    """YAML 1.1 reads ``1e-6`` (no dot) as a string: accept it for float options."""
    scalars, _ = allowed_types(field_types()[name])
    if isinstance(value, str) and float in scalars:
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _check_types(cfg: TrainConfig) -> None:
    for name, tp in field_types().items():
        value = getattr(cfg, name)
        scalars, elem = allowed_types(tp)
        # bool is an int in Python; a YAML `true` for an int option is a mistake, not a 1.
        ok = isinstance(value, scalars) and not (isinstance(value, bool) and bool not in scalars)
        if ok and elem is not None and isinstance(value, list):
            elem_types = (int, float) if elem is float else (elem,)
            ok = all(isinstance(v, elem_types) and not isinstance(v, bool) for v in value)
        if not ok:
            want = " or ".join("None" if t is type(None) else t.__name__ for t in scalars)
            if elem is not None:
                want += f" of {elem.__name__}"
            raise TypeError(f"option {name!r} must be {want}, got {value!r} ({type(value).__name__})")
