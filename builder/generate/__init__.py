"""Data creation: Self-Instruct and ROUGE-L novelty."""
