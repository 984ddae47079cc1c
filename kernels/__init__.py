"""Triton kernels, shipped as ``grpo_fast.kernels`` (never a top-level ``kernels``).

One op per module, each with the same layering: the ``@triton.jit`` kernel, then a launch wrapper that
checks its inputs, allocates the outputs and picks the launch configuration. The autograd Functions
and the per-chunk interface live in ``grpo_fast`` (:mod:`grpo_fast.triton_ops`).

- :mod:`.chunk_stats`: row logsumexp, target log-prob and entropy of a ``[C, V]`` logits tile
  (and the vocab-shard partials);
- :mod:`.chunk_grad`: ``dlogits = g * (onehot - softmax) / T`` written over the tile in place;
- :mod:`.token_pass`: both, with the token-level GRPO ``g_t`` formed in registers in between;
- :mod:`.logprobs`: no-grad log-probs and entropy straight from ``hidden`` and ``W``: the GEMM and an
  online logsumexp in one kernel, the logits never written;
- :mod:`.advantages`: group-normalized advantages (TRL's semantics).

Hyper-parameters are runtime arguments (no recompile per value); only block sizes and switches that
change the code are ``tl.constexpr``. Row offsets are 64-bit, so tiles with ``C * V > 2**31`` index
correctly. Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is imported), on CPU tensors.
"""
