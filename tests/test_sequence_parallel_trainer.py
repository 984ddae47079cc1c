"""Sequence parallelism in the trainer: 2 and 4 gloo processes sharing each packed row (P = 2, P = 4, and
2 data-parallel groups of 2) give the metrics and weights of 1 process on the same global batch, for every
loss type at both importance-sampling levels; their checkpoints resume in 1 process and the other way round.

Rows are sampled per row seed (the same completion whichever rank draws it) and cut to ragged lengths, so
the packed rows hold several segments of different lengths and a rank's slice may hold no completion token.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from grpo_fast.trainer import TrainConfig, Trainer, demo
from grpo_fast.trainer.distributed import Layout
from grpo_fast.trainer.reporting import read_metrics
from grpo_fast.trainer.sequence import SequenceSlice

from .spawn import spawn
from .test_distributed_trainer import TIMING, RaggedRowTrainer, _final_weights
from .test_distributed_trainer import config as distributed_config
from .test_trainer import one_thread  # noqa: F401 - autouse fixture

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")


def config(run_dir: Path, **overrides) -> TrainConfig:
    """The multi-process trainer tests' config, 3 steps on padding-free rows under FSDP2."""
    return distributed_config(
        run_dir, **{"max_steps": 3, "padding_free": True, "parallelism": "fsdp", **overrides}
    )


def _cases() -> dict[str, dict]:
    """Every loss type at both importance-sampling levels, each with other options that change the loss's
    inputs: old log-probs (2 updates a batch), a reference, micro-batches, token-budget passes, entropy."""
    cases = {}
    for i, loss_type in enumerate(LOSS_TYPES):
        for level in ("token", "sequence"):
            # beta 0 (not the demo's 0.04) unless a reference is wanted: skip_zero_advantage then skips.
            options = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.0)
            if i % 2 == 0:
                options.update(num_iterations=2, beta=0.04)
            if i % 4 == 1:
                options.update(gradient_accumulation_steps=2, entropy_coef=0.05)
            if i % 4 == 2:  # backward recomputes the forwards: Ulysses attention must still be on
                options.update(gradient_checkpointing=True)
            if i % 4 == 3:
                options.update(max_tokens_per_microbatch=10)
            cases[f"{loss_type}-{level}"] = options
    # The entropy threshold: a quantile over the micro-batch's tokens, which the group's ranks hold in parts.
    cases["entropy-quantile"] = dict(top_entropy_quantile=0.5, gradient_accumulation_steps=2)
    return cases


CASES = _cases()
NAMES = [f"{t}-{level}" for t in LOSS_TYPES for level in ("token", "sequence")]
# Runs per layout, (sequence_parallel_size, processes, case names): every loss type in each layout, each
# importance-sampling level of it in one of them at least; one run replicates the model with DDP.
LAYOUTS = {
    "sp2": (2, 2, NAMES[0::2] + ["entropy-quantile"]),  # one data-parallel group: the quantile is exact
    "sp4": (4, 4, NAMES[1::2]),
    "dp2xsp2": (2, 4, [n for i, n in enumerate(NAMES) if i % 4 in (0, 3)]),
    "sp2-ddp": (2, 2, ["grpo-sequence"]),
}


def _runs(layouts: list[str]) -> list[tuple[str, dict]]:
    runs = []
    for layout in layouts:
        size, _, names = LAYOUTS[layout]
        extra = dict(parallelism="ddp") if layout.endswith("ddp") else {}
        runs += [(f"{layout}/{n}", dict(CASES[n], sequence_parallel_size=size, **extra)) for n in names]
    return runs


def _worker(rank: int, world: int, init_file: str, root: str, runs: list[tuple[str, dict]]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, options in runs:
            trainer = RaggedRowTrainer(config(Path(root) / name, **options))
            assert trainer.sp is not None and trainer.sp.world == options["sequence_parallel_size"]
            assert trainer.sharded == (options.get("parallelism") != "ddp")
            trainer.train()
        if world == 2:
            _resume(Path(root))
        _refusals(Path(root), world)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _resume(root: Path) -> None:
    """P=2: 2 steps, then resume a 2-step run of 1 process to step 3."""
    options = dict(CASES["dapo-token"], sequence_parallel_size=2)
    RaggedRowTrainer(config(root / "cut", max_steps=2, **options)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a resume that changes options may say so; not what this checks
        assert RaggedRowTrainer(config(root / "from_one", **options)).train(resume=True).steps == 3


def _refusals(root: Path, world: int) -> None:
    """What the processes refuse: a size that does not divide them, a model that cannot be split."""
    with pytest.raises(ValueError, match=f"must divide the number of processes, {world}"):
        Trainer(config(root / "refused", sequence_parallel_size=3))
    tokenizer = demo.build_tokenizer()
    model = demo.build_model(tokenizer)
    if world == 2:
        model.config.layer_types = ["full_attention", "sliding_attention"]
        refused, match = 2, "sliding_attention"
    else:
        model.config.num_attention_heads, model.config.num_key_value_heads = 2, 1
        refused, match = 4, "must divide the attention heads"
    with pytest.raises(ValueError, match=match):
        Trainer(config(root / "refused", sequence_parallel_size=refused), model=model, tokenizer=tokenizer)


def _assert_rows_close(got: list[dict], want: list[dict], what: str) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want], what
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys(), what
        for key in w.keys() - TIMING:
            expected = pytest.approx(w[key], rel=1e-5, abs=1e-7, nan_ok=True)
            assert g[key] == expected, (what, g["step"], key, g[key], w[key])


def _one_process(root: Path, name: str) -> Path:
    run_dir = root / "one" / name
    if not run_dir.exists():
        RaggedRowTrainer(config(run_dir, **CASES[name])).train()
    return run_dir


def _compare(root: Path, layouts: list[str]) -> None:
    for layout in layouts:
        for name in LAYOUTS[layout][2]:
            one, run_dir, what = _one_process(root, name), root / "multi" / layout / name, f"{layout} {name}"
            got, want = read_metrics(run_dir / "metrics.jsonl"), read_metrics(one / "metrics.jsonl")
            assert len(got) == 3 and all(math.isfinite(r["loss"]) for r in got), what
            _assert_rows_close(got, want, what)
            weights, ref = _final_weights(run_dir), _final_weights(one)
            assert weights.keys() == ref.keys(), what
            for key in ref:
                # A key bias's exact gradient is 0 (a softmax ignores a shift shared by all keys): Adam
                # divides its rounding noise by its own size, so its steps are noise up to the learning rate.
                atol = 1e-3 if key.endswith("k_proj.bias") else 2e-5
                torch.testing.assert_close(weights[key], ref[key], rtol=1e-4, atol=atol, msg=f"{what}: {key}")


def test_two_processes_match_one_and_resume_across_sizes(tmp_path):
    """P=2 (FSDP2 and DDP) against one process; a P=2 checkpoint resumes in one process and a one-process
    checkpoint with P=2: step 3 is that of a 3-step run."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    options = CASES["dapo-token"]
    RaggedRowTrainer(config(tmp_path / "multi" / "from_one", max_steps=2, **options)).train()
    layouts = ["sp2", "sp2-ddp"]
    spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path / "multi"), _runs(layouts)), nprocs=2)
    _compare(tmp_path, layouts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert RaggedRowTrainer(config(tmp_path / "multi" / "cut", **options)).train(resume=True).steps == 3
    want = read_metrics(_one_process(tmp_path, "dapo-token") / "metrics.jsonl")
    for name in ("cut", "from_one"):
        _assert_rows_close(read_metrics(tmp_path / "multi" / name / "metrics.jsonl"), want, f"resume {name}")


def test_four_processes_match_one(tmp_path):
    """P=4, and 2 data-parallel groups of P=2, against one process."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    layouts = ["sp4", "dp2xsp2"]
    spawn(_worker, args=(4, str(tmp_path / "rendezvous"), str(tmp_path / "multi"), _runs(layouts)), nprocs=4)
    _compare(tmp_path, layouts)


def test_slice_scores_each_completion_token_once():
    """Every completion token is scored by exactly one rank, from the same predicting state as the whole
    packed row's; the slices are the packed row, padded to a multiple of P."""
    from grpo_fast.integrations.packing import Packing

    prompt_ids = torch.tensor([[7, 5, 6], [0, 8, 9], [0, 0, 4]])
    completion_ids = torch.tensor([[11, 12, 0], [13, 0, 0], [14, 0, 0]])
    packing = Packing.build(
        prompt_ids, (prompt_ids != 0).long(), completion_ids, (completion_ids != 0).long(), one_row=False
    )
    rows, width = packing.input_ids.shape
    assert rows == 2  # several segments per row
    states = torch.arange(rows * width, dtype=torch.float32).view(rows, width, 1)  # a state's own index
    tokens = zip(packing.seq_ids.tolist(), packing.cols.tolist(), strict=True)
    want = dict(zip(tokens, packing.hidden(states)[:, 0].tolist(), strict=True))
    for size in (2, 3, 4, 5):
        slices = [SequenceSlice.of(packing, size, r) for r in range(size)]
        local = -(-width // size)
        assert all(s.input_ids.shape == s.position_ids.shape == (rows, local) for s in slices)
        assert torch.equal(torch.cat([s.input_ids for s in slices], 1)[:, :width], packing.input_ids)
        assert torch.equal(torch.cat([s.position_ids for s in slices], 1)[:, :width], packing.position_ids)
        padded = torch.nn.functional.pad(states, (0, 0, 0, local * size - width), value=-1.0)
        got = {}
        for r, s in enumerate(slices):
            values = s.hidden(padded[:, r * local : (r + 1) * local])[:, 0].tolist()
            got.update(zip(zip(s.seq_ids.tolist(), s.cols.tolist(), strict=True), values, strict=True))
        assert sum(len(s.seq_ids) for s in slices) == len(want) and got == want, size


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="needs padding_free"):
        config(tmp_path, padding_free=False, sequence_parallel_size=2)
    with pytest.raises(ValueError, match="sequence_parallel_size must be >= 1"):
        config(tmp_path, sequence_parallel_size=0)
    with pytest.raises(ValueError, match="must divide the number of processes, 1"):
        Trainer(config(tmp_path, sequence_parallel_size=2))


def test_layout_refines_each_group_piece():
    """2 data-parallel groups of 2: each group's piece of a micro-batch, split again between its ranks."""
    layout = Layout.build(10, 2, world=2, rank=1)
    assert [p.tolist() for p in layout.pieces[0]] == [[0, 1, 2], [3, 4]]
    sampled = layout.refine(2, 1)
    assert sampled.rank == 3 and sampled.world == 4
    assert sampled.local.tolist() == [4, 9] and layout.local.tolist() == [3, 4, 8, 9]
    assert sampled.counts() == [4, 2, 2, 2] and layout.refine(1, 0) is layout
    assert Layout.build(8, 2, world=1, rank=0).refine(4, 0).local.tolist() == [0, 4]
    with pytest.raises(ValueError, match="fewer than 4 completions"):
        Layout.build(6, 2, world=1, rank=0).refine(4, 0)
