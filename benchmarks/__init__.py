"""kissbot's benchmarks: each hot path timed against raw sqlite3 + Fernet in the same run.

Run ``python -m benchmarks`` from the checkout (see :mod:`benchmarks.run`).
"""
