"""Measurements about skippipe that are neither runtime nor entry point: the overhead benchmark against
GPipe (overhead.py) and the omission study's report and plots (omission_study.py). scripts/ runs them."""
