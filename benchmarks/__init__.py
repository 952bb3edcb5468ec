"""Benchmarks of replicator side by side with rsync; `make bench` runs benchmarks/run.py."""
