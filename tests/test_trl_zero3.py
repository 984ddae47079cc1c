"""FastGRPOTrainer under DeepSpeed ZeRO-3 (2 gloo processes on the CPU): the partitioned LM head is gathered
for the fused loss and log-prob passes, as TRL's fused head gathers it, with no fallback; the logs match
trl.GRPOTrainer's under the same ZeRO-3 set-up. Each process runs TRL's trainer, then ours."""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("deepspeed")

import torch.distributed as dist  # noqa: E402

from .test_trl_distributed import _join, spawn_with_model  # noqa: E402
from .test_trl_integration import assert_same_logs, train  # noqa: E402

ZERO3 = {
    # threshold 0: every parameter partitioned outside its forward (small ones otherwise stay whole)
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
}
CASES = [
    dict(loss_type="dapo", beta=0.04, num_iterations=2),  # old and reference log-prob passes too
    dict(loss_type="grpo", top_entropy_quantile=0.5),  # the entropy pass and the loss pass
]


def _worker(rank: int, init_file: str, model_dir: str, out: str) -> None:
    _join(rank, init_file)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's view of the group _join made

        from trl import GRPOTrainer

        from grpo_fast.integrations.hf import lm_head
        from grpo_fast.integrations.trl import FastGRPOTrainer

        for i, options in enumerate(CASES):
            options = dict(max_steps=2, per_device_train_batch_size=4, **options)
            # (a fresh config each time: transformers fills its "auto" values in place)
            (_, want), (fast, got) = (
                train(cls, model_dir, f"{out}/{i}", deepspeed=copy.deepcopy(ZERO3), **options)
                for cls in (GRPOTrainer, FastGRPOTrainer)
            )
            head = lm_head(fast.accelerator.unwrap_model(fast.model))[0]
            assert hasattr(head, "ds_id") and head.numel() < head.ds_numel  # partitioned outside forward
            assert not fast._fallback_warned
            assert want[-1]["grad_norm"] > 0
            assert_same_logs(want, got, steps=2, what=f"ZeRO-3 {options['loss_type']}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rehearsal of ZeRO-3 (gloo, CPU accelerator)")
def test_zero3_partitioned_head_runs_on_the_fused_path_and_matches_trl(tmp_path):
    spawn_with_model(_worker, tmp_path)
