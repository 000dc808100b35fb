"""`rlhf-fast demo [--llama2]`: the command line of both embedded demos."""
import argparse
from pathlib import Path

from rlhf_fast.demo import run
from rlhf_fast.demo.llama2 import run_llama2_demo

# what the demos leave under the output directory, in the order they write it: (path, what it is)
OUTPUTS = {
    "demo": [
        ("base/", "the tiny base model and tokenizer, built from scratch (a Hugging Face directory)"),
        ("sft.jsonl", "the demonstrations SFT trained on"),
        ("sft/model/", "the SFT model, the reference of PPO and GRPO"),
        ("rankings.jsonl", "the oracle's rankings of SFT samples, which the reward model learnt"),
        ("rm/reward/", "the reward model"),
        ("prompts.jsonl", "PPO's and GRPO's training prompts"),
        ("ppo/policy/", "the PPO policy adapter and value head"),
        ("grpo/policy/", "the GRPO policy adapter"),
        ("demo_results.json", "the table above: each policy's scores, an example, the wall time"),
    ],
    "llama2": [
        ("base/", "the tiny base model and tokenizer, built from scratch"),
        ("sft/model/", "the SFT model"),
        ("rankings-helpful.jsonl", "the helpfulness labeller's rankings (rankings-safety.jsonl: safety's)"),
        ("rm-helpful/reward/", "the helpfulness reward model (rm-safety/reward/: the safety one)"),
        ("rounds/rounds.jsonl", "each round's headline metrics; round i's outputs in rounds/round-<i>/"),
        ("llama2_results.json", "the table above: each round's policy scored by both oracles"),
    ],
}
STAGE_LOGS = {"demo": ["sft", "rm", "ppo", "grpo"], "llama2": ["sft", "rm-helpful", "rm-safety"]}


def describe_outputs(output: Path, demo: str) -> str:
    """The lines naming what a demo wrote under `output` (those that exist): its files, then each
    stage's metrics.jsonl and, where matplotlib was installed, curves.png."""
    rows = [(path, what) for path, what in OUTPUTS[demo] if (output / path).exists()]
    for stage in STAGE_LOGS[demo]:
        if (output / stage / "metrics.jsonl").exists():
            plot = output / stage / "curves.png"
            rows.append((f"{stage}/metrics.jsonl", f"{stage}'s logged metrics, one JSON line per step"
                         + (f"; plotted in {stage}/curves.png" if plot.exists() else "")))
    plots = list(output.rglob("curves.png"))
    width = max(len(path) for path, _ in rows) + 2
    lines = [f"everything is under {output.resolve()}:"] + [f"  {path:<{width}}{what}" for path, what in rows]
    if not plots:
        lines.append("  no plots (curves.png): install matplotlib (bash scripts/install.sh --extras plot)")
    return "\n".join(lines)


def main(argv=None, prog="rlhf-fast demo") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=run.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", "--out", dest="output_dir", metavar="DIR", default="runs/demo",
                        help="where everything is written (default: runs/demo under the current directory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 1200 demonstrations instead of 3000, 100 ranked prompts instead of "
                             "400, 40 PPO and GRPO iterations instead of 120 (its figures are not the README's)")
    parser.add_argument("--llama2", action="store_true",
                        help="the longer Llama 2 version: a safety axis, two reward models, "
                             "rejection-sampling rounds, then PPO")
    args = parser.parse_args(argv)
    output = Path(args.output_dir)
    demo = "llama2" if args.llama2 else "demo"
    print(f"{prog}: writing to {output.resolve()} (--output-dir to change it)")
    if args.llama2:
        run_llama2_demo(output, args.seed)
    else:
        run.run_demo(output, args.seed, quick=args.quick)
    print(describe_outputs(output, demo))
    return 0
