"""The results table in bench/README.md and README.md, generated from bench/results/*.json.

Every results file holds one bench on one device. A CPU run cannot measure the GPU shapes, so it
writes placeholder rows for them ("not run: no CUDA device"); once a GPU file measures such a row,
the placeholder is dropped rather than listed beside the figures. A placeholder that no GPU file
covers stays, so the table shows what has never been measured anywhere; and where a file measured
a provider at some shapes of a mode but not at others, the missing ones get "not run" rows too.
No torch import: the table is plain JSON to markdown.
"""
import json
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
READMES = (BENCH_DIR / "README.md", BENCH_DIR.parent / "README.md")  # both carry the same table
TABLE_BEGIN, TABLE_END = "<!-- results:begin -->", "<!-- results:end -->"
HEADER = ["bench", "device", "shape", "mode", "provider", "median ms (p20-p80)", "peak MB", "rate", "status"]

# shape labels spell dtypes two ways ("bf16" in placeholders, "bfloat16" in measured rows)
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def shape_key(label: str) -> str:
    """A shape label without the "(GPU)" note placeholders carry and with one dtype spelling, so that
    "N=8192 D=4096 V=128256 bf16 (GPU)" and "N=8192 D=4096 V=128256 bfloat16" compare equal."""
    return " ".join(_DTYPE_ALIASES.get(word, word) for word in label.replace("(GPU)", "").split())


def is_measured(row: dict) -> bool:
    return row.get("median_ms") is not None


def is_gpu_placeholder(row: dict) -> bool:
    """A row a CPU run wrote for work that needs CUDA: no figures, a status naming CUDA."""
    return not is_measured(row) and "CUDA" in row.get("status", "")


def is_gpu_result(result: dict) -> bool:
    return not result["device"].startswith("CPU")  # bench.common.device_name starts CPUs with "CPU"


def load_results(results_dir: Path = RESULTS_DIR) -> list[dict]:
    """Every results file, in file-name order (a bench's devices side by side)."""
    return [json.loads(path.read_text()) for path in sorted(results_dir.glob("*.json"))]


def _gpu_measured(results: list[dict]) -> set[tuple[str, str, str, str]]:
    """(bench, shape key, mode, provider) of every row some GPU measured."""
    return {(result["bench"], shape_key(row.get("shape", "")), row.get("mode", ""), row["provider"])
            for result in results if is_gpu_result(result) for row in result["rows"] if is_measured(row)}


def _covered(bench: str, row: dict, measured: set) -> bool:
    """Whether a GPU measured what the placeholder stands for; "fwd, fwd+bwd" / "all" are wildcards."""
    shape, modes = shape_key(row.get("shape", "")), row.get("mode", "").split(", ")
    return any(b == bench and s == shape and m in modes and row["provider"] in ("all", p)
               for b, s, m, p in measured)


def _ms(x: float) -> str:
    """Milliseconds to the microsecond, or to 4 significant digits below 1 ms (0.01747)."""
    return f"{x:.3f}" if x >= 1 else f"{x:.4g}"


def _cells(result: dict, row: dict) -> list[str]:
    timing = ""
    if is_measured(row):
        timing = f"{_ms(row['median_ms'])} ({_ms(row['p20_ms'])}-{_ms(row['p80_ms'])})"
    # a placeholder names the GPU it waits for, not the CPU that wrote it
    device = row.get("device") or ("CUDA GPU" if is_gpu_placeholder(row) else result["device"])
    peak = "" if row.get("peak_mb") is None else f"{row['peak_mb']:.1f}"
    return [result["bench"], device, row.get("shape", ""), row.get("mode", ""), row["provider"], timing,
            peak, row.get("rate", ""), row.get("status", "ok")]


def with_gaps(rows: list[dict]) -> list[dict]:
    """rows, plus a "not run" row after each measured (shape, mode) group for every provider that
    the same file measured in that mode at another shape but has no row for here (a skipped run)."""
    providers, present, measured = {}, {}, set()
    for row in rows:
        group = (row.get("shape", ""), row.get("mode", ""))
        present.setdefault(group, set()).add(row["provider"])
        if is_measured(row):
            providers.setdefault(group[1], []).append(row["provider"])
            measured.add(group)
    out = []
    for i, row in enumerate(rows):
        out.append(row)
        group = (row.get("shape", ""), row.get("mode", ""))
        last_of_group = i + 1 == len(rows) or (rows[i + 1].get("shape", ""), rows[i + 1].get("mode", "")) != group
        if not (last_of_group and group in measured):
            continue
        for name in dict.fromkeys(providers[group[1]]):  # first-seen order, once each
            if name not in present[group]:
                out.append({"shape": group[0], "mode": group[1], "provider": name, "status": "not run"})
                present[group].add(name)
    return out


def render(results: list[dict]) -> str:
    """The markdown table of every row, less the placeholders a GPU run has since measured."""
    measured = _gpu_measured(results)
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for result in results:
        for row in with_gaps(result["rows"]):
            if is_gpu_placeholder(row) and _covered(result["bench"], row, measured):
                continue
            lines.append("| " + " | ".join(_cells(result, row)) + " |")
    return "\n".join(lines)


def regenerate_table(results_dir: Path = RESULTS_DIR, readmes=READMES) -> None:
    """Rewrite the block between the results markers in each README (a README without them is left)."""
    table = render(load_results(results_dir))
    for readme in readmes:
        text = readme.read_text()
        if TABLE_BEGIN in text:
            head, _, rest = text.partition(TABLE_BEGIN)
            _, _, tail = rest.partition(TABLE_END)
            readme.write_text(f"{head}{TABLE_BEGIN}\n{table}\n{TABLE_END}{tail}")
