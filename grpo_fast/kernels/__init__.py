"""Triton kernels, shipped as ``grpo_fast.kernels`` (never a top-level ``kernels``).

Their sources are the repository's top-level ``kernels/`` directory. It holds no ``__init__.py``, so from
the repository root (where ``python -m pytest`` puts it on ``sys.path``) ``import kernels`` still finds
the Hugging Face package that transformers imports. A built wheel copies those modules beside this file
(setup.py's ``build_py``); a source checkout, editable install included, finds them through ``__path__``.

They do row-wise work only; the per-token GRPO math lives in Python (``grpo_fast.engine.objective``).
One op per module, each with the same layering: the ``@triton.jit`` kernel, then a launch wrapper that
checks its inputs, allocates the outputs and picks the launch configuration. The backend that calls
them is :mod:`grpo_fast.backends.triton_ops`; the GEMMs and autograd Functions are
:mod:`grpo_fast.engine.chunk_loop`'s, shared by every backend.

- :mod:`.chunk_stats`: row logsumexp, target log-prob and entropy of a ``[C, V]`` logits tile
  (and the vocab-shard partials);
- :mod:`.chunk_grad`: dlogits from per-row coefficients, ``g * (onehot - softmax) / T`` plus the
  entropy-gradient term, written over the tile in place;
- :mod:`.logprobs`: no-grad log-probs and entropy straight from ``hidden`` and ``W``: the GEMM and an
  online logsumexp in one kernel, the logits never written;
- :mod:`.advantages`: group-normalized advantages (TRL's semantics).

Hyper-parameters are runtime arguments (no recompile per value); only block sizes and switches that
change the code are ``tl.constexpr``. Row offsets are 64-bit, so tiles with ``C * V > 2**31`` index
correctly. Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is imported), on CPU tensors.
"""

from pathlib import Path as _Path

_checkout = _Path(__file__).resolve().parents[2] / "kernels"
if (_checkout / "chunk_stats.py").is_file() and str(_checkout) not in __path__:
    __path__.append(str(_checkout))
del _Path, _checkout
