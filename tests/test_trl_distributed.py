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

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from grpo_fast.trainer import demo  # noqa: E402

WORLD = 2
CASES = [
    dict(loss_type="dapo", beta=0.04, num_iterations=2),
    dict(loss_type="grpo", beta=0.0, num_iterations=1, importance_sampling_level="sequence"),
]


def correct(prompts, completions, answer, **kwargs):
    return demo.reward(prompts, completions, answer)


def length(completions, **kwargs):  # varies within a group: non-zero advantages from the start
    return [len(c) / 10 for c in completions]


def _train(cls, model_dir: str, out: str, **options) -> list[dict]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    args = GRPOConfig(
        output_dir=out,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        max_steps=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,  # generation batch: 4 * 2 processes * 2 = 16 = 4 prompts x 4
        num_generations=4,
        max_completion_length=4,
        logging_steps=1,
        seed=0,
        bf16=False,
        learning_rate=1e-2,
        epsilon_high=0.28,
        gradient_checkpointing=False,
        **options,
    )
    trainer = cls(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        reward_funcs=[correct, length],
        args=args,
        train_dataset=Dataset.from_list(demo.make_rows(16, seed=1)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    assert trainer.accelerator.num_processes == WORLD
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def _worker(rank: int, init_file: str, model_dir: str, out: str) -> None:
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
    try:
        from trl import GRPOTrainer

        from grpo_fast.integrations.trl import FastGRPOTrainer

        for i, options in enumerate(CASES):
            want = _train(GRPOTrainer, model_dir, f"{out}/trl{i}", **options)
            got = _train(FastGRPOTrainer, model_dir, f"{out}/fast{i}", **options)
            assert len(want) == len(got) == 2 and want[-1]["grad_norm"] > 0
            for w, g in zip(want, got, strict=True):
                assert w.keys() == g.keys(), options
                for key, value in w.items():
                    if isinstance(value, float) and key != "step_time":
                        assert g[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (
                            options,
                            key,
                            g[key],
                            value,
                        )
    finally:
        dist.destroy_process_group()


def test_fast_trainer_matches_trl_on_two_processes(tmp_path):
    model_dir = tmp_path / "model"
    demo.save_pretrained(str(model_dir))
    mp.spawn(
        _worker,
        args=(str(tmp_path / "rendezvous"), str(model_dir), str(tmp_path / "out")),
        nprocs=WORLD,
        join=True,
    )
