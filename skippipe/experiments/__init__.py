"""Measurements about skippipe that are neither runtime nor entry point: the overhead benchmark against
GPipe (overhead.py) and the omission study's report and plots (omission_study.py). The commands
skippipe-bench-overhead and skippipe-omission-study (skippipe/commands/) run them; the runtime never
imports this package (tests/test_layering.py)."""
