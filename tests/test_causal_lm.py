"""gf.causal_lm_logprobs against the model's own logits: tied, untied, scaled and soft-capped heads (tiny
configs of model families whose forward applies the scale or the cap), padded and padding-free, values and
gradients of a weighted sum of log-probs and entropies; and its named errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import grpo_fast as gf

from .spawn import spawn

transformers = pytest.importorskip("transformers")

SMALL = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=1,
)
# family, config overrides: how the family's own forward turns lm_head(hidden) into its logits
HEADS = {
    "tied": ("Qwen2", dict(tie_word_embeddings=True)),
    "untied": ("Qwen2", dict(tie_word_embeddings=False)),
    "scaled": ("Granite", dict(logits_scaling=0.5, tie_word_embeddings=False)),  # logits / 0.5
    "scaled-tied": ("Cohere", dict(logit_scale=0.7)),  # logits * 0.7, tied
    "soft-capped": ("Gemma2", dict(final_logit_softcapping=2.0, head_dim=16, attn_logit_softcapping=None)),
}
B, P, K = 3, 5, 6  # rows, prompt columns, completion columns


def make_model(head: str, seed: int = 0) -> nn.Module:
    family, options = HEADS[head]
    config = getattr(transformers, f"{family}Config")(**SMALL, **options)
    config._attn_implementation = "sdpa" if family != "Gemma2" else "eager"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(transformers, f"{family}ForCausalLM")(config)
    with torch.no_grad():  # a bigger head: log-probs far from uniform, the soft-cap bends them
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()  # no dropout: the two paths see the same network


def make_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P + K] ids: prompts left-padded, completions right-padded, one completion fully masked."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, SMALL["vocab_size"], (B, P + K), generator=g)
    mask = torch.ones(B, P + K, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    mask[0, P + 4 :] = 0  # a short completion
    mask[2, P:] = 0  # nothing to score
    return ids.masked_fill(mask == 0, 0), mask


def model_logprobs(model, ids, mask, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain-PyTorch lines: the model's own logits, log_softmax, gather (and the entropy)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -K - 1 : -1].float() / temperature
    log_probs = logits.log_softmax(-1)
    logp = log_probs.gather(-1, ids[:, -K:].unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    keep = mask[:, -K:] != 0
    return torch.where(keep, logp, 0.0), torch.where(keep, entropy, 0.0)


def weighted_grads(model, logp, entropy, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(B, K, generator=g), torch.randn(B, K, generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad((a * logp + b * entropy).sum(), params, allow_unused=True))


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_matches_the_models_own_logits(head, padding_free):
    model = make_model(head)
    ids, mask = make_inputs()
    want = model_logprobs(model, ids, mask, 0.8)
    want_g = weighted_grads(model, *want)
    got = gf.causal_lm_logprobs(model, ids, mask, K, 0.8, return_entropy=True, padding_free=padding_free)
    got_g = weighted_grads(model, *got)
    for name, x, y in zip(("logp", "entropy"), got, want, strict=True):
        assert x.shape == (B, K) and x.dtype == torch.float32, name
        torch.testing.assert_close(x, y, rtol=1e-5, atol=2e-5, msg=f"{head} {name}")
    assert torch.count_nonzero(got[0][2]) == 0 and torch.count_nonzero(got[0][0, 4:]) == 0
    if head.startswith(("scaled", "soft")):  # the head's transform matters at these sizes
        with torch.no_grad():
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -K - 1 : -1]
            plain = gf.selective_logprobs(
                hidden, model.get_output_embeddings().weight, ids[:, -K:], None, 0.8
            )
        assert (plain - want[0]).abs().max() > 1e-2
    for (name, _), x, y in zip(model.named_parameters(), got_g, want_g, strict=True):
        if y is None:
            assert x is None or torch.count_nonzero(x) == 0, name
            continue
        scale = y.abs().max().item()
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=f"{head} grad {name}")


def test_logp_only_and_no_grad():
    model = make_model("untied")
    ids, mask = make_inputs()
    want = model_logprobs(model, ids, mask, 1.0)[0]
    got = gf.causal_lm_logprobs(model, ids, mask, K)
    assert isinstance(got, torch.Tensor) and got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    with torch.no_grad():
        frozen = gf.causal_lm_logprobs(model, ids, mask, K, backend="torch", batch_invariant=True)
    assert not frozen.requires_grad
    torch.testing.assert_close(frozen, want, rtol=1e-5, atol=2e-5)


def test_bad_inputs_name_the_argument():
    model = make_model("tied")
    ids, mask = make_inputs()
    cases = [
        (dict(model=object()), TypeError, "model must be a torch.nn.Module"),
        (dict(input_ids=ids[0]), ValueError, "input_ids must be an integer tensor"),
        (dict(input_ids=ids.float()), ValueError, "input_ids must be an integer tensor"),
        (dict(attention_mask=mask[:, 1:]), ValueError, "attention_mask must be a tensor of input_ids' shape"),
        (dict(logits_to_keep=P + K), ValueError, "logits_to_keep must be in"),
        (dict(logits_to_keep=0), ValueError, "logits_to_keep must be in"),
        (dict(logits_to_keep=True), TypeError, "logits_to_keep must be an int"),
        (dict(temperature=0.0), ValueError, "temperature must be positive"),
        (dict(temperature="1"), TypeError, "temperature must be a float"),
        (dict(return_entropy=1), TypeError, "return_entropy must be a bool"),
        (dict(backend="nope"), ValueError, "backend must be one of"),
    ]
    for override, error, match in cases:
        kw = dict(dict(model=model, input_ids=ids, attention_mask=mask, logits_to_keep=K), **override)
        with pytest.raises(error, match=match):
            gf.causal_lm_logprobs(**kw)


def test_unfoldable_head_and_unpackable_model_are_named_errors():
    model = make_model("untied")
    ids, mask = make_inputs()
    model.config.logit_scale = -1.0  # a negative scale cannot fold into a positive temperature
    with pytest.raises(ValueError, match="scales its logits"):
        gf.causal_lm_logprobs(model, ids, mask, K)
    model = make_model("untied")
    model.config._attn_implementation = "sdpa_paged"
    with pytest.raises(ValueError, match="padding-free steps need an attention implementation"):
        gf.causal_lm_logprobs(model, ids, mask, K, padding_free=True)


def _fsdp2_worker(rank: int, world: int, init_file: str) -> None:
    import copy

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = make_model("tied")
        ids, mask = make_inputs()
        want = model_logprobs(model, ids, mask, 0.8)
        want_g = dict(
            zip([n for n, _ in model.named_parameters()], weighted_grads(model, *want), strict=True)
        )
        sharded = copy.deepcopy(model)
        for layer in sharded.model.layers:
            fully_shard(layer)
        fully_shard(sharded)  # the tied head is now a DTensor, half per rank
        assert type(sharded.lm_head.weight).__name__ == "DTensor"
        got = gf.causal_lm_logprobs(sharded, ids, mask, K, 0.8, return_entropy=True)
        for x, y in zip(got, want, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=2e-5)
        g = torch.Generator().manual_seed(2)  # weighted_grads' weights, through backward(): FSDP2's hooks
        a, b = torch.randn(B, K, generator=g), torch.randn(B, K, generator=g)
        (a * got[0] + b * got[1]).sum().backward()
        for name, param in sharded.named_parameters():
            full = param.grad.full_tensor()  # reduce-scattered to the shards, gathered here to compare
            torch.testing.assert_close(full, want_g[name], rtol=1e-4, atol=1e-5, msg=name)
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_model(tmp_path):
    """An FSDP2 model (2 gloo processes): the sharded head gathered, the gradients reduce-scattered back."""

    spawn(_fsdp2_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2)
