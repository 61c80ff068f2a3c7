"""Training and evaluation: metrics of slide classifiers."""
