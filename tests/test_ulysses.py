"""Ulysses attention: P gloo processes, each running its slice of packed rows, give the hidden states and
(summed) parameter gradients of one process running the whole rows with the model's own sdpa attention.

Each worker computes the one-process truth itself (same seed, same model) before the sharded forward.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from grpo_fast.integrations.ulysses import (
    check_splittable,
    pad_to_multiple,
    sequence_parallel_attention,
    shard_sequence,
)
from grpo_fast.integrations.ulysses_kernels import SegmentLayout, attend, block_causal_mask, cu_seqlens

from .spawn import spawn

SEGMENTS = ([5, 9, 8], [12, 7, 3])  # two packed rows of 22 tokens, padded to 24 for 4 ranks


def _model(
    heads: int = 4, kv_heads: int = 2, dtype: torch.dtype = torch.float32, **extra
) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=16 * heads,
        intermediate_size=128,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=2,
        vocab_size=128,
        max_position_embeddings=64,
        attn_implementation="sdpa",
        **extra,
    )
    return Qwen2ForCausalLM(config).to(dtype)


def _rows(multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows whose positions restart per segment; the tail padded with token 0 at position 0."""
    torch.manual_seed(1)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in SEGMENTS])
    ids = torch.randint(1, 128, positions.shape)
    return pad_to_multiple(ids, multiple), pad_to_multiple(positions, multiple)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())  # both detached by the callers


def _check(group: dist.ProcessGroup, heads: int, kv_heads: int, dtype: torch.dtype, kernel: str = "auto"):
    """Hidden states, and unless ``kernel='flex'`` (no backward on the CPU) parameter gradients."""
    size = dist.get_world_size(group)
    model = _model(heads, kv_heads, dtype)
    ids, positions = _rows(size)
    weight = torch.randn(*ids.shape, model.config.hidden_size, dtype=dtype)
    truth = model.model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    (truth * weight).sum().backward()
    want = {n: p.grad.clone() for n, p in model.model.named_parameters()}
    model.zero_grad()

    backward = kernel != "flex"
    with sequence_parallel_attention(model, group, kernel=kernel), torch.set_grad_enabled(backward):
        assert model.config._attn_implementation == "grpo_fast_ulysses"
        local = [shard_sequence(x, group) for x in (ids, positions, weight)]
        hidden = model.model(input_ids=local[0], position_ids=local[1], use_cache=False).last_hidden_state
        if backward:
            (hidden * local[2]).sum().backward()
    assert model.config._attn_implementation == "sdpa"

    tight = dtype == torch.float64
    label = f"P={size} H={heads} Hkv={kv_heads} {dtype} {kernel}"
    assert _rel(hidden.detach(), shard_sequence(truth.detach(), group)) <= (1e-12 if tight else 1e-6), label
    if not backward:
        return
    for name, param in model.model.named_parameters():
        dist.all_reduce(param.grad, group=group)
        assert _rel(param.grad, want[name]) <= (1e-10 if tight else 1e-5), f"{label} {name}"


def _restored(group: dist.ProcessGroup) -> None:
    """Generation outside the context uses the model's own attention, also after an error inside."""
    model = _model()
    prompt = torch.tensor([[3, 5, 7, 9]])
    before = model.generate(prompt, max_new_tokens=4, do_sample=False)
    with pytest.raises(ValueError, match="position_ids"):
        with sequence_parallel_attention(model, group):
            model(input_ids=prompt[:, :2])
    with pytest.raises(ValueError, match="attention_mask=None"):
        with sequence_parallel_attention(model, group):
            model(input_ids=prompt[:, :2], attention_mask=torch.ones(1, 2), position_ids=prompt[:, :2])
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(KeyError):
        with sequence_parallel_attention(model, group):
            raise KeyError("inside")
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), before)
    with pytest.raises(ValueError, match="multiple of the group size"):
        shard_sequence(torch.zeros(1, 3), group)


def _worker(rank: int, world: int, init: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    for dtype in (torch.float64, torch.float32):
        _check(group, 4, 2, dtype)
    if world == 2:
        _check(group, 4, 1, torch.float32)  # one KV head repeated for both ranks
        _check(group, 4, 2, torch.float32, kernel="flex")
        _check(group, 4, 2, torch.float32, kernel="sdpa")  # one masked sdpa over the whole row
        _restored(group)
    else:
        _check(group, 12, 3, torch.float32)  # 3 KV heads, repeated to 12 so 4 ranks get whole heads
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_rows_match_one_process(tmp_path, world):
    spawn(_worker, args=(world, str(tmp_path / "rendezvous")), nprocs=world)


def test_refuses_models_it_cannot_split():
    model = _model()
    for size, why in ((3, "must divide the attention heads"), (0, "int >= 1")):
        with pytest.raises(ValueError, match=why):
            check_splittable(model, size)
    check_splittable(model, 4)  # 2 KV heads for 4 ranks: repeated
    sliding = _model(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(ValueError, match="sliding_attention"):
        check_splittable(sliding, 2)
    mistral = MistralForCausalLM(
        MistralConfig(
            hidden_size=32,
            intermediate_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=1,
            vocab_size=32,
        )  # fmt: skip
    )
    with pytest.raises(ValueError, match="sliding_window=4096"):
        check_splittable(mistral, 2)
    bloom = BloomForCausalLM(BloomConfig(hidden_size=16, n_head=4, n_layer=1, vocab_size=32))
    with pytest.raises(ValueError, match="takes no position_ids"):
        check_splittable(bloom, 2)
    with pytest.raises(ValueError, match="no config"):
        check_splittable(torch.nn.Linear(2, 2), 2)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_segment_masks_and_kernels_agree():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    mask = block_causal_mask(positions)[:, 0]
    segment = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 1, 1]])
    i, j = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    assert torch.equal(mask, (segment[:, :, None] == segment[:, None, :]) & (j <= i))
    offsets, longest = cu_seqlens(positions)
    assert offsets.tolist() == [0, 3, 5, 6, 10, 12] and longest == 4
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    sdpa = attend("sdpa", q, k, v, SegmentLayout(positions), 0.3, 0.0, None)
    flex = attend("flex", q, k, v, SegmentLayout(positions), 0.3, 0.0, None)
    segments = attend("segments", q, k, v, SegmentLayout(positions), 0.3, 0.0, None)
    assert sdpa.shape == (2, 6, 4, 8) and _rel(flex, sdpa) < 1e-6 and _rel(segments, sdpa) < 1e-6
    assert SegmentLayout(positions).spans() == [[(0, 3), (3, 5), (5, 6)], [(0, 4), (4, 6)]]
