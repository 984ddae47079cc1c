"""``TrainConfig``: every knob of the thin trainer, loadable from YAML, with unknown keys rejected by name.

The loss options are not declared here: each field of grpo_fast.GRPOConfig becomes one (name, type,
default, help and choices from the field's metadata), so a new loss option needs no trainer edit.
``LOSS_RENAMES`` and ``LOSS_DEFAULTS`` are the one place where the trainer departs from GRPOConfig.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends import BACKENDS
from ..config import GRPOConfig
from ..engine.validation import device_type
from .demo import DEMO, DEMO_PRESET

SCALE_REWARDS = ("group", "batch", "none")
PARALLELISMS = ("ddp", "fsdp")

# Where a loss option departs from its GRPOConfig field, on purpose.
LOSS_RENAMES = {"epsilon_low": "epsilon"}  # TRL's option name
# (type, default): the trainer samples, so it needs a length (GRPOConfig's None: no dr_grpo normaliser).
LOSS_DEFAULTS: dict[str, tuple[Any, Any]] = {"max_completion_length": (int, 256)}


def loss_fields() -> list[dataclasses.Field]:
    """GRPOConfig's constructor arguments: one trainer option each."""
    return [f for f in dataclasses.fields(GRPOConfig) if f.init]


def option_name(loss_field: str) -> str:
    """The TrainConfig option (YAML key) of a GRPOConfig field."""
    return LOSS_RENAMES.get(loss_field, loss_field)


# Options a resumed run may change: they leave its numbers alone (what is logged and saved, where and
# with how much memory it runs). max_steps may change too (see grpo_fast.trainer.resume); nothing else.
RESUME_FREE = frozenset(
    {
        "progress",
        "print_completions_every",
        "num_completions_to_print",
        "save_every",
        "save_total_limit",
        "max_reward_failures",
        "output_dir",
        "device",
        "num_threads",
        "parallelism",
        "sequence_parallel_size",
        "gradient_checkpointing",
        "offload_activations",
        "max_tokens_per_microbatch",
    }
)


def option_flag(name: str) -> str:
    """The command-line flag of option ``name`` (``learning_rate`` -> ``--learning-rate``)."""
    meta = next((f.metadata for f in dataclasses.fields(TrainConfig) if f.name == name), {})
    return "--" + meta.get("flag", name).replace("_", "-")


CHOICES = {
    "parallelism": PARALLELISMS,
    **{option_name(f.name): tuple(f.metadata["choices"]) for f in loss_fields() if "choices" in f.metadata},
    "scale_rewards": SCALE_REWARDS,
    "backend": BACKENDS,
}


def _opt(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse's name
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _with_loss_options(after: str) -> Callable[[type], type]:
    """Insert one field per GRPOConfig field after the field ``after``; applied before @dataclass."""

    def insert(cls: type) -> type:
        own = dict(cls.__annotations__)
        if after not in own:
            raise TypeError(f"{cls.__name__} has no field {after!r} to put the loss options after")
        hints = typing.get_type_hints(GRPOConfig)
        added: dict[str, Any] = {}
        for f in loss_fields():
            name = option_name(f.name)
            if name in own:
                raise TypeError(f"GRPOConfig.{f.name} clashes with option {name!r}: add it to LOSS_RENAMES")
            tp, default = LOSS_DEFAULTS.get(f.name, (hints[f.name], f.default))
            factory = f.default_factory if default is dataclasses.MISSING else dataclasses.MISSING
            if default is dataclasses.MISSING and factory is dataclasses.MISSING:
                raise TypeError(f"GRPOConfig.{f.name} has no default: give the trainer one in LOSS_DEFAULTS")
            help_text = f.metadata.get("help", f"loss option GRPOConfig.{f.name}")
            setattr(cls, name, field(default=default, default_factory=factory, metadata={"help": help_text}))
            added[name] = tp
        at = list(own).index(after) + 1
        items = list(own.items())
        cls.__annotations__ = dict(items[:at] + list(added.items()) + items[at:])
        return cls

    return insert


@dataclass
@_with_loss_options(after="mask_truncated_completions")
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
    num_threads: int | None = _opt(None, "torch CPU threads (none: torch's choice)")
    parallelism: str = _opt(
        "ddp",
        "several processes (torchrun): 'ddp' keeps a replica per rank; 'fsdp' shards parameters, "
        "gradients and optimizer state (FSDP2). Checkpoints are the same either way",
    )
    sequence_parallel_size: int = _opt(
        1,
        "processes that share each packed row, each forwarding a contiguous 1/P of it (Ulysses attention): "
        "about P times less activation memory per process; needs padding_free, a world size divisible by "
        "P and a model whose attention heads P divides (docs/trainer.md#sequence-parallelism)",
    )

    # Sampling (temperature and max_completion_length are among the loss options below).
    num_generations: int = _opt(8, "completions sampled per prompt (G)")
    prompts_per_step: int = _opt(4, "prompts per step (the step's batch is prompts_per_step * G completions)")
    top_p: float = _opt(1.0, "nucleus sampling threshold")
    top_k: int = _opt(0, "top-k sampling (0: off)")
    repetition_penalty: float = _opt(1.0, "penalty on repeated tokens while sampling (1: none)")
    mask_truncated_completions: bool = _opt(
        False, "leave completions that hit max_completion_length out of the loss"
    )

    # The GRPO objective: _with_loss_options inserts every grpo_fast.GRPOConfig field here (loss_type,
    # epsilon, beta, ...; also temperature and max_completion_length, which sampling uses too).
    scale_rewards: str = _opt("group", "advantage scaling: std of the group, of the batch, or none")
    backend: str = _opt("auto", "grpo_fast backend of the loss and log-probs")
    chunk_size: int | None = _opt(None, "tokens per logits tile (default: chosen by grpo_fast)")
    batch_invariant: bool = _opt(
        False,
        "one GEMM shape for every logits tile: a token's log-prob does not depend on the batch it is scored "
        "in, so the first update's ratios are exactly 1 (metric ratio_not_one)",
    )
    skip_zero_advantage: bool = _opt(
        True,
        "leave completions with advantage 0 (gradient exactly 0 when beta = 0, no entropy bonus, "
        "top_entropy_quantile = 1) out of the policy's forward/backward and the old log-probs: same loss "
        "and gradients; entropy and clip metrics cover the trained tokens (docs/skip-zero-advantage.md)",
    )

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
    offload_activations: bool = _opt(
        False, "keep the backbone's saved activations in host memory until backward (long completions)"
    )
    padding_free: bool = _opt(
        False,
        "run the backbone on each micro-batch's rows packed without padding (position_ids restart per row; "
        "needs sdpa, eager, flex or flash attention); same loss as the padded rows",
    )
    max_tokens_per_microbatch: int | None = _opt(
        None,
        "split each micro-batch into forward/backward passes of at most this many tokens (prompt + "
        "completion, counted padded unless padding_free; a longer row runs alone); the loss is unchanged",
    )
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
            "sequence_parallel_size",
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
        for f in dataclasses.fields(self):  # nan/inf are never an option's value (max_grad_norm nan, ...)
            value = getattr(self, f.name)
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ValueError(f"{f.name} must be finite, got {value!r}")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ValueError(f"output_dir {self.output_dir!r} is a file, not a directory")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(
                f"chunk_size must be >= 1 (or unset: chosen by grpo_fast), got {self.chunk_size}"
            )
        if self.max_tokens_per_microbatch is not None:
            if self.max_tokens_per_microbatch < 1:
                raise ValueError(
                    f"max_tokens_per_microbatch must be >= 1 (or unset), got {self.max_tokens_per_microbatch}"
                )
            if self.top_entropy_quantile < 1.0:
                raise ValueError(
                    "max_tokens_per_microbatch cannot be combined with top_entropy_quantile < 1: the entropy "
                    "threshold is a quantile over the whole micro-batch, which a split pass never sees"
                )
        if self.sequence_parallel_size > 1 and not self.padding_free:
            raise ValueError(
                f"sequence_parallel_size {self.sequence_parallel_size} needs padding_free: true: each "
                "process forwards a slice of the packed rows, whose segments the attention isolates by "
                "position_ids"
            )
        if self.device != "auto" and device_type(self.device) is None:
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        self.loss_config()  # GRPOConfig checks the loss options and names the bad one

    def loss_config(self) -> GRPOConfig:
        """The grpo_fast.GRPOConfig of these options."""
        return GRPOConfig(**{f.name: getattr(self, option_name(f.name)) for f in loss_fields()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a dict, naming any unknown key (with the closest known one)."""
        values = checked_values(values, source)
        if values.get("model", DEMO) == DEMO:
            values = {**DEMO_PRESET, **values}  # the demo's tuned values, unless set explicitly
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        return cls.from_dict({**read_yaml(path), **(overrides or {})}, source=str(path))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The options of a YAML file, as written (not yet checked)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values, got {type(values).__name__}")
    return values


def checked_values(values: Any, source: str) -> dict[str, Any]:
    """``values`` with every key a known option (else the closest one is named) and YAML 1.1's float
    strings read as floats; the values themselves are checked when a TrainConfig is built."""
    if not isinstance(values, dict):
        raise TypeError(f"{source} must be a mapping of option names to values, got {type(values).__name__}")
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            raise ValueError(f"{source}: unknown option {key!r}{hint}")
    return {key: _coerce(key, value) for key, value in values.items()}


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
