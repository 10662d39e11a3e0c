"""The switch, run exactly as ``python -m switch run --config FILE``, plus a heap probe
for the memory benchmark.

RSS cannot show what bindings cost: loading a large configuration leaves hundreds of
MiB of freed heap that CPython keeps and later reuses. So the probe traces allocations:

- SIGUSR1 starts ``tracemalloc`` (only what is allocated from then on is traced);
- SIGUSR2 writes, to the file named by ``$BENCH_HEAP_REPORT``, the bytes still traced
  (total and per source file, e.g. switch/location.py for the bindings), then stops
  tracing.

Usage: python tests/bench/heap_probe.py --config FILE
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import tracemalloc
from pathlib import Path

REPORT_ENV = "BENCH_HEAP_REPORT"
TOP_FILES = 12


def _start(_signum, _frame) -> None:
    if not tracemalloc.is_tracing():
        tracemalloc.start(1)


def _report(_signum, _frame) -> None:
    destination = os.environ.get(REPORT_ENV)
    if not tracemalloc.is_tracing() or not destination:
        return
    current, peak = tracemalloc.get_traced_memory()
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    by_file = snapshot.statistics("filename")
    report = {
        "traced_bytes": current,
        "traced_peak_bytes": peak,
        "by_file": [
            {"file": _short(stat.traceback[0].filename), "bytes": stat.size,
             "blocks": stat.count}
            for stat in by_file[:TOP_FILES]
        ],
    }
    temporary = Path(destination + ".tmp")
    temporary.write_text(json.dumps(report, indent=1))
    temporary.replace(destination)


def _short(filename: str) -> str:
    if "/site-packages/" in filename:
        return filename.split("/site-packages/", 1)[1]
    standard_library = re.search(r"/lib/python3\.\d+/(.*)$", filename)
    if standard_library:
        return standard_library.group(1)
    repository = str(Path(__file__).resolve().parents[2]) + "/"
    return filename.removeprefix(repository)


def main() -> int:
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _report)
    # run as a script, this folder is sys.path[0]: its fairuse.py would shadow the
    # project's fairuse package the switch imports
    here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    from switch.cli import main as switch_main

    return switch_main(["run", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
