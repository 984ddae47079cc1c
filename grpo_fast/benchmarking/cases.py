"""Benchmark cases: a shape, dtype and loss set-up, and the GRPO batch of inputs it stands for."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import grpo_fast as gf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BenchCase:
    N: int  # completion tokens (B * T)
    H: int
    V: int
    B: int = 4
    dtype: str = "float32"
    device: str = "cpu"
    beta: float = 0.0
    loss_type: str = "dapo"
    with_old: bool = True

    @property
    def T(self) -> int:
        return self.N // self.B

    def config(self) -> gf.GRPOConfig:
        return gf.GRPOConfig(
            loss_type=self.loss_type, beta=self.beta, epsilon_high=0.28, max_completion_length=self.T
        )


def make_inputs(case: BenchCase, seed: int = 0) -> dict:
    """A GRPO batch: [B, T, H] hidden, some right padding, old (and ref) log-probs near the policy's."""
    dtype, device = DTYPES[case.dtype], torch.device(case.device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B, T = case.B, case.T
    hidden = (torch.randn(B, T, case.H, generator=gen) * 0.5).to(device, dtype).requires_grad_(True)
    weight = (
        (torch.randn(case.V, case.H, generator=gen) * case.H**-0.5).to(device, dtype).requires_grad_(True)
    )
    targets = torch.randint(0, case.V, (B, T), generator=gen).to(device)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
    inputs = dict(
        hidden=hidden,
        weight=weight,
        targets=targets,
        mask=mask,
        advantages=torch.randn(B, generator=gen).to(device),
    )
    # Log-probs of a random model are near -log(V); old/ref sit a little off so ratios are not all 1.
    base = torch.full((B, T), -float(torch.log(torch.tensor(float(case.V)))))
    if case.with_old:
        inputs["old_logp"] = (base + 0.1 * torch.randn(B, T, generator=gen)).to(device)
    if case.beta:
        inputs["ref_logp"] = (base + 0.1 * torch.randn(B, T, generator=gen)).to(device)
    return inputs
