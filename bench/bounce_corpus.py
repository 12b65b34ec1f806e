"""Score the bounce reader on a labelled corpus: immediate suppression and reasons.

    python3 bench/bounce_corpus.py [DIR ...]      (default: tests/data/bounces)

Each DIR holds ``*.eml`` samples and a ``manifest.tsv`` with one row per expected
recipient: ``file  kind  recipient  reason  decision`` (``-`` for a sample that names
nobody). ``decision`` is ``suppress`` (at once), ``count`` (toward a threshold),
``never`` (counted only), ``delayed`` or ``ignore``. Prints precision and recall of
immediate suppression (a hard bounce or a complaint, under the default thresholds),
recipients found / missed / invented, and a confusion table of reasons (expected in
rows, read in columns), then every disagreement.

``--scaling`` also times ``parse`` on hostile bounces of 1, 2, 4 and 8 MB (one long
line of address-like runs, and a listing of many addresses): the time per MB should stay
flat, as every scan is linear and bounded.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.config import BounceThresholds  # noqa: E402
from relay.feedback.bounces import Classifier, parse, readings  # noqa: E402


@dataclass(frozen=True, slots=True)
class Row:
    file: str
    kind: str
    recipient: str
    reason: str
    decision: str


SHORT = {
    "user-unknown": "user",
    "host-unknown": "host",
    "mailbox-full": "full",
    "too-big": "big",
    "filtered": "filter",
    "blocked": "block",
    "suspended": "susp",
    "expired": "expired",
    "rate-limited": "rate",
    "system-error": "system",
    "network-error": "network",
    "complaint": "compl",
}
"""Column heads of the confusion table."""


def load(directory: Path) -> list[Row]:
    rows = []
    for line in (directory / "manifest.tsv").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            rows.append(Row(*line.split("\t")))
    return rows


def decision_of(verdict: str, thresholds: BounceThresholds) -> str:
    if verdict == "complaint":
        return "suppress"
    if verdict in ("hard", "soft", "policy", "unknown"):
        n = thresholds.of(verdict)  # type: ignore[arg-type]
        return "suppress" if n == 1 else "never" if n == 0 else "count"
    return "delayed" if verdict == "delayed" else "ignore"


def own(address: str) -> bool:
    """The corpus's return-path domain (the relay's own addresses in its config)."""
    return address.endswith("@bounce.example.com")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="*", type=Path, default=[ROOT / "tests/data/bounces"])
    ap.add_argument("--scaling", action="store_true", help="also time hostile inputs")
    args = ap.parse_args()
    if args.scaling:
        scaling()
    classifier, thresholds = Classifier(), BounceThresholds()
    tp = fp = fn = 0
    found = missed = invented = kinds_wrong = 0
    confusion: Counter[tuple[str, str]] = Counter()
    wrong: list[str] = []
    files = 0
    for directory in args.dirs:
        rows = load(directory)
        by_file: dict[str, list[Row]] = {}
        for r in rows:
            by_file.setdefault(r.file, []).append(r)
        missing = sorted({p.name for p in directory.glob("*.eml")} - set(by_file))
        if missing:
            print(f"no manifest row for: {', '.join(missing)}", file=sys.stderr)
            return 2
        for name, expected in sorted(by_file.items()):
            files += 1
            report = parse((directory / name).read_bytes())
            if report.kind != expected[0].kind:
                kinds_wrong += 1
                wrong.append(f"{name}: kind {report.kind}, expected {expected[0].kind}")
            got = {r.recipient: r for r in readings(report, classifier, own)}
            want = {r.recipient: r for r in expected if r.recipient != "-"}
            for rcpt, row in want.items():
                reading = got.get(rcpt)
                got_decision = decision_of(reading.verdict, thresholds) if reading else "ignore"
                got_reason = reading.reason if reading else "(none)"
                found += reading is not None
                missed += reading is None
                confusion[(row.reason, got_reason)] += 1
                tp += row.decision == "suppress" and got_decision == "suppress"
                fn += row.decision == "suppress" and got_decision != "suppress"
                fp += row.decision != "suppress" and got_decision == "suppress"
                if (got_reason, got_decision) != (row.reason, row.decision):
                    why = reading.evidence if reading else "not found"
                    wrong.append(
                        f"{name}: {rcpt} read {got_reason}/{got_decision}, expected"
                        f" {row.reason}/{row.decision} [{why}]"
                    )
            for rcpt, reading in got.items():
                if rcpt not in want:
                    invented += 1
                    fp += decision_of(reading.verdict, thresholds) == "suppress"
                    wrong.append(f"{name}: {rcpt} read but not expected [{reading.evidence}]")
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    print(f"samples {files}, expected recipients {found + missed}")
    print(
        f"immediate suppression: precision {precision:.3f} recall {recall:.3f}"
        f" (tp {tp}, fp {fp}, fn {fn})"
    )
    print(
        f"recipients found {found}, missed {missed}, invented {invented};"
        f" report kind wrong {kinds_wrong}"
    )
    reasons = sorted({e for e, _ in confusion} | {g for _, g in confusion})
    width = max(len(r) for r in reasons) if reasons else 8
    short = {r: SHORT.get(r, r[:7]) for r in reasons}
    print("\nconfusion (rows: expected reason, columns: read)")
    print(" " * width + " " + " ".join(f"{short[r]:>7}" for r in reasons))
    for e in reasons:
        if any(confusion[(e, g)] for g in reasons):
            cells = " ".join(f"{confusion[(e, g)] or '.':>7}" for g in reasons)
            print(f"{e:<{width}} {cells}")
    if wrong:
        print("\ndisagreements:")
        for w in wrong:
            print("  " + w)
    return 0


def scaling() -> None:
    head = (
        b"From: MAILER-DAEMON@mx.example.org\r\nSubject: Undelivered Mail\r\n\r\n"
        b"The following address(es) failed:\r\n\r\n"
    )
    shapes = {
        "one line of x@x": lambda n: b"x@" * (n // 2),
        "one line of <<< 550": lambda n: b"<<< 550 " * (n // 8),
        "lines of addresses": lambda n: b"".join(
            b"  user%d@example.org: 550 5.1.1 user unknown\r\n" % i for i in range(n // 45)
        ),
    }
    print("parse time of hostile bounces (ms; ms per MB)")
    for name, make in shapes.items():
        cells = []
        for mb in (1, 2, 4, 8):
            data = head + make(mb * 1_000_000)
            start = time.perf_counter()
            parse(data)
            ms = (time.perf_counter() - start) * 1000
            cells.append(f"{mb} MB {ms:7.1f} ({ms / mb:5.1f}/MB)")
        print(f"  {name:<22} " + "  ".join(cells))
    print()


if __name__ == "__main__":
    raise SystemExit(main())
