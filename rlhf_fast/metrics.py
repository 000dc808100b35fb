"""Metrics: namespaced keys (`ppo/clipfrac`, `mem/peak_gb`) to JSONL, TensorBoard and a PNG plot."""
import json
import math
from pathlib import Path


class MetricsLogger:
    """Appends one JSON object per logged step to <dir>/metrics.jsonl; TensorBoard when installed.

    Rows are strict JSON: a NaN or inf value is written as null. `resumed_at` (the step a resumed
    run continues from) drops the rows an interrupted session logged after that step, so a resumed
    run's file holds each step once. With write=False (the ranks of a torchrun run but rank 0)
    rows are kept in `history` and nothing is written.
    """

    def __init__(self, output_dir, tensorboard: bool = True, resumed_at: int | None = None, write: bool = True):
        self.dir = Path(output_dir)
        self.path = self.dir / "metrics.jsonl"
        self.history: list[dict] = []
        self.write = write
        self._tb = None
        if not write:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if resumed_at is not None and _step_of(line) <= resumed_at]
            self.path.write_text("".join(line + "\n" for line in kept))
            self.history = [json.loads(line) for line in kept]
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:
                pass

    def log(self, step: int, metrics: dict) -> dict:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(row)
        if not self.write:
            return row
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        return row

    def close(self, plot_name: str = "curves.png") -> Path | None:
        if self._tb is not None:
            self._tb.close()
        if not self.write:
            return None
        return plot_curves(self.history, self.dir / plot_name)


def _plain(value):
    """A JSON-ready number: tensors as Python scalars, NaN and inf as None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", math.inf)
    except ValueError:
        return math.inf  # a torn last line from a killed session


def plot_curves(history: list[dict], path: Path) -> Path | None:
    """One small panel per numeric key; None when matplotlib is not installed or nothing to plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = sorted({k for row in history for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float))})
    if not keys:
        return None
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
        ax.plot(*zip(*points))
        ax.set_title(key, fontsize=9)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
