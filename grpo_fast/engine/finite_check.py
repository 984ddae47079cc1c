"""NaN and inf in ``hidden`` and the LM head ``weight``, found from the pass's own per-row results instead
of a read of both on every call, then named with the error an up-front check gives.

Where the results are on the host (CPU), the check runs at once (:class:`FiniteResultCheck`). On CUDA a
``grpo_loss`` call reads the device once, before its passes: its check is deferred
(:class:`PendingFiniteCheck`), a flag copied to pinned host memory behind a CUDA event, and lands at no
synchronization of its own, with the call's backward when the event has completed by then, at the latest
with the next ``grpo_loss`` / ``selective_logprobs`` call, after that call's own host read (which leaves
the stream idle).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from .validation import ValueChecks, add_head_value_checks

# Deferred checks waiting for their event. Each call's host read settles the earlier ones, so more than a
# few are in flight only with work on other streams or devices; past this many the oldest is waited for.
MAX_PENDING = 16
_PENDING: list[PendingFiniteCheck] = []

LATER = "an earlier grpo_loss call's result was not finite: "
GONE = (
    "an earlier grpo_loss call's result was not finite (a NaN or inf in its hidden or LM head weight, or "
    "logits beyond the dtype's range), and its {gone} gone, so which one cannot be said: run that call on "
    "the CPU, or check torch.isfinite(hidden).all() and torch.isfinite(weight).all() before it"
)


@dataclass(frozen=True)
class FiniteResultCheck:
    """The finiteness check of ``hidden`` (the rows the pass reads) and ``weight``.

    A NaN or inf in a row of hidden makes that row's logits, hence its log-prob or entropy, non-finite; one
    anywhere in weight does so for the rows that meet it (an inf times a hidden value of either sign).
    :meth:`bad` is a device flag from those ``[N]`` results (one small reduction, no read); only when it is
    set, :meth:`name_input` searches the inputs and raises :func:`add_head_value_checks`'s error naming the
    bad one. Finite inputs whose logits overflow find nothing: the result is returned as computed.

    ``source`` and ``rows``: the caller's hidden and the indices of its flat rows that ``hidden`` holds
    (None: all), what a deferred check looks at (``hidden`` itself may be a copy that dies with the call)."""

    hidden: Tensor
    weight: Tensor
    source: Tensor | None = None
    rows: Tensor | None = None

    def bad(self, *results: Tensor) -> Tensor | None:
        """0-dim bool on the results' device, True when one of them is not finite; None without results."""
        present = [r for r in results if r.numel()]
        if not present:
            return None
        return ~torch.stack([torch.isfinite(r).all() for r in present]).all()

    def name_input(self) -> None:
        checks = ValueChecks()
        add_head_value_checks(checks, self.hidden, self.weight, None)
        checks.run()

    def __call__(self, *results: Tensor) -> None:
        """Check now (one read of the flag)."""
        bad = self.bad(*results)
        if bad is not None and bool(bad):
            self.name_input()

    def defer(self, *results: Tensor) -> PendingFiniteCheck | None:
        """Check later, at no synchronization: the flag goes to the host behind an event (None without
        results)."""
        bad = self.bad(*results)
        if bad is None:
            return None
        source = self.hidden if self.source is None else self.source
        pending = PendingFiniteCheck(bad, source, self.weight, None if self.source is None else self.rows)
        _PENDING.append(pending)
        if len(_PENDING) > MAX_PENDING:
            settle(_PENDING[0])
        return pending


def finite_result_check(
    hidden: Tensor, weight: Tensor, source: Tensor | None = None, rows: Tensor | None = None
) -> FiniteResultCheck:
    return FiniteResultCheck(hidden, weight, source, rows)


class _WeakTensor:
    """A weak reference to a tensor. A view is rebuilt from its base while the base lives: a slice made for
    the call dies with the call, the tensor it was cut from usually does not."""

    def __init__(self, x: Tensor) -> None:
        base = x._base
        if base is None or base.dtype != x.dtype:
            base = x
        self._ref = weakref.ref(base)
        self._shape = tuple(x.shape)
        self._view = None if base is x else (self._shape, x.stride(), x.storage_offset())

    def __call__(self) -> Tensor | None:
        base = self._ref()
        if base is None:
            return None
        if self._view is None:
            return base.detach() if tuple(base.shape) == self._shape else None
        try:
            return base.detach().as_strided(*self._view)
        except RuntimeError:  # the base's storage shrank since: not the tensor the call read
            return None


class PendingFiniteCheck:
    """The deferred check of one call: its flag (pinned host memory behind a CUDA event; the device tensor
    itself elsewhere, where reading it is free) and weak references to its hidden and weight, so nothing
    is kept alive for it but the indices of the rows that counted."""

    def __init__(self, flag: Tensor, hidden: Tensor, weight: Tensor, rows: Tensor | None) -> None:
        self._event: torch.cuda.Event | None = None
        if flag.device.type == "cuda":
            self._flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._flag.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._flag = flag
        self._hidden, self._weight, self._rows = _WeakTensor(hidden), _WeakTensor(weight), rows

    def ready(self) -> bool:
        """Whether the flag has reached the host (asks the event; never blocks)."""
        return self._event is None or self._event.query()

    def value(self) -> bool:
        """The flag. Waits for the event: call it when :meth:`ready` or after a host read on its stream."""
        if self._event is not None:
            self._event.synchronize()
        return bool(self._flag)

    def resolve(self, later: bool) -> None:
        """Raise the named error when the flag is set: the bad input, or, when an input is gone and the
        other shows nothing, that it cannot say which. ``later``: from another call (said in the error)."""
        if not self.value():
            return
        hidden, weight = self._hidden(), self._weight()
        if hidden is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1])
            hidden = hidden if self._rows is None else hidden.index_select(0, self._rows)
        checks = ValueChecks()
        add_head_value_checks(checks, hidden, weight, None)
        try:
            checks.run()
        except ValueError as err:
            raise ValueError((LATER if later else "") + str(err)) from None
        gone = [name for name, x in (("hidden", hidden), ("weight", weight)) if x is None]
        if gone:
            raise ValueError(GONE.format(gone=" and ".join(gone) + (" are" if len(gone) > 1 else " is")))


def settle(pending: PendingFiniteCheck, later: bool = True) -> None:
    """Resolve ``pending`` and forget it (first, so that its error is raised once)."""
    if pending in _PENDING:
        _PENDING.remove(pending)
    pending.resolve(later)


def settle_ready() -> None:
    """Resolve every deferred check whose flag has reached the host, oldest first. At no synchronization;
    after a call's host read, every check of a call before it on the same stream is ready."""
    for pending in [p for p in _PENDING if p.ready()]:
        settle(pending)


def pending_checks() -> tuple[PendingFiniteCheck, ...]:
    """The deferred checks not resolved yet, oldest first."""
    return tuple(_PENDING)
