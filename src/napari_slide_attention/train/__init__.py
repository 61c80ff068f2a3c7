"""Training and evaluation: cohorts, samples, training loops, metrics (no Qt)."""
