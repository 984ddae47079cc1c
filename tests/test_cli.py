"""The ``grpo-fast`` command line: --help everywhere, ``train`` errors and a short run, ``check``'s table."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grpo_fast import cli
from grpo_fast.commands import check
from grpo_fast.trainer import TrainConfig
from grpo_fast.trainer.models import PROXY_VARIABLES
from grpo_fast.trainer.reporting import read_metrics

from .test_trainer import one_thread  # noqa: F401 - autouse fixture

ROOT = Path(__file__).resolve().parents[1]


def train_cli(
    *args: str, cwd: Path = ROOT, python_flags: tuple[str, ...] = (), timeout: int = 300
) -> subprocess.CompletedProcess:
    """``python -m grpo_fast.cli train ARGS`` in a fresh process, this checkout's grpo_fast first."""
    return subprocess.run(
        [sys.executable, *python_flags, "-m", "grpo_fast.cli", "train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
    )


def cli_env(**extra: str) -> dict[str, str]:
    # no empty entry: Python reads one as the current directory
    path = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def one_line_error(out: subprocess.CompletedProcess, message: str) -> None:
    """Exit 2 with one stderr line holding ``message``, and no traceback."""
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.count("\n") == 1, out.stderr


@pytest.mark.parametrize("argv", [[], ["train"], ["check"], ["bench"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    assert "usage: grpo-fast" in capsys.readouterr().out


def help_by_flag(text: str) -> dict[str, str]:
    """``--flag`` -> its help, whitespace collapsed, from argparse's option list."""
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if match := re.match(r"^  (--[\w-]+)", line):
            current = found.setdefault(match.group(1), [])
        current.append(line)
    return {flag: " ".join(" ".join(lines).split()) for flag, lines in found.items()}


def test_module_entry_point_runs_and_help_shows_what_a_bare_run_uses():
    out = train_cli("--help", timeout=120)
    assert out.returncode == 0 and "--learning-rate" in out.stdout and "--resume" in out.stdout
    helps = help_by_flag(out.stdout)
    assert "(default: runs/demo;" in helps["--output-dir"] and "(default: 300;" in helps["--max-steps"]
    assert "(default: 0.003;" in helps["--learning-rate"]
    bare = TrainConfig.from_dict({})  # what `grpo-fast train` alone runs
    for f in dataclasses.fields(TrainConfig):
        value = getattr(bare, f.name)
        if value is None:
            continue
        flag = "--" + f.metadata.get("flag", f.name).replace("_", "-")
        shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
        assert f"(default: {shown}" in helps[flag], (flag, helps[flag])


def test_train_mistyped_flag_gets_a_suggestion():
    out = train_cli("--lerning-rate", "1e-5", timeout=120)
    one_line_error(out, "unrecognized arguments: --lerning-rate 1e-5; did you mean '--learning-rate'?")
    assert out.stderr.startswith("grpo-fast train: error:")


def test_train_flags_cover_every_option():
    parser = cli.build_parser()
    args = parser.parse_args(
        [
            "train",
            "--reward",
            "a:b",
            "--reward",
            "c:d",
            "--reward-weights",
            "1",
            "2",
            "--no-progress",
            "--bf16",
            "--delta",
            "none",
            "--epsilon-high",
            "0.3",
        ]
    )
    from grpo_fast.trainer.cli import config_from_args

    cfg = config_from_args(args)
    assert cfg.rewards == ["a:b", "c:d"] and cfg.reward_weights == [1.0, 2.0]
    assert cfg.progress is False and cfg.bf16 is True and cfg.delta is None and cfg.epsilon_high == 0.3


def test_train_short_demo_run(tmp_path, capsys):
    code = cli.main(
        [
            "train",
            "--output-dir",
            str(tmp_path),
            "--max-steps",
            "3",
            "--no-progress",
            "--prompts-per-step",
            "2",
            "--num-generations",
            "4",
            "--print-completions-every",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "sample completions" in out and "mean reward: first 3 steps" in out
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 3 and (tmp_path / "reward_kl.png").is_file()


@pytest.mark.parametrize(
    "yaml_text, flags, message",
    [
        ("max_step: 3\n", [], "unknown option 'max_step'; did you mean 'max_steps'"),
        ("loss_type: ppo\n", [], "loss_type must be one of"),
        ("", ["--reward", "nowhere_module_q:fn"], "cannot import module 'nowhere_module_q'"),
        ("", ["--dataset", "missing.jsonl"], "dataset file 'missing.jsonl' does not exist"),
        ("", ["--learning-rate", "inf"], "learning_rate must be finite, got inf"),
        ("", ["--max-grad-norm", "nan"], "max_grad_norm must be finite, got nan"),
        ("", ["--chunk-size", "0"], "chunk_size must be >= 1"),
        ("", ["--chunk-size", "-4"], "chunk_size must be >= 1"),
        ("", ["--device", "tpu9"], "device must be auto, cpu, cuda or cuda:N, got 'tpu9'"),
        ("", ["--repetition-penalty", "nan"], "repetition_penalty must be finite"),
        ("", ["--reward-weights", "nan"], "reward_weights must be finite"),
    ],
)
def test_train_bad_input_is_one_clear_line(tmp_path, capsys, yaml_text, flags, message):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text + f"output_dir: {tmp_path / 'run'}\n")
    assert cli.main(["train", "--config", str(config), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_train_model_dir_without_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert (
        cli.main(
            [
                "train",
                "--model",
                str(tmp_path),
                "--dataset",
                "demo",
                "--reward",
                "grpo_fast.trainer.demo:reward",
            ]
        )
        == 2
    )
    assert "has a config.json but no weights" in capsys.readouterr().err


def test_check_table_lists_every_backend_and_exit_code(capsys):
    assert cli.main(["check", "--op", "group_advantages"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["backend", "device", "op"]
    assert {line.split()[0] for line in lines[2:] if line.strip() and "passed" not in line} == set(
        check.BACKENDS
    )
    assert "PASS" in lines[2]


def test_check_lists_unavailable_backends_as_skipped(monkeypatch, capsys):
    real = check.backends.resolve

    def resolve(name, device, op):
        if name == "native":
            raise ValueError("backend='native' cannot run group_advantages: grpo_fast._C is not built")
        return real(name, device, op)

    monkeypatch.setattr(check.backends, "resolve", resolve)
    # the skip is listed; and as nothing else was asked for, nothing was checked: not a pass
    assert cli.main(["check", "--op", "group_advantages", "--backend", "native"]) == 2
    assert "skipped: grpo_fast._C is not built" in capsys.readouterr().out
    assert cli.main(["check", "--op", "group_advantages", "--backend", "native", "--backend", "torch"]) == 0


def test_check_reports_a_wrong_backend_as_fail(monkeypatch, capsys):
    real = check.gf.group_advantages
    monkeypatch.setattr(check.gf, "group_advantages", lambda *a, **kw: real(*a, **kw) + 1e-3)
    assert cli.main(["check", "--op", "group_advantages", "--backend", "torch"]) == 1
    assert "FAIL: advantages" in capsys.readouterr().out


def test_check_lm_ops_run_and_pass_loss_rows():
    rows = check.check(["torch"], ["cpu"], ["grpo_loss"])
    far = len(check.FAR_SHAPES) * len(check.FAR_KL) * len(check.FAR_TEMPERATURES)
    assert len(rows) == len(check.LM_SHAPES) * len(check.LOSS_CONFIGS) + far
    assert all(r.status == "PASS" for r in rows), [r.cells() for r in rows]
    assert all(r.rel_err < 1e-3 for r in rows)  # T = 1e-2 multiplies logit rounding by 100


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_check_far_from_reference_passes(backend):
    """The far-from-reference cases (KL up to ~3 and ~30, T = 1, 0.7, 1e-2) judge a backend's gradients
    against twice the plain PyTorch computation's error: p = exp(z - lse) with lse rounded to fp32 fails them
    (3-4x the reference's error at T = 1 and 0.7)."""
    if backend == "native" and not check.backends._native.available():
        pytest.skip("grpo_fast._C is not built")
    rows = check._check_far(backend, "cpu", torch.float32)
    assert len(rows) == len(check.FAR_SHAPES) * len(check.FAR_KL) * len(check.FAR_TEMPERATURES)
    assert all(r.status == "PASS" for r in rows), [r.cells() for r in rows]


def test_check_covers_low_temperatures():
    rows = check.check(["torch"], ["cpu"], ["selective_logprobs"])
    assert {r.case.split(" T=")[1] for r in rows} == {"1", "0.7", "0.01", "0.001"}
    assert all(r.status == "PASS" for r in rows), [r.cells() for r in rows]


def test_check_counts_a_nan_as_a_failure(monkeypatch, capsys):
    real = check.gf.group_advantages
    monkeypatch.setattr(check.gf, "group_advantages", lambda *a, **kw: real(*a, **kw) * float("nan"))
    assert cli.main(["check", "--op", "group_advantages", "--backend", "torch"]) == 1
    assert "FAIL: advantages" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_check_on_cuda_includes_bf16():
    rows = check.check(["torch"], ["cuda"], ["grpo_loss"])
    assert {r.dtype for r in rows} == {"float32", "bfloat16"}


def test_bench_refuses_an_implementation_the_device_cannot_run(capsys):
    if torch.cuda.is_available():
        pytest.skip("every implementation may run here")
    assert cli.main(["bench", "--device", "cpu", "--impl", "trl"]) == 2
    assert "--impl trl cannot run on cpu" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--iters", "0"], "--iters must be >= 1"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
        (["--beta", "-1"], "--beta must be a finite number >= 0"),
        (["--shape", "0,64,128"], "--shape N,H,V must all be >= 1"),
        (["--shape", "64,16"], "--shape takes N,H,V as three integers"),
        (["--json", "/nonexistent-dir/x.json"], "cannot be written (checked before the run)"),
    ],
)
def test_bench_bad_arguments_are_one_line_and_exit_2(flags, message, capsys):
    assert cli.main(["bench", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_bench_unknown_loss_type_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--loss-type", "bogus"])
    assert exit_info.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


def test_check_that_checks_nothing_exits_2(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton then cannot run on CPU tensors
    assert cli.main(["check", "--backend", "triton", "--device", "cpu", "--op", "group_advantages"]) == 2
    assert "nothing was checked" in capsys.readouterr().err


def test_train_dataset_errors_count_lines_from_one(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "say 1"}\n\n{"question": "b"}\n')
    out = train_cli("--dataset", str(data), "--output-dir", str(tmp_path / "run"))
    one_line_error(out, "d.jsonl, line 3 has no 'prompt' field (it has: question)")


UNUSABLE_OUTPUT_DIRS = {
    "permission denied": ("/sys/grpo-fast-runs", "cannot be written: permission denied in '/sys'"),
    "under a file": ("{tmp}/a-file/runs", "cannot be created: '{tmp}/a-file' is a file, not a directory"),
    "virtual filesystem": ("/proc/grpo-fast-runs", "'/proc' does not accept new directories"),
}


@pytest.mark.parametrize("case", UNUSABLE_OUTPUT_DIRS)
def test_train_unusable_output_dir_is_one_line(tmp_path, case):
    path, message = (text.format(tmp=tmp_path) for text in UNUSABLE_OUTPUT_DIRS[case])
    (tmp_path / "a-file").write_text("")
    if not Path(path).parent.exists():
        pytest.skip(f"no {Path(path).parent} on this machine")
    one_line_error(train_cli("--output-dir", path, "--max-steps", "1"), message)


def test_train_finds_a_reward_module_in_the_current_directory(tmp_path):
    """-P: the current directory is not on sys.path, as under the installed `grpo-fast` script."""
    (tmp_path / "my_rewards.py").write_text(
        "from grpo_fast.trainer.demo import reward\n\n\n"
        "def accuracy(prompts, completions, answer, **kw):\n"
        "    return reward(prompts, completions, answer)\n"
    )
    out = train_cli(
        *("--reward", "my_rewards:accuracy", "--output-dir", "run", "--max-steps", "1"),
        *("--prompts-per-step", "2", "--num-generations", "2", "--no-progress"),
        cwd=tmp_path,
        python_flags=("-P",),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rewards my_rewards:accuracy" in out.stdout and (tmp_path / "run" / "metrics.jsonl").is_file()


@pytest.mark.parametrize(
    "env, why",
    [
        ({"HF_HUB_OFFLINE": "1"}, "(HF_HUB_OFFLINE is set)"),
        # .invalid never resolves (RFC 2606): the machine is offline as far as the hub goes
        ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://hub.invalid"}, "(hub.invalid:443 cannot be reached"),
    ],
    ids=["HF_HUB_OFFLINE", "no route to the hub"],
)
def test_train_offline_hub_model_fails_fast_in_one_line(tmp_path, env, why):
    free = {k: v for k, v in cli_env(**env).items() if k not in PROXY_VARIABLES}
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "grpo_fast.cli", "train", "--model", "grpo-fast-tests/no-such-model"]
        + ["--dataset", "demo", "--reward", "grpo_fast.trainer.demo:reward", "--output-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**free, "HF_HOME": str(tmp_path / "hf")},  # an empty cache
    )
    one_line_error(
        out,
        f"model 'grpo-fast-tests/no-such-model' is not a local directory and this machine is offline {why}",
    )
    assert "pass a local model directory" in out.stderr
    assert time.monotonic() - start < 30  # the hub client's retries take about 50 s
