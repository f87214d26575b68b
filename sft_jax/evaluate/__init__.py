"""Metrics and forgetting probes."""
