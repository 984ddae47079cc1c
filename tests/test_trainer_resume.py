"""Checkpoints lose nothing: a run killed (SIGKILL) and resumed matches one that never stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grpo_fast.cli import build_parser
from grpo_fast.trainer import TrainConfig, Trainer, demo
from grpo_fast.trainer.checkpoint import TENSORS, WEIGHTS, checkpoints, latest_checkpoint
from grpo_fast.trainer.cli import config_from_args
from grpo_fast.trainer.reporting import read_metrics
from grpo_fast.trainer.rundir import SETTINGS_FILE

from .test_trainer import one_thread  # noqa: F401 - autouse fixture

ROOT = Path(__file__).resolve().parents[1]
# Wall-clock measurements differ between runs; every other metric must be identical.
TIMING = {"tokens_per_s", "step_time_s", "peak_mem_mb"}
STEPS = 8


def slow_reward(prompts, completions, answer, **kwargs):
    """The demo reward, slowed so that a test can kill the run between two checkpoints."""
    time.sleep(0.1)
    return demo.reward(prompts, completions, answer)


def _command(run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "grpo_fast.cli",
        "train",
        "--output-dir",
        str(run_dir),
        "--max-steps",
        str(STEPS),
        "--save-every",
        "1",
        "--save-total-limit",
        "3",
        "--prompts-per-step",
        "4",
        "--num-generations",
        "4",
        "--num-iterations",
        "2",
        "--reward",
        "tests.test_trainer_resume:slow_reward",
        "--no-progress",
        "--print-completions-every",
        "0",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _deterministic(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = subprocess.Popen(_command(killed), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL)
    # The uninterrupted run: the same options through the same parser, in this process (saves a start-up).
    args = build_parser().parse_args(_command(straight)[3:])
    assert Trainer(config_from_args(args)).train().steps == STEPS
    deadline = time.monotonic() + 120
    while latest_checkpoint(killed) is None or int(latest_checkpoint(killed).name.split("-")[1]) < 3:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint-000003 after 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stopped_at = len(read_metrics(killed / "metrics.jsonl"))
    assert stopped_at < STEPS

    resumed = subprocess.run(
        _command(killed, "--resume"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = read_metrics(straight / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert _deterministic(got) == _deterministic(want)
    assert not list(killed.glob(".checkpoint-*")), "a temporary checkpoint directory was left behind"


def test_checkpoint_files_load_without_pickle(tmp_path):
    from safetensors.torch import load_file

    cfg = TrainConfig.from_dict(
        {
            "output_dir": str(tmp_path),
            "max_steps": 2,
            "prompts_per_step": 2,
            "num_generations": 4,
            "progress": False,
            "save_every": 1,
        }
    )
    trainer = Trainer(cfg)
    trainer.train()
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-000001", "checkpoint-000002"]
    last = latest_checkpoint(tmp_path)
    state = torch.load(last / TENSORS, weights_only=True)
    assert {"optimizer", "scheduler", "rng"} <= state.keys()
    # Optimizer state is keyed by parameter name: it loads into any layout (1 process, DDP, FSDP2).
    assert "model.layers.0.mlp.up_proj.weight" in state["optimizer"]["state"]
    weights = load_file(last / WEIGHTS)
    assert ("lm_head.weight" in weights) != ("model.embed_tokens.weight" in weights)  # tied: stored once
    # A checkpoint is also a transformers model directory.
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(last)
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_resume_in_process_continues_the_data_and_the_schedule(tmp_path):
    values = {
        "output_dir": str(tmp_path),
        "prompts_per_step": 2,
        "num_generations": 4,
        "progress": False,
        "print_completions_every": 0,
        "save_every": 0,
        "max_steps": 4,
        "warmup_steps": 1,
    }
    Trainer(TrainConfig.from_dict(values)).train()
    straight = read_metrics(tmp_path / "metrics.jsonl")

    cut = tmp_path / "cut"
    trainer = Trainer(TrainConfig.from_dict({**values, "output_dir": str(cut)}))
    step = trainer.train_step

    def stop_after_two() -> dict:  # what the Ctrl-C handler does, after step 2
        row = step()
        trainer._stop_requested = trainer.step == 1
        return row

    trainer.train_step = stop_after_two
    first = trainer.train()
    assert first.interrupted and first.steps == 2 and first.checkpoint.name == "checkpoint-000002"

    with pytest.warns(UserWarning, match="warmup_steps: 1 -> 0"):  # changed options are reported
        Trainer(TrainConfig.from_dict({**values, "output_dir": str(cut), "warmup_steps": 0})).resume()
    result = Trainer(TrainConfig.from_dict({**values, "output_dir": str(cut)})).train(resume=True)
    assert result.steps == 4 and not result.interrupted
    assert _deterministic(read_metrics(cut / "metrics.jsonl")) == _deterministic(straight)


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    proc = subprocess.Popen(
        _command(tmp_path, "--save-every", "0"), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not read_metrics(tmp_path / "metrics.jsonl"):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    steps = len(read_metrics(tmp_path / "metrics.jsonl"))
    assert steps < STEPS
    assert latest_checkpoint(tmp_path).name == f"checkpoint-{steps:06d}"
    assert "continue with --resume" in out


def test_a_second_ctrl_c_after_the_save_is_one_line_and_exits_130(tmp_path):
    """The second Ctrl-C lands once the checkpoint is written (while the plot is drawn): no traceback."""
    proc, deadline = _running_until(tmp_path, 1, "--save-every", "0")
    proc.send_signal(signal.SIGINT)
    while latest_checkpoint(tmp_path) is None:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last = latest_checkpoint(tmp_path)
    assert err.strip().splitlines()[-1] == (
        f"grpo-fast train: stopped by Ctrl-C; the latest checkpoint is {last} (continue with --resume)"
    )


def test_ctrl_c_during_the_wrap_up_is_one_line(tmp_path, monkeypatch, capsys):
    from grpo_fast import cli
    from grpo_fast.trainer import loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "plot_metrics", interrupted)
    argv = ["train", "--output-dir", str(tmp_path), "--max-steps", "1", "--prompts-per-step", "2"]
    assert cli.main([*argv, "--num-generations", "2", "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err == (
        f"grpo-fast train: stopped by Ctrl-C; the latest checkpoint is {latest_checkpoint(tmp_path)} "
        "(continue with --resume)\n"
    )


def _train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "grpo_fast.cli", "train", *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _running_until(run_dir: Path, steps: int, *extra: str) -> tuple[subprocess.Popen, float]:
    """Start ``_command(run_dir, *extra)`` and return once ``steps`` steps are logged: (the process, the
    monotonic deadline its test keeps to)."""
    proc = subprocess.Popen(
        _command(run_dir, *extra),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while len(read_metrics(run_dir / "metrics.jsonl")) < steps:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    return proc, deadline


def _interrupt_after(run_dir: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    """Start ``_command(run_dir, *extra)`` and Ctrl-C it once ``steps`` steps are logged."""
    proc, _ = _running_until(run_dir, steps, *extra)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_resume_without_the_flags_continues_the_same_run_and_keeps_every_checkpoint(tmp_path):
    """Interrupted, then `--output-dir RUN --resume` alone: the saved settings (not the defaults) carry
    on, and no checkpoint that the run's save_total_limit kept is removed."""
    steps = 5
    _interrupt_after(tmp_path, 2, "--save-total-limit", "20", "--max-steps", str(steps))
    settings = (tmp_path / SETTINGS_FILE).read_text()
    kept = [p.name for p in checkpoints(tmp_path)]
    reached = int(kept[-1].split("-")[1])
    assert reached < steps and len(kept) == reached  # every step saved, none removed

    resumed = _train("--output-dir", str(tmp_path), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {reached} of {steps}" in resumed.stdout
    assert "resume changes" not in resumed.stdout and "differ" not in resumed.stderr
    assert [p.name for p in checkpoints(tmp_path)] == [f"checkpoint-{i:06d}" for i in range(1, steps + 1)]
    assert (tmp_path / SETTINGS_FILE).read_text() == settings
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, steps + 1))


def test_resume_applies_more_steps_by_name_and_refuses_another_loss(tmp_path):
    values = {
        "output_dir": str(tmp_path),
        "max_steps": 2,
        "prompts_per_step": 2,
        "num_generations": 2,
        "progress": False,
        "print_completions_every": 0,
        "save_every": 1,
        "save_total_limit": 5,
    }
    Trainer(TrainConfig.from_dict(values)).train()
    before = [p.name for p in checkpoints(tmp_path)]
    settings = (tmp_path / SETTINGS_FILE).read_text()

    refused = _train("--output-dir", str(tmp_path), "--resume", "--loss-type", "grpo", "--max-steps", "3")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert refused.stderr.count("\n") == 1 and "cannot change --loss-type (dapo -> grpo)" in refused.stderr
    assert [p.name for p in checkpoints(tmp_path)] == before
    assert (tmp_path / SETTINGS_FILE).read_text() == settings

    more = _train("--output-dir", str(tmp_path), "--resume", "--max-steps", "3", "--no-progress")
    assert more.returncode == 0, more.stderr[-3000:]
    lines = more.stdout.splitlines()
    assert [line for line in lines if "resume changes" in line] == [
        "grpo-fast train: resume changes --max-steps: 2 -> 3 (the learning-rate schedule now ends there)"
    ]
    assert "resuming from step 2 of 3" in more.stdout
    assert [p.name for p in checkpoints(tmp_path)] == [*before, "checkpoint-000003"]
    assert TrainConfig.from_yaml(tmp_path / SETTINGS_FILE).max_steps == 3


def test_resume_settings_of_a_run_without_a_settings_file_come_from_its_checkpoint(tmp_path):
    from grpo_fast.trainer.resume import ResumeConflict, resume_config

    cfg, _ = _two_checkpoints(tmp_path)
    (tmp_path / SETTINGS_FILE).unlink()
    resumed, changes = resume_config(True, {"output_dir": str(tmp_path)}, "command line")
    assert resumed == TrainConfig.from_dict(cfg) and changes == []
    # the same rules: max_steps may grow, save_total_limit shrinks only when asked for, by name
    _, changes = resume_config(
        True, {"output_dir": str(tmp_path), "max_steps": 4, "save_total_limit": 1}, "x"
    )
    assert [c.split(":")[0] for c in changes] == [
        "resume changes --max-steps",
        "resume changes --save-total-limit",
    ]
    with pytest.raises(ResumeConflict, match=r"--max-steps \(2 -> 1: the run has reached step 2\)"):
        resume_config(True, {"output_dir": str(tmp_path), "max_steps": 1}, "x")
    with pytest.raises(
        ResumeConflict, match=r"cannot change --reward \(grpo_fast.trainer.demo:reward -> m:f\)"
    ):
        resume_config(str(checkpoints(tmp_path)[0]), {"rewards": ["m:f"]}, "x")


def _two_checkpoints(tmp_path):
    cfg = {
        "output_dir": str(tmp_path),
        "max_steps": 2,
        "prompts_per_step": 2,
        "num_generations": 4,
        "progress": False,
        "save_every": 1,
    }
    Trainer(TrainConfig.from_dict(cfg)).train()
    return cfg, checkpoints(tmp_path)


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": lambda c: (c / WEIGHTS).write_bytes((c / WEIGHTS).read_bytes()[:100]),
    "garbage weights": lambda c: (c / WEIGHTS).write_bytes(b"not safetensors" * 10),
    "flipped bit in the weights": lambda c: _flip_a_bit(c / WEIGHTS),
    "truncated trainer_state.pt": lambda c: (c / TENSORS).write_bytes((c / TENSORS).read_bytes()[:50]),
    "garbage trainer_state.json": lambda c: (c / "trainer_state.json").write_text("{{{"),
    "empty trainer_state.json": lambda c: (c / "trainer_state.json").write_text(""),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, kind, capsys):
    """A damaged latest checkpoint is named and passed over: the run resumes from the one before."""
    from grpo_fast import cli

    cfg, (first, last) = _two_checkpoints(tmp_path)
    DAMAGE[kind](last)
    trainer = Trainer(TrainConfig.from_dict({**cfg, "max_steps": 3}))
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint {last}"):
        assert trainer.resume() == first
    assert trainer.step == 1
    # and named, one line, when asked for by path
    argv = ["train", "--output-dir", str(tmp_path), "--max-steps", "3", "--prompts-per-step", "2"]
    assert cli.main([*argv, "--resume", str(last)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {last} is damaged" in err and "Traceback" not in err


def test_every_checkpoint_file_is_in_its_manifest(tmp_path):
    import json

    _, (first, last) = _two_checkpoints(tmp_path)
    for ckpt in (first, last):
        manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
        files = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()} - {"manifest.json"}
        assert set(manifest) == files and {WEIGHTS, TENSORS, "trainer_state.json"} <= files


def test_a_checkpoint_without_manifest_that_cannot_be_read_falls_back_too(tmp_path):
    """Checkpoints written before manifests: a failed read is named and the previous one is used."""
    cfg, (first, last) = _two_checkpoints(tmp_path)
    (last / "manifest.json").unlink()
    (first / "manifest.json").unlink()
    (last / TENSORS).write_bytes((last / TENSORS).read_bytes()[:50])
    trainer = Trainer(TrainConfig.from_dict({**cfg, "max_steps": 3}))
    with pytest.warns(UserWarning, match=f"checkpoint {last} cannot be read"):
        assert trainer.resume() == first
    assert trainer.step == 1


def test_disk_full_says_so_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch, capsys):
    import errno

    from grpo_fast import cli
    from grpo_fast.trainer import checkpoint

    cfg, (first, last) = _two_checkpoints(tmp_path)
    real = checkpoint.save_file

    def full(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # part of it lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    argv = ["train", "--output-dir", str(tmp_path), "--max-steps", "3", "--prompts-per-step", "2"]
    assert cli.main([*argv, "--resume", "--save-every", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "earlier checkpoints are intact" in err and "Traceback" not in err
    assert checkpoints(tmp_path) == [first, last]  # untouched, and no half-written copy left
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
