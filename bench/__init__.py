"""Benchmarks of the training image: `python -m bench.train_throughput` (what `make bench` runs)."""
