"""FastGRPOTrainer under accelerate with 2 gloo processes logs what trl.GRPOTrainer logs.

Both run in the same 2 processes (same seed, so the same completions): the loss step must use TRL's
global normaliser (``num_items_in_batch``, all-gathered by TRL, divided by the number of processes)
and TRL's cross-process metric reductions. Ranks rendezvous through a file in tmp_path; accelerate
finds the process group already initialised and uses it.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")  # TRL's trainer needs it; the bare GPU image does not have it

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from grpo_fast.trainer import demo  # noqa: E402

from .spawn import spawn  # noqa: E402
from .test_trl_integration import assert_same_logs, train  # noqa: E402

WORLD = 2
CASES = [
    dict(loss_type="dapo", beta=0.04, num_iterations=2),
    dict(loss_type="grpo", beta=0.0, num_iterations=1, importance_sampling_level="sequence"),
    # the entropy quantile over both processes' tokens; the adaptive controller's window over both
    dict(loss_type="dapo", top_entropy_quantile=0.5, use_adaptive_entropy=True, entropy_target=50.0),
]


def _join(rank: int, init_file: str) -> None:
    # What torchrun / accelerate launch would set; the group itself comes from the file.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)


def _worker(rank: int, init_file: str, model_dir: str, out: str) -> None:
    _join(rank, init_file)
    try:
        from trl import GRPOTrainer

        from grpo_fast.integrations.trl import FastGRPOTrainer

        for i, options in enumerate(CASES):
            # Generation batch: 4 per device * 2 processes * 2 accumulation = 16 = 4 prompts x 4.
            options = dict(max_steps=2, per_device_train_batch_size=4, **options)
            results = [
                train(cls, model_dir, f"{out}/{i}", **options) for cls in (GRPOTrainer, FastGRPOTrainer)
            ]
            assert all(trainer.accelerator.num_processes == WORLD for trainer, _ in results)
            (_, want), (_, got) = results
            assert want[-1]["grad_norm"] > 0
            assert_same_logs(want, got, steps=2, what=str(options))
    finally:
        dist.destroy_process_group()


def spawn_with_model(worker, tmp_path) -> None:
    """``worker(rank, rendezvous file, model dir, out dir)`` on WORLD processes (demo model saved)."""
    model_dir = tmp_path / "model"
    demo.save_pretrained(str(model_dir))
    spawn(worker, args=(str(tmp_path / "rendezvous"), str(model_dir), str(tmp_path / "out")), nprocs=WORLD)


def test_fast_trainer_matches_trl_on_two_processes(tmp_path):
    spawn_with_model(_worker, tmp_path)


def _fsdp_worker(rank: int, init_file: str, model_dir: str, out: str) -> None:
    _join(rank, init_file)
    try:
        from torch.distributed.fsdp import fully_shard

        from .test_trl_integration import _one_batch, both_loss_steps, loss_step_trainer

        trainer = loss_step_trainer(model_dir, out)
        inputs = _one_batch(trainer, seed=7)  # the same batch on both ranks
        inputs["ref_per_token_logps"] = inputs["old_per_token_logps"] - 0.02
        # A ragged batch, scored by TRL's log-prob pass before sharding: after a no-grad pass of
        # TRL's fused head through the FSDP2 model, TRL's own next loss step came out wrong (its embedding
        # gradient off by 0.68 here) while grpo_fast's did not, so TRL's reference would be off.
        from .test_trl_padding_free import ragged_batch

        ragged = ragged_batch(trainer, seed=5)
        for layer in trainer.model.model.layers:
            fully_shard(layer)
        fully_shard(trainer.model)  # the head (tied to the embedding) is now a DTensor, half per rank
        assert type(trainer.model.lm_head.weight).__name__ == "DTensor"
        results = both_loss_steps(trainer, inputs, full=lambda grad: grad.full_tensor())
        (want, want_grads, _), (got, got_grads, _) = results
        assert not trainer._fallback_warned  # the sharded head ran on grpo_fast's path
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert want_grads.keys() == got_grads.keys()
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6)

        # Padding-free through the sharded model: packed rows against TRL's padded step.
        trainer.grpo_fast_padding_free = True
        results = both_loss_steps(trainer, ragged, full=lambda grad: grad.full_tensor())
        (want, want_grads, _), (got, got_grads, _) = results
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_head_runs_on_the_fused_path(tmp_path):
    spawn_with_model(_fsdp_worker, tmp_path)
