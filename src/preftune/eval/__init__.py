"""Evaluation: generation, judged win-rate, held-out loss (forgetting), reward accuracy and downstream tasks."""
