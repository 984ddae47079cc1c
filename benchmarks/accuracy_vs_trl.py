"""Loss-step accuracy of FastGRPOTrainer (each grpo_fast backend) and trl.GRPOTrainer against an fp64 truth.

    python benchmarks/accuracy_vs_trl.py --out benchmarks/results/accuracy-vs-trl-cpu.json

Tiny models (Qwen2 with a biased head, GPT-2, Phi) whose policy has drifted from the reference model: every
parameter moved by a few percent of its own spread, so the per-token KL to the reference reaches ~3 or ~30
(a KL term's gradient scales a log-prob's error by exp(ref - logp)). Each micro-batch's loss step
(``_compute_loss`` + backward, beta 0.04, old log-probs as with two iterations per generation) runs through
TRL's own code, through FastGRPOTrainer on each backend, and through TRL's code on an fp64 copy of the
same weights with materialized logits: the truth. All get the same inputs, the reference and old log-probs
included (computed once, in fp64). Printed: the relative L2 error of the parameter gradients against the
truth, worst micro-batch, and each backend's ratio to TRL's.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import subprocess
import sys
import tempfile
import warnings
from datetime import date
from pathlib import Path

import torch
from torch import Tensor, nn

# This checkout's grpo_fast, not an installed one (python puts benchmarks/ on the path, not the checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The cases: (name, policy drift, bias of the head: None or its mean); the drift is the std of the noise
# added to every parameter. A head bias far from 0 puts the logits (and their logsumexp) there, where an fp32
# logsumexp's rounding is large beside log sum exp(z - max).
CASES = (
    ("qwen2-biased-head", 0.10, 0.0),
    ("qwen2-offset-head", 0.10, 16.0),
    ("gpt2", 0.16, None),
    ("phi", 0.10, None),
    ("qwen2-near-reference", 0.03, 0.0),
)
BACKENDS = ("torch", "native")
BETA = 0.04


def _model(kind: str, vocab: int, pad: int, eos: int, bias: float | None) -> nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config, PhiConfig, Qwen2Config

    ids = dict(vocab_size=vocab, pad_token_id=pad, eos_token_id=eos, bos_token_id=None)
    if kind.startswith("qwen2"):
        config = Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True, **ids,
        )  # fmt: skip
    elif kind == "gpt2":
        config = GPT2Config(
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    else:
        config = PhiConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **ids,
        )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    if bias is not None:  # a head with a bias (tied weight kept): grpo_fast takes the bias as its own input
        head = nn.Linear(config.hidden_size, vocab, bias=True)
        head.weight = model.get_input_embeddings().weight
        nn.init.normal_(head.bias, mean=bias, std=0.5)
        model.lm_head = head
    return model


def _drift_(model: nn.Module, scale: float, seed: int) -> None:
    """Every parameter moved by ``scale`` times a random normal (weights of a trained-looking size)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _trainer(model: nn.Module, tokenizer, out: str, backend: str):
    from datasets import Dataset
    from trl import GRPOConfig

    from grpo_fast.integrations.trl import FastGRPOTrainer
    from grpo_fast.trainer import demo

    args = GRPOConfig(
        output_dir=out, use_cpu=True, report_to=[], per_device_train_batch_size=4, num_generations=4,
        max_completion_length=6, loss_type="dapo", beta=0.0, num_iterations=2, seed=0, bf16=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = FastGRPOTrainer(
            model=model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)], args=args,
            train_dataset=Dataset.from_list(demo.make_rows(8, seed=1)), processing_class=tokenizer,
            grpo_fast_backend=backend,
        )  # fmt: skip
    # beta set after construction: with beta > 0 TRL would load a reference model by name; the reference
    # log-probs here are inputs.
    trainer.beta = BETA
    trainer._gf_config = dataclasses.replace(trainer._gf_config, beta=BETA)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _logps(model: nn.Module, ids: Tensor, mask: Tensor, keep: int) -> Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -keep - 1 : -1].double()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, -keep:, None]).squeeze(-1)


def _batch(policy64: nn.Module, ref64: nn.Module, vocab: int, seed: int) -> tuple[dict, float]:
    """A micro-batch as TRL hands it to _compute_loss, with old/ref log-probs from the fp64 models; and the
    largest per-token KL to the reference."""
    g = torch.Generator().manual_seed(seed)
    B, P, C = 4, 3, 6
    prompt_ids = torch.randint(0, vocab, (B, P), generator=g)
    completion_ids = torch.randint(0, vocab, (B, C), generator=g)
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_mask[1, 4:] = 0
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([torch.ones(B, P, dtype=torch.long), completion_mask], 1)
    with torch.no_grad():
        logp, ref = _logps(policy64, ids, mask, C), _logps(ref64, ids, mask, C)
    d = (ref - logp)[completion_mask.bool()]
    old = (logp + 0.05 * torch.randn(B, C, generator=g, dtype=logp.dtype)).clamp(max=0)
    inputs = dict(
        prompt_ids=prompt_ids, prompt_mask=torch.ones(B, P, dtype=torch.long), completion_ids=completion_ids,
        completion_mask=completion_mask, advantages=torch.randn(B, generator=g),
        num_items_in_batch=completion_mask.sum().float(),
        old_per_token_logps=old.float(),
        ref_per_token_logps=ref.float(),
    )  # fmt: skip
    return inputs, (d.exp() - d - 1).max().item()


def _step(trainer, compute, model: nn.Module, inputs: dict) -> dict[str, Tensor]:
    model.zero_grad()
    trainer._metrics["train"].clear()
    compute(trainer, model, dict(inputs)).backward()
    return {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel_l2(got: dict[str, Tensor], truth: dict[str, Tensor]) -> float:
    num = sum((got[n] - truth[n]).square().sum() for n in truth)
    return (num / sum(t.square().sum() for t in truth.values())).sqrt().item()


def run_case(kind: str, drift: float, bias: float | None, dtype: torch.dtype, batches: int, tmp: str) -> dict:
    from trl import GRPOTrainer

    from grpo_fast.integrations.trl import FastGRPOTrainer
    from grpo_fast.trainer import demo

    tokenizer = demo.build_tokenizer()
    ref = _model(kind, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, bias).to(dtype)
    policy = copy.deepcopy(ref)
    _drift_(policy, drift, seed=1)
    policy64, ref64 = copy.deepcopy(policy).double(), ref.double()
    for m in (policy64, ref64):
        m.eval()  # no dropout anywhere: every run sees one function
    policy.eval()
    trainer = _trainer(policy, tokenizer, tmp, "torch")
    truth_trainer = _trainer(policy64, tokenizer, tmp, "torch")
    errors: dict[str, float] = {"trl": 0.0, **{b: 0.0 for b in BACKENDS}}
    kl = 0.0
    for i in range(batches):
        inputs, batch_kl = _batch(policy64, ref64, len(tokenizer), seed=100 + i)
        kl = max(kl, batch_kl)
        truth = _step(truth_trainer, GRPOTrainer._compute_loss, truth_trainer.model, inputs)
        errors["trl"] = max(
            errors["trl"], _rel_l2(_step(trainer, GRPOTrainer._compute_loss, trainer.model, inputs), truth)
        )
        for backend in BACKENDS:
            trainer.grpo_fast_backend = backend
            got = _step(trainer, FastGRPOTrainer._compute_loss, trainer.model, inputs)
            errors[backend] = max(errors[backend], _rel_l2(got, truth))
    return dict(
        model=kind, dtype=str(dtype).removeprefix("torch."), max_token_kl=kl, rel_l2=errors,
        ratio_to_trl={b: errors[b] / errors["trl"] for b in BACKENDS},
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=4, help="micro-batches per case (worst reported)")
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16"], help="default: both")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtype or ["float32", "bfloat16"]:
            for kind, drift, bias in CASES:
                rows.append(run_case(kind, drift, bias, getattr(torch, dtype), args.batches, tmp))
                r = rows[-1]
                cells = "  ".join(f"{k} {v:.1e}" for k, v in r["rel_l2"].items())
                ratios = "  ".join(f"{k}/trl {v:.2f}" for k, v in r["ratio_to_trl"].items())
                print(
                    f"{kind:22} {r['dtype']:9} KL<={r['max_token_kl']:6.1f}  {cells}  |  {ratios}", flush=True
                )
    worst = max(max(r["ratio_to_trl"].values()) for r in rows)
    print(f"worst backend/TRL ratio: {worst:.2f}")
    if args.out:
        import grpo_fast

        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout
        record = dict(
            what="relative L2 error of the parameter gradients of one loss step against an fp64 truth, "
            "worst of the micro-batches; CPU figures",
            device=f"cpu ({platform.machine()}, {torch.get_num_threads()} thread)",
            date=str(date.today()), commit=commit.strip(), torch=torch.__version__,
            native=grpo_fast.backends._native.available(), batches=args.batches, rows=rows,
        )  # fmt: skip
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0 if worst <= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
