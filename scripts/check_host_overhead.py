"""Compare the host-cost benchmark of this run with a stored baseline, as ratios that do not depend on the machine.

    python scripts/check_host_overhead.py BASELINE.json CURRENT.json [CURRENT2.json ...] [--limit 1.5]

Every file is pytest-benchmark JSON from ``benchmarks/host``. Each group holds a native torch call and the
library's call for the same operation, measured in the same run. Absolute times move with the machine (a CI
runner of the same CPU model can be twice as slow as the one that stored the baseline, and a noisy neighbour
slows everything), so what is compared is each group's *overhead factor*, the library's fastest round over the
native call's fastest round, in this run against the baseline's. The fastest round is the statistic least moved
by a busy machine (noise only adds time); with several current runs a group takes its lowest factor, since noise
that hits one side of a pair in one run seldom hits it again in the next, while a real regression shows in each.
A factor that grew by more than ``--limit`` fails (exit 1); a group missing from either side is reported, never
counted as a pass.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_LIMIT = 1.5


STAT = "min"


def overhead_factors(report: dict[str, Any]) -> dict[str, float]:
    """Per group: the library call's fastest round over the native call's (groups with both sides only)."""
    medians: dict[str, dict[str, float]] = {}
    for bench in report.get("benchmarks", []):
        name = bench["name"]  # test_host_cost[native-add], test_dispatch_only[ours], ...
        side = "native" if "[native" in name else "ours" if "[ours" in name else None
        if side is None:
            continue
        medians.setdefault(bench["group"], {})[side] = float(bench["stats"][STAT])
    factors: dict[str, float] = {}
    for group, sides in medians.items():
        if "native" in sides and "ours" in sides and sides["native"] > 0:
            factors[group] = sides["ours"] / sides["native"]
    return factors


def compare(
    baseline: dict[str, Any], current: list[dict[str, Any]], limit: float = DEFAULT_LIMIT
) -> tuple[list[str], list[str]]:
    """Return (table lines, failures). A failure is a group whose lowest factor over the ``current`` runs grew more
    than ``limit`` times over the baseline's, or a group of the baseline that no current run measured."""
    if limit <= 1.0:
        raise ValueError(f"limit must be above 1.0 (a growth factor), got {limit}")
    if not current:
        raise ValueError("no current run to compare with the baseline")
    before = overhead_factors(baseline)
    now: dict[str, float] = {}
    for report in current:
        for group, factor in overhead_factors(report).items():
            now[group] = min(factor, now.get(group, factor))
    lines = [f"{'group':<26} {'baseline':>9} {'now':>9} {'growth':>7}"]
    failures: list[str] = []
    for group in sorted(set(before) | set(now)):
        if group not in now:
            failures.append(f"{group}: in the baseline but not measured in this run")
            continue
        if group not in before:
            lines.append(f"{group:<26} {'-':>9} {now[group]:>8.2f}x {'new':>7}")
            continue
        growth = now[group] / before[group]
        lines.append(f"{group:<26} {before[group]:>8.2f}x {now[group]:>8.2f}x {growth:>6.2f}x")
        if growth > limit:
            failures.append(
                f"{group}: the library's call costs {now[group]:.2f}x the native call, against {before[group]:.2f}x "
                f"in the baseline ({growth:.2f}x growth, limit {limit}x)"
            )
    return lines, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("baseline", type=Path, help="stored pytest-benchmark JSON")
    parser.add_argument("current", type=Path, nargs="+", help="this run's pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--limit", type=float, default=DEFAULT_LIMIT, help="largest allowed growth of a factor")
    args = parser.parse_args(argv)
    reports = []
    for path in (args.baseline, *args.current):
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            parser.error(f"cannot read {path}: {exc}")
    lines, failures = compare(reports[0], reports[1:], args.limit)
    print(f"host overhead factor (library call / native call, fastest rounds of one run; best of {len(reports) - 1}):")
    print("\n".join(lines))
    if failures:
        print("\nhost-cost regression:\n  " + "\n  ".join(failures))
        return 1
    print(f"\nno factor grew more than {args.limit}x over the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
