"""Micro-benchmarks behind figures in ../notes.md, each run as `python -m experiments.benchmarks.micro.NAME`."""
