"""Benchmarks of the softswitch against real SIP load generators (``make bench``).

Run with ``python -m tests.bench`` (``--quick`` for a smoke run, ``--only`` to pick
scenarios); results go to ``bench-results/``. Never collected by ``make test``.
All traffic stays on 127.0.0.1 and every process started here is stopped by its PID.
See docs/benchmarks.md.
"""
