"""Reproducible latency and throughput harness for pgwake (never imported by the product)."""
