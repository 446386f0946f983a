"""Evaluation: the lm-eval adapter, instruction-following checks, the judge, the eval summary."""
