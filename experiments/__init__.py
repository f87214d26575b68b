"""Scripts that reproduce the results in README.md, each run from the repository root as a module:
`python -m experiments.NAME.run [...]` (also the `make experiment-*` targets)."""
