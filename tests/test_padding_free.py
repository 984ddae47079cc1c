"""Padding-free steps and token-budget micro-batches in the thin trainer give the padded step's numbers
(loss, metrics, gradients, log-probs, weights after updates), on ragged prompts and completions."""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch
from torch import Tensor

from grpo_fast.integrations.hf import backbone, completion_hidden
from grpo_fast.integrations.packing import Packing, check_packable
from grpo_fast.trainer import Trainer, demo
from grpo_fast.trainer.generation import Rollout
from grpo_fast.trainer.reporting import read_metrics
from grpo_fast.trainer.rollout import pad_chunks, token_chunks

from .test_trainer import one_thread, tiny  # noqa: F401 - autouse fixture

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")


def ragged_masks(n: int, prompt: int, completion: int, seed: int) -> tuple[Tensor, Tensor]:
    """Left-padded prompt masks (>= 1 token) and right-padded completion masks (>= 1 token)."""
    g = torch.Generator().manual_seed(seed)
    pm = (torch.arange(prompt) >= torch.randint(0, prompt, (n, 1), generator=g)).long()
    cm = (torch.arange(completion) < torch.randint(1, completion + 1, (n, 1), generator=g)).long()
    return pm, cm


class RaggedTrainer(Trainer):
    """The demo's samples cut to random lengths (with an EOS) after random-length prompts: the demo task
    alone gives every row the same length, so nothing would be padded."""

    def generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, conversational: bool, rows: Tensor
    ) -> Rollout:
        out = super().generate(prompt_ids, prompt_mask, conversational, rows)
        n, length = out.completion_ids.shape
        g = torch.Generator().manual_seed(1_000 * self.step + 7)
        extra = torch.randint(3, len(self.tokenizer), (n, 5), generator=g).to(prompt_ids)
        extra_mask, mask = ragged_masks(n, 5, length, seed=1_000 * self.step)
        lengths = mask.sum(1)
        ids = out.completion_ids.clone()
        truncated = lengths == length
        ends = (~truncated).nonzero().squeeze(1)
        ids[ends, lengths[ends] - 1] = self.tokenizer.eos_token_id
        ids = ids.masked_fill(mask.to(ids.device) == 0, self.tokenizer.pad_token_id)
        return Rollout(
            torch.cat([extra, out.prompt_ids], 1),
            torch.cat([extra_mask.to(prompt_mask), out.prompt_mask], 1),
            ids,
            mask.to(out.completion_mask),
            truncated.to(out.truncated.device),
            out.completions,
        )


def ragged(tmp_path, **overrides) -> RaggedTrainer:
    values = dict(max_completion_length=11, learning_rate=1e-2, beta=0.04)
    return RaggedTrainer(tiny(tmp_path, **{**values, **overrides}))


# ----- the packing --------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("one_row", [False, True])
def test_packed_forward_gives_the_padded_hidden_states(impl, one_row):
    tokenizer = demo.build_tokenizer()
    model = demo.build_model(tokenizer).float()
    model.config._attn_implementation = impl
    n, P, L = 6, 7, 9
    pm, cm = ragged_masks(n, P, L, seed=3)
    pids = torch.randint(3, len(tokenizer), (n, P))
    cids = torch.randint(3, len(tokenizer), (n, L))
    want = completion_hidden(model, torch.cat([pids, cids], 1), torch.cat([pm, cm], 1), L)
    packing = Packing.build(pids, pm, cids, cm, one_row=one_row)
    real = int(pm.sum() + cm.sum())
    assert packing.tokens == real if one_row else real <= packing.tokens <= n * (P + L)
    got = packing.hidden(backbone(model)(**packing.forward_kwargs(), use_cache=False).last_hidden_state)
    assert got.shape == (int(cm.sum()), model.config.hidden_size)
    torch.testing.assert_close(got, packing.take(want), rtol=1e-5, atol=1e-5)


def test_packing_layout():
    pm = torch.tensor([[0, 0, 1], [1, 1, 1], [0, 1, 1], [0, 0, 1]])
    cm = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]])
    pids = torch.arange(12).view(4, 3) + 100
    cids = torch.arange(16).view(4, 4) + 200
    packing = Packing.build(pids, pm, cids, cm, one_row=False, pad_id=-1)
    lengths = (pm.sum(1) + cm.sum(1)).tolist()  # [5, 4, 4, 4]
    # rows as wide as the longest sequence, first-fit decreasing: [5], [4], [4], [4]; no row is wider
    assert packing.input_ids.shape == (4, max(lengths))
    assert packing.input_ids[0].tolist() == [102, 200, 201, 202, 203]
    assert packing.position_ids[1].tolist() == [0, 1, 2, 3, 0]  # its tail restarts: a dummy sequence
    assert packing.input_ids[1].tolist()[-1] == -1
    # every completion token that is attended, row-major, and the state before it predicts it
    assert packing.seq_ids.tolist() == [0, 0, 0, 0, 1, 2, 2, 3, 3, 3]
    assert packing.cols.tolist() == [0, 1, 2, 3, 0, 0, 1, 0, 1, 2]
    flat = packing.input_ids.flatten()
    assert (flat[packing.states + 1] == packing.take(cids)).all()
    values = torch.arange(10, dtype=torch.float32)
    assert (packing.take(packing.unpack(values, 4, fill=-5.0)) == values).all()
    assert packing.unpack(values, 4, fill=-5.0)[1, 1:].eq(-5.0).all()
    one = Packing.build(pids, pm, cids, cm, one_row=True)
    assert one.input_ids.shape == (1, sum(lengths))
    # short sequences share a row when they fit: lengths [4, 2, 2] fill two rows of 4
    short = Packing.build(
        pids[:3],
        pm[[0, 0, 0]],
        cids[:3],
        torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]]),
        one_row=False,
    )
    assert short.input_ids.shape == (2, 4) and short.position_ids[1].tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="row 2 has no prompt token"):
        Packing.build(pids, pm * torch.tensor([[1], [1], [0], [1]]), cids, cm, one_row=False)


def test_models_that_cannot_pack_are_refused_by_name():
    def fake(**config) -> types.SimpleNamespace:
        return types.SimpleNamespace(config=types.SimpleNamespace(**config))

    check_packable(fake(_attn_implementation="sdpa", layer_types=["full_attention", "sliding_attention"]))
    with pytest.raises(ValueError, match="attn_implementation='paged_attention'"):
        check_packable(fake(_attn_implementation="paged_attention"))
    with pytest.raises(ValueError, match="linear_attention"):
        check_packable(fake(_attn_implementation="sdpa", layer_types=["full_attention", "linear_attention"]))


def test_token_chunks_and_padding_to_a_common_count():
    index = torch.arange(10, 16)
    tokens = [0] * 10 + [5, 3, 9, 2, 2, 20]
    parts = token_chunks(index, tokens, 8)
    assert [p.tolist() for p in parts] == [[10, 11], [12], [13, 14], [15]]  # 15 is over the budget: alone
    assert [p.tolist() for p in token_chunks(index, tokens, None)] == [index.tolist()]
    padded = pad_chunks(parts, 6)
    assert [p.tolist() for p in padded] == [[10], [11], [12], [13], [14], [15]]
    assert [len(p) for p in pad_chunks([index[:1]], 3)] == [1, 0, 0]  # fewer rows than passes


def test_budget_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="max_tokens_per_microbatch must be >= 1"):
        tiny(tmp_path, max_tokens_per_microbatch=0)
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        tiny(tmp_path, max_tokens_per_microbatch=64, top_entropy_quantile=0.5)
    with pytest.raises(TypeError, match="'padding_free' must be bool"):
        tiny(tmp_path, padding_free=1)


# ----- the trainer's loss and log-probs ------------------------------------------------------------
@pytest.mark.parametrize("loss_type", LOSS_TYPES + ("cispo",))
def test_padding_free_loss_matches_padded(tmp_path, loss_type):
    trainer = ragged(tmp_path, loss_type=loss_type, entropy_coef=0.01, num_iterations=2)
    torch.manual_seed(0)
    batch = trainer.build_batch()
    out = batch.out
    assert out.completion_mask.sum(1).unique().numel() > 1 and out.prompt_mask.sum(1).unique().numel() > 1
    loss_mask = out.completion_mask.clone()
    loss_mask[1] = 0  # a sequence with no loss tokens but attended (mask_truncated_completions)
    n = loss_mask.shape[0]

    def run(padding_free: bool):
        trainer.cfg = dataclasses.replace(trainer.cfg, padding_free=padding_free)
        trainer.model.zero_grad()
        loss, metrics = trainer.policy_loss(
            out,
            loss_mask,
            torch.linspace(-1, 1, n),
            batch.old + 0.05,
            batch.ref - 0.3,
            loss_mask.sum().float(),
        )
        loss.backward()
        grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
        return loss.detach(), metrics, grads

    want, got = run(False), run(True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert got[1].keys() == want[1].keys()
    for key in want[1]:
        torch.testing.assert_close(got[1][key], want[1][key], rtol=1e-5, atol=1e-6, msg=key)
    assert got[2].keys() == want[2].keys()
    for key in want[2]:
        scale = want[2][key].abs().max()
        torch.testing.assert_close(got[2][key], want[2][key], rtol=0, atol=2e-5 * float(scale), msg=key)


def test_padding_free_logprobs_match_padded(tmp_path):
    trainer = ragged(tmp_path)
    torch.manual_seed(0)
    out = trainer.build_batch().out
    n = out.completion_ids.shape[0]
    want = trainer.logprobs(trainer.model, out, [torch.arange(n)]) * out.completion_mask
    trainer.cfg = dataclasses.replace(trainer.cfg, padding_free=True)
    got = trainer.logprobs(trainer.model, out, [torch.arange(3), torch.arange(3, n)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got[out.completion_mask == 0] == 0).all()


# ----- token budgets: the same update ------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        dict(loss_type="grpo", entropy_coef=0.01),
        dict(loss_type="dapo", entropy_coef=0.01, padding_free=True),
        dict(loss_type="dr_grpo"),
        dict(loss_type="bnpo", importance_sampling_level="sequence", padding_free=True),
    ],
    ids=lambda o: "-".join(f"{v}" for v in o.values()),
)
def test_token_budget_gives_the_same_update(tmp_path, options):
    """Micro-batches split into passes of <= 24 tokens: loss, grad norm, metrics and weights as unsplit."""
    results = []
    for budget in (None, 24):
        trainer = ragged(
            tmp_path / str(budget),
            num_iterations=2,
            gradient_accumulation_steps=2,
            max_tokens_per_microbatch=budget,
            **options,
        )
        torch.manual_seed(0)
        batch = trainer.build_batch()
        stats = trainer.update(batch)
        weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        results.append((batch, stats, weights))
    (plain, want, want_w), (split, got, got_w) = results
    assert [len(c) for c in plain.chunks] == [1, 1] and min(len(c) for c in split.chunks) > 1
    torch.testing.assert_close(split.old, plain.old, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(want.losses), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(got.grad_norms), torch.tensor(want.grad_norms), rtol=1e-5, atol=0)
    means, want_means = got.metrics.means(), want.metrics.means()
    assert means.keys() == want_means.keys()
    for key, value in want_means.items():
        assert math.isclose(means[key], value, rel_tol=1e-5, abs_tol=1e-7) or math.isnan(value), key
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-5)


def test_padding_free_runs_learn_as_padded(tmp_path):
    """Whole runs: the first step's numbers match (the same samples), every step is finite."""
    rows = []
    for options in ({}, dict(padding_free=True, max_tokens_per_microbatch=20)):
        run = ragged(tmp_path / str(len(options)), gradient_accumulation_steps=2, **options)
        rows.append(read_metrics(run.train().metrics_path))
    (want, got) = rows
    assert [r["step"] for r in got] == [1, 2, 3]
    for key in ("reward_mean", "loss", "kl", "entropy", "grad_norm", "completion_len"):
        assert math.isclose(got[0][key], want[0][key], rel_tol=1e-4, abs_tol=1e-6), key
    assert all(math.isfinite(r["loss"]) for r in got)
