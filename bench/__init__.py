"""The gateway benchmark (entry point: bench/run.py; see bench/README.md)."""
