"""The demos' result tables: written to JSON beside the run, and printed."""
import json
import time
from pathlib import Path


def finish(table: dict, start: float, path: Path, title: str, columns: list[tuple[str, str, int, int]],
           note_key: str | None = None) -> dict:
    """Add the wall time to `table` ({policy: {metric: value}}), write it to `path` as JSON and print
    it: one row per policy, columns (metric key, header, width, decimals), then `note_key`'s
    value (an example response) if given."""
    table["wall_s"] = time.perf_counter() - start
    path.write_text(json.dumps(table, indent=2) + "\n")
    name_width = max(len(name) for name in table) + 2
    print(f"\n{title}")
    print(f"{'policy':<{name_width}}" + "".join(f"{header:>{width}}" for _, header, width, _ in columns))
    for name, row in table.items():
        if name == "wall_s":
            continue
        line = f"{name:<{name_width}}" + "".join(f"{row[key]:>{width}.{decimals}f}" for key, _, width, decimals in columns)
        print(line + (f"   e.g. {row[note_key]!r}" if note_key else ""))
    print(f"wall time {table['wall_s']:.0f} s")
    return table
