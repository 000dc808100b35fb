"""The project's speed and memory targets (its design document's), checked against
bench/results/<bench>-<device>.json.

Each target reads measured rows only. Where a row it needs is absent, or two peaks do not count the
same thing, the verdict is "not measured" with the reason: never an estimate. No torch import, so
the check runs anywhere on the JSON files.

    python -m bench.targets [DEVICE ...]   # results file suffixes: h200, h100-80gb-hbm3, cpu; default all

Targets (the design document's "Speed and memory targets"):
  GPU, N=8192 D=4096 V=128256 bf16 -- token_logprobs fwd <= 1.10x and fwd+bwd <= 1.40x the cuBLAS
  floor (1 and 3 GEMMs, bench/logprobs.py); the loss heads linear_ppo_loss and linear_nll_loss fwd+bwd
  <= 1.15x that floor, faster than eager, torch.compile, Liger-Kernel and cut-cross-entropy, extra
  memory under 2% of eager's (bench/linear_ppo.py, and bench/logprobs.py's "nll fwd+bwd" mode for
  the NLL and the peers); gae 512x4096 over 50% of the measured copy bandwidth and 500x+ TRL's
  Python loop (bench/gae.py); PPO end to end (bench/ppo_step.py).
  CPU, N=4096 D=512 V=32000 -- token_logprobs, linear_nll_loss and linear_ppo_loss peak RSS under 20%
  of eager's and no slower; PPO <= 0.5x TRL.

bench/ppo_step.py's rows are read as: mode "iteration" or "rollout", provider "rlhf_fast ppo" or
"trl PPOTrainer 0.29.1" (PPO_OURS, PPO_TRL), the shape label naming the model shape ("Llama-3.2-1B",
"Llama-3.1-8B", "tiny" on the CPU), median_ms and peak_mb per row.
"""
import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from bench.table import RESULTS_DIR, is_measured, shape_key

HEAD_SHAPE = "N=8192 D=4096 V=128256 bfloat16"
CPU_HEAD_SHAPE = "N=4096 D=512 V=32000 float32"
GAE_SHAPE = "512x4096 fp32"
# bench/gae.py's bytes per token (read rewards, values fp32 and the bool mask; write A, R fp32), for
# results written before it recorded bytes_per_token itself (their rate_formula states the same 17)
GAE_BYTES_PER_TOKEN = 4 + 4 + 1 + 4 + 4
MB_PER_GIB = 1024

MET, NOT_MET, NOT_MEASURED = "met", "not met", "not measured"


@dataclass(frozen=True)
class Verdict:
    target: str                # what DESIGN.md asks, in short
    status: str                # MET | NOT_MET | NOT_MEASURED
    figure: str                # the measured figures and the margin, or why there are none
    sources: tuple[str, ...]   # the results files read

    def line(self) -> str:
        files = f"  [{', '.join(self.sources)}]" if self.sources else ""
        return f"{self.status.upper():<13}{self.target}: {self.figure}{files}"


class Results:
    """The results files of one device, by bench; a file older than `since` (a Unix time) counts
    as absent, so that a check after a failed bench never reads an earlier run's figures."""

    def __init__(self, device: str, results_dir: Path = RESULTS_DIR, since: float | None = None):
        self.device, self.dir, self.since = device, Path(results_dir), since
        self._parsed = {}

    def name(self, bench: str) -> str:
        return f"{bench}-{self.device}.json"

    def get(self, bench: str) -> dict | None:
        path = self.dir / self.name(bench)
        if not path.exists() or (self.since is not None and path.stat().st_mtime < self.since):
            return None
        if bench not in self._parsed:
            self._parsed[bench] = json.loads(path.read_text())
        return self._parsed[bench]

    def missing(self, bench: str) -> str:
        path = self.dir / self.name(bench)
        if path.exists():
            return f"{self.name(bench)} was not written by this run"
        return f"no {self.name(bench)}"

    def row(self, bench: str, mode: str, provider: str, shape: str) -> dict | None:
        """The measured row; `shape` is matched whole (after bench.table.shape_key), or, prefixed
        with "~", as a part of the label."""
        result = self.get(bench)
        for row in (result or {}).get("rows", []):
            label = shape_key(row.get("shape", ""))
            hit = shape[1:] in label if shape.startswith("~") else label == shape_key(shape)
            if hit and row.get("mode") == mode and row.get("provider") == provider and is_measured(row):
                return row
        return None


def _num(x: float) -> str:
    """A measured figure at a precision that shows it: 10958, 60.97, 0.0175."""
    return f"{x:.0f}" if x >= 1000 else f"{x:.2f}" if x >= 1 else f"{x:.3g}"


def _pct(x: float) -> str:
    return f"{x:.2%}" if abs(x) < 0.01 else f"{x:.0%}"


def _limit(x: float) -> str:
    """A limit as DESIGN.md writes it: 1.10x, 500x."""
    return f"{x:.2f}" if x < 10 else f"{x:g}"


def _margin(value: float, limit: float, at_most: bool) -> str:
    """How far a ratio is from its limit, in words."""
    if at_most:
        return f"{_pct(1 - value / limit)} under" if value <= limit else f"{_pct(value / limit - 1)} over"
    return f"{value / limit:.1f}x the target" if value >= limit else f"{_pct(1 - value / limit)} short"


def _absent(target: str, results: Results, needs: list[tuple[str, str, str, str]]) -> Verdict:
    """NOT_MEASURED naming the first row (bench, mode, provider, shape) that is not there."""
    for bench, mode, provider, shape in needs:
        if results.get(bench) is None:
            return Verdict(target, NOT_MEASURED, results.missing(bench), ())
        if results.row(bench, mode, provider, shape) is None:
            return Verdict(target, NOT_MEASURED, f"no measured {provider!r} {mode} row at {shape.lstrip('~')}",
                           (results.name(bench),))
    raise AssertionError("every row is present")


def ratio_target(results, target, top, bottom, limit, what="ms", field="median_ms", at_most=True, strict=False,
                 percent=False):
    """top / bottom against limit: each of top, bottom is (bench, mode, provider, shape); `percent`
    states the ratio and the limit as percentages (a share of eager's memory)."""
    a, b = results.row(*top), results.row(*bottom)
    if a is None or b is None:
        return _absent(target, results, [top, bottom])
    ratio = a[field] / b[field]
    if at_most:
        met = ratio < limit if strict else ratio <= limit
    else:
        met = ratio > limit if strict else ratio >= limit
    relation = ("<" if at_most else ">") + ("" if strict else "=")
    if percent:
        shown = f"{ratio:.1%} ({_num(a[field])} / {_num(b[field])} {what}), target {relation} {limit:.0%}, "
        figure = shown + f"{(ratio - limit) * 100:+.1f} points"
    else:
        figure = (f"{_num(ratio)}x ({_num(a[field])} / {_num(b[field])} {what}), target {relation} "
                  f"{_limit(limit)}x, {_margin(ratio, limit, at_most)}")
    return Verdict(target, MET if met else NOT_MET, figure, tuple(dict.fromkeys(
        (results.name(top[0]), results.name(bottom[0])))))


# --- GPU --------------------------------------------------------------------------------------------

def floor(mode):
    return ("logprobs", mode, "cublas-floor", HEAD_SHAPE)


def token_logprobs_targets(results):
    return [ratio_target(results, f"token_logprobs {mode} within {limit:.2f}x of the cuBLAS floor",
                         ("logprobs", mode, "ours", HEAD_SHAPE), floor(mode), limit)
            for mode, limit in (("fwd", 1.10), ("fwd+bwd", 1.40))]


OURS_HEAD = ("linear_ppo", "fwd+bwd", "ours (linear_ppo_loss)", HEAD_SHAPE)
NLL_MODE = "nll fwd+bwd"  # bench/logprobs.py's mean cross-entropy loss and its backward
# Where each competitor of the loss head is read, first found wins. linear_ppo's eager and
# torch.compile do the loss's whole work; logprobs' "+entropy" rows do the head and the entropy
# without the PPO loss, and Liger's and cut-cross-entropy's rows are cross-entropy alone (no entropy):
# less work than ours, so beating them is conclusive and losing to them is stated as such.
_NO_LOSS = "its log-probs + entropy, without the PPO loss"
_CE_ONLY = "its cross-entropy alone: no entropy, no PPO loss"
COMPETITORS = {
    "eager": [(("linear_ppo", "fwd+bwd", "eager", HEAD_SHAPE), ""),
              (("logprobs", "fwd+bwd +entropy", "eager", HEAD_SHAPE), _NO_LOSS)],
    "torch.compile": [(("linear_ppo", "fwd+bwd", "torch.compile", HEAD_SHAPE), ""),
                      (("logprobs", "fwd+bwd +entropy", "torch.compile", HEAD_SHAPE), _NO_LOSS)],
    "Liger-Kernel": [(("logprobs", NLL_MODE, "liger", HEAD_SHAPE), _CE_ONLY),
                     (("logprobs", "fwd+bwd", "liger", HEAD_SHAPE), _CE_ONLY)],
    "cut-cross-entropy": [(("logprobs", NLL_MODE, "cut-cross-entropy", HEAD_SHAPE), _CE_ONLY),
                          (("logprobs", "fwd+bwd", "cut-cross-entropy", HEAD_SHAPE), _CE_ONLY)],
}
# linear_nll_loss against the same loss from each competitor, in one bench/logprobs.py run
NLL_PEERS = {"eager": "eager", "torch.compile": "torch.compile", "Liger-Kernel": "liger",
             "cut-cross-entropy": "cut-cross-entropy"}


def _competitor(results, name):
    """(key, note) of the first measured competitor row, or (the first key, None)."""
    for key, note in COMPETITORS[name]:
        if results.row(*key) is not None:
            return key, note
    return COMPETITORS[name][0][0], None


def loss_head_targets(results):
    verdicts = [ratio_target(results, "linear_ppo_loss fwd+bwd within 1.15x of the cuBLAS floor", OURS_HEAD,
                             floor("fwd+bwd"), 1.15)]
    for name, candidates in COMPETITORS.items():
        key, note = _competitor(results, name)
        target = f"linear_ppo_loss fwd+bwd faster than {name}"
        if note is None and results.row(*OURS_HEAD) is not None:
            tried = " nor ".join(f"{bench} {mode}" for (bench, mode, _, _), _ in candidates)
            verdicts.append(Verdict(target, NOT_MEASURED, f"no measured {name} row in {tried}",
                                    tuple(dict.fromkeys(results.name(k[0]) for k, _ in candidates))))
            continue
        verdict = ratio_target(results, target, OURS_HEAD, key, 1.0, strict=True)
        if note:
            verdict = Verdict(verdict.target, verdict.status, f"{verdict.figure} (against {note})", verdict.sources)
        verdicts.append(verdict)
    verdicts.append(loss_head_memory(results))
    return verdicts


def loss_head_memory(results):
    """Peaks compare only when they count the same thing: one file, or one recorded peak_basis."""
    target = "linear_ppo_loss extra memory under 2% of eager's"
    key, note = _competitor(results, "eager")
    ours, eager = results.row(*OURS_HEAD), results.row(*key)
    if ours is None or eager is None:
        return _absent(target, results, [OURS_HEAD, key])
    sources = tuple(dict.fromkeys((results.name(OURS_HEAD[0]), results.name(key[0]))))
    bases = {results.get(bench).get("peak_basis") for bench in (OURS_HEAD[0], key[0])}
    if key[0] != OURS_HEAD[0] and (len(bases) != 1 or None in bases):
        return Verdict(target, NOT_MEASURED, "the two files do not record one peak_basis "
                       "(bench.common.CUDA_PEAK_BASIS), so their peaks may count different things: "
                       "rerun bench.linear_ppo", sources)
    verdict = ratio_target(results, target, OURS_HEAD, key, 0.02, what="MB", field="peak_mb", strict=True,
                           percent=True)
    return Verdict(target, verdict.status, verdict.figure + (f" (against {note})" if note else ""), sources)


def nll_targets(results):
    """linear_nll_loss (bench/logprobs.py's "nll fwd+bwd" rows): the floor, each peer, the memory."""
    ours = ("logprobs", NLL_MODE, "ours", HEAD_SHAPE)
    verdicts = [ratio_target(results, "linear_nll_loss fwd+bwd within 1.15x of the cuBLAS floor", ours,
                             ("logprobs", NLL_MODE, "cublas-floor", HEAD_SHAPE), 1.15)]
    for name, provider in NLL_PEERS.items():
        verdicts.append(ratio_target(results, f"linear_nll_loss fwd+bwd faster than {name}", ours,
                                     ("logprobs", NLL_MODE, provider, HEAD_SHAPE), 1.0, strict=True))
    verdicts.append(ratio_target(results, "linear_nll_loss extra memory under 2% of eager's", ours,
                                 ("logprobs", NLL_MODE, "eager", HEAD_SHAPE), 0.02, what="MB", field="peak_mb",
                                 strict=True, percent=True))
    return verdicts


def gae_targets(results):
    bandwidth = "gae 512x4096 over 50% of the measured copy bandwidth"
    triton = ("gae", "gae", "ours (triton)", GAE_SHAPE)
    verdicts = []
    row, result = results.row(*triton), results.get("gae")
    if row is None or not result.get("copy_gbs"):
        verdicts.append(_absent(bandwidth, results, [triton]) if row is None else
                        Verdict(bandwidth, NOT_MEASURED, "no copy_gbs in the results", (results.name("gae"),)))
    else:
        tokens = result["shape"]["B"] * result["shape"]["T"]
        gbs = tokens * result.get("bytes_per_token", GAE_BYTES_PER_TOKEN) / row["median_ms"] / 1e6
        share = gbs / result["copy_gbs"]
        margin = f"{(share - 0.5) * 100:+.1f} points"
        verdicts.append(Verdict(bandwidth, MET if share > 0.5 else NOT_MET,
                                f"{share:.1%} ({gbs:.0f} of {result['copy_gbs']:.0f} GB/s), target > 50%, {margin}",
                                (results.name("gae"),)))
    verdicts.append(ratio_target(results, "gae 512x4096 500x+ faster than TRL's Python loop",
                                 ("gae", "gae", "python loop (TRL)", GAE_SHAPE), triton, 500, at_most=False))
    return verdicts


# bench/ppo_step.py's provider names (the TRL release DESIGN.md's PPO targets name)
PPO_OURS, PPO_TRL = "rlhf_fast ppo", "trl PPOTrainer 0.29.1"


def ppo_targets(results):
    one_b, eight_b = "~Llama-3.2-1B", "~Llama-3.1-8B"
    ours, trl = ("ppo_step", "iteration", PPO_OURS, one_b), ("ppo_step", "iteration", PPO_TRL, one_b)
    verdicts = [
        limit_target(results, "PPO iteration at Llama-3.2-1B in <= 1.5 s", ours, "median_ms", 1500, "ms"),
        ratio_target(results, "PPO iteration >= 4x TRL's PPOTrainer", trl, ours, 4, at_most=False),
        ratio_target(results, "PPO peak memory <= 0.3x TRL's", ours, trl, 0.3, what="MB", field="peak_mb"),
        limit_target(results, "PPO rollout <= 0.6 s", ("ppo_step", "rollout", PPO_OURS, one_b), "median_ms", 600,
                     "ms"),
        limit_target(results, "PPO at Llama-3.1-8B with LoRA within 22 GiB",
                     ("ppo_step", "iteration", PPO_OURS, eight_b), "peak_mb", 22 * MB_PER_GIB, "MB"),
    ]
    return verdicts


def limit_target(results, target, key, field, limit, unit):
    row = results.row(*key)
    if row is None:
        return _absent(target, results, [key])
    value = row[field]
    return Verdict(target, MET if value <= limit else NOT_MET,
                   f"{_num(value)} {unit}, target <= {limit:g} {unit}, {_margin(value, limit, True)}",
                   (results.name(key[0]),))


# --- CPU --------------------------------------------------------------------------------------------

def cpu_targets(results):
    verdicts = []
    for mode in ("fwd", "fwd+bwd"):
        ours, eager = ("logprobs", mode, "ours", CPU_HEAD_SHAPE), ("logprobs", mode, "eager", CPU_HEAD_SHAPE)
        verdicts.append(ratio_target(results, f"token_logprobs {mode} peak RSS under 20% of eager's (CPU)",
                                     ours, eager, 0.2, what="MB", field="peak_mb", strict=True, percent=True))
        verdicts.append(ratio_target(results, f"token_logprobs {mode} no slower than eager (CPU)", ours, eager, 1.0))
    for op, key in (("linear_nll_loss", ("logprobs", NLL_MODE, "{}", CPU_HEAD_SHAPE)),
                    ("linear_ppo_loss", ("linear_ppo", "fwd+bwd", "{}", CPU_HEAD_SHAPE))):
        ours = (*key[:2], key[2].format("ours" if op == "linear_nll_loss" else "ours (linear_ppo_loss)"), key[3])
        eager = (*key[:2], "eager", key[3])
        verdicts.append(ratio_target(results, f"{op} fwd+bwd peak RSS under 20% of eager's (CPU)", ours, eager, 0.2,
                                     what="MB", field="peak_mb", strict=True, percent=True))
        verdicts.append(ratio_target(results, f"{op} fwd+bwd no slower than eager (CPU)", ours, eager, 1.0))
    verdicts.append(ratio_target(results, "PPO at the tiny shape <= 0.5x TRL's time (CPU)",
                                 ("ppo_step", "iteration", PPO_OURS, "~tiny"),
                                 ("ppo_step", "iteration", PPO_TRL, "~tiny"), 0.5))
    return verdicts


def check(device: str, results_dir: Path = RESULTS_DIR, since: float | None = None) -> list[Verdict]:
    """Every DESIGN.md target for `device` (a results file suffix: "h200", "cpu", ...)."""
    results = Results(device, results_dir, since)
    if device == "cpu":
        return cpu_targets(results)
    return (token_logprobs_targets(results) + loss_head_targets(results) + nll_targets(results) + gae_targets(results)
            + ppo_targets(results))


def devices(results_dir: Path = RESULTS_DIR) -> list[str]:
    """The device suffixes that have results files."""
    return sorted({path.stem.split("-", 1)[1] for path in Path(results_dir).glob("*-*.json")})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("devices", nargs="*", help="results file suffixes (default: every one present)")
    args = parser.parse_args(argv)
    for device in args.devices or devices():
        print(f"targets on {device}:")
        for verdict in check(device):
            print("  " + verdict.line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
