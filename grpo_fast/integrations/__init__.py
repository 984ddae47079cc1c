"""grpo_fast inside other libraries: ``hf`` (plain Hugging Face causal LMs) and ``trl`` (FastGRPOTrainer).

``grpo_fast.integrations.trl`` imports TRL, so it is not imported here.
"""
