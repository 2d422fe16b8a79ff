"""Federated learning: aggregation maths, client sampling, strategies, client training, round loop."""
