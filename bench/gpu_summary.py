"""The summary scripts/gpu_check.sh prints last: test counts, each step's outcome, each target's verdict.

    python -m bench.gpu_summary --device h100-80gb-hbm3 --log-dir DIR [--since UNIX_TIME]

Reads DIR/pytest.xml (pytest's --junitxml) and DIR/steps.tsv (one "name<TAB>status<TAB>seconds<TAB>note"
line per step, written by gpu_check.sh), and bench/results/*-<device>.json through bench.targets,
ignoring results files older than --since (the check's start), so a failed bench never shows an
earlier run's figures. No torch import.
"""
import argparse
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from bench import targets
from bench.table import RESULTS_DIR

MAX_FAILED_LISTED = 12


def pytest_counts(junit: Path) -> dict | None:
    """{"passed", "failed", "errors", "skipped", "failed_tests"} from a JUnit XML file, or None."""
    if not junit.exists():
        return None
    try:
        root = ET.parse(junit).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    count = Counter()
    for suite in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            count[key] += int(suite.get(key, 0))
    failed = [f"{case.get('classname', '')}::{case.get('name', '')}"
              for suite in suites for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    return {"passed": passed, "failed": count["failures"], "errors": count["errors"],
            "skipped": count["skipped"], "failed_tests": failed}


def read_steps(path: Path) -> list[tuple[str, str, str, str]]:
    """(name, status, seconds, note) per step, in the order they ran."""
    if not path.exists():
        return []
    return [tuple((line.split("\t") + ["", "", ""])[:4]) for line in path.read_text().splitlines() if line]


def summary(device: str, log_dir: Path, results_dir: Path = RESULTS_DIR, since: float | None = None) -> list[str]:
    lines = [f"==== gpu_check summary: {device} (logs in {log_dir}) ===="]
    steps = read_steps(log_dir / "steps.tsv")
    tests = pytest_counts(log_dir / "pytest.xml")
    if tests is None:
        lines.append(f"tests: no result (pytest wrote no {log_dir / 'pytest.xml'}): see {log_dir / 'pytest.log'}")
    else:
        stopped = any(name == "pytest" and status == "timeout" for name, status, _, _ in steps)
        lines.append(f"tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped (pytest on CUDA"
                     f"{'; stopped at its time limit, so the counts are partial' if stopped else ''})")
        for name in tests["failed_tests"][:MAX_FAILED_LISTED]:
            lines.append(f"  failed: {name}")
        if len(tests["failed_tests"]) > MAX_FAILED_LISTED:
            lines.append(f"  ... and {len(tests['failed_tests']) - MAX_FAILED_LISTED} more: see "
                         f"{log_dir / 'pytest.log'}")
    lines.append("steps:")
    for name, status, seconds, note in steps:
        took = f"{seconds:>4} s" if seconds else "      "
        lines.append(f"  {name:<20}{status:<10}{took}  {note}".rstrip())
    verdicts = targets.check(device, results_dir, since)
    tally = Counter(verdict.status for verdict in verdicts)
    lines.append(f"targets (bench/targets.py; bench/results/*-{device}.json written by this run): "
                 f"{tally[targets.MET]} met, {tally[targets.NOT_MET]} not met, "
                 f"{tally[targets.NOT_MEASURED]} not measured")
    lines += ["  " + verdict.line() for verdict in verdicts]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", required=True, help="the results file suffix (bench.common.device_slug)")
    parser.add_argument("--log-dir", type=Path, required=True)
    parser.add_argument("--since", type=float, help="ignore results files last written before this Unix time")
    args = parser.parse_args(argv)
    print("\n".join(summary(args.device, args.log_dir, since=args.since)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
