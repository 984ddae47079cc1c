"""Sub-commands of the grpo-fast CLI."""
