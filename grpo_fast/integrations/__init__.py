"""grpo_fast inside other libraries: ``hf`` (plain Hugging Face causal LMs), ``causal_lm`` (their
backbone and head steps, and ``gf.causal_lm_logprobs``) and ``trl`` (FastGRPOTrainer).

``grpo_fast.integrations.trl`` imports TRL, so it is not imported here.
"""
