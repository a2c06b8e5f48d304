"""Benchmarks of realtime against the servers its users would otherwise run; see bench/README.md."""
