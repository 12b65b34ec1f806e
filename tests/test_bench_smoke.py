"""The benchmark runs end to end (``bench/run.py --smoke``) and prints its table.

Only that it runs: no figure is checked, timings depend on the machine. It needs the
same real Redis as the other tests and no Postfix (``--smoke`` never uses it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"


def test_bench_smoke_prints_a_table(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--wait-quiet", "0", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| scenario | W |" in done.stdout
    assert "| transactional, 1 rcpt" in done.stdout
    assert list(tmp_path.glob("bench-*.json"))
