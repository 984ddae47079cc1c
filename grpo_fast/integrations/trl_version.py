"""The TRL releases FastGRPOTrainer is verified on, and the check it makes of the installed one."""

from __future__ import annotations

import warnings

import trl
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from trl import GRPOTrainer

# The TRL releases FastGRPOTrainer is tested against: it overrides GRPOTrainer's private methods (below)
# and reads its attributes, which any release may rename or change.
VERIFIED_TRL = SpecifierSet(">=1.16.0,<1.17")
# GRPOTrainer's private methods overridden here: an override of a method TRL no longer calls is silently
# never run, so an untested release must at least still have them.
OVERRIDDEN_TRL_METHODS = (
    "_compute_loss",
    "_get_per_token_logps_and_entropies",
    "_calculate_rewards",
    "_generate_and_score_completions",
)
_untested_trl_warned = False

try:  # TRL's private helpers; a release without them is reported by check_trl_version, not here
    from trl.trainer.utils import nanmax, nanmin
except ImportError as _err:  # pragma: no cover - depends on the installed TRL
    nanmax = nanmin = None
    _TRL_HELPERS_MISSING: ImportError | None = _err
else:
    _TRL_HELPERS_MISSING = None


def check_trl_version(allow_untested: bool, version: str | None = None) -> None:
    """Refuses a TRL release outside VERIFIED_TRL unless ``allow_untested`` (then warns once); refuses
    any release that lacks what FastGRPOTrainer overrides or imports."""
    global _untested_trl_warned
    version = trl.__version__ if version is None else version
    if Version(version) not in VERIFIED_TRL:
        if not allow_untested:
            raise RuntimeError(
                f"FastGRPOTrainer is verified with TRL {VERIFIED_TRL}, and TRL {version} is installed: it "
                f"overrides TRL's private loss methods, which other releases may change. Install "
                f"trl{VERIFIED_TRL}, or pass grpo_fast_allow_untested_trl=True to run anyway (unverified)."
            )
        if not _untested_trl_warned:
            _untested_trl_warned = True
            warnings.warn(
                f"FastGRPOTrainer runs on TRL {version}, outside its verified range {VERIFIED_TRL} "
                "(grpo_fast_allow_untested_trl=True): its losses and gradients are not checked against it",
                stacklevel=3,
            )
    missing = [m for m in OVERRIDDEN_TRL_METHODS if not callable(getattr(GRPOTrainer, m, None))]
    if missing or _TRL_HELPERS_MISSING is not None:
        what = ", ".join(f"GRPOTrainer.{m}" for m in missing) or str(_TRL_HELPERS_MISSING)
        raise RuntimeError(
            f"TRL {version} lacks what FastGRPOTrainer builds on ({what}); install trl{VERIFIED_TRL}"
        )
