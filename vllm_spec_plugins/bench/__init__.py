"""Benchmark helpers (workloads, ...). Plain Python: no vLLM imports."""
