"""`rlhf-fast demo [--llama2]`: the command line of both embedded demos."""
import argparse
from pathlib import Path

from rlhf_fast.demo import run
from rlhf_fast.demo.llama2 import run_llama2_demo


def main(argv=None, prog="rlhf-fast demo") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=run.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/demo", help="where everything is written")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer examples and PPO iterations")
    parser.add_argument("--llama2", action="store_true",
                        help="the longer Llama 2 version: a safety axis, two reward models, "
                             "rejection-sampling rounds, then PPO")
    args = parser.parse_args(argv)
    if args.llama2:
        run_llama2_demo(Path(args.output_dir), args.seed)
    else:
        run.run_demo(Path(args.output_dir), args.seed, quick=args.quick)
    return 0
