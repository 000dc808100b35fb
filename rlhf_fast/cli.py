"""`rlhf-fast <command> [--config x.yaml] [--key value ...]`: one entry point for every stage.

Each stage module exposes a config dataclass and `run(config)`; the flags and their help are
generated from the dataclass, so `rlhf-fast ppo --help` always matches the code.
"""
import importlib
import os
import sys

from transformers.utils import logging as hf_logging

from rlhf_fast import distributed
from rlhf_fast.config import help_text, load_config, markdown_table, parse_overrides
from rlhf_fast.errors import UserError

# command -> (module, config class name or None for a module with its own main(), one-line help)
COMMANDS = {
    "sft": ("rlhf_fast.stages.sft", "SFTConfig", "supervised fine-tuning on demonstrations"),
    "rm": ("rlhf_fast.stages.rm", "RMConfig", "reward model from pairwise preferences or rankings"),
    "ppo": ("rlhf_fast.stages.ppo", "PPOConfig", "PPO against a reward model with a per-token KL penalty"),
    "grpo": ("rlhf_fast.stages.ppo", "GRPOConfig", "GRPO / Dr. GRPO / RLOO / REINFORCE++: PPO's stage, critic-free"),
    "rs": ("rlhf_fast.stages.rs", "RSConfig", "rejection-sampling fine-tuning (Llama 2): best of K, then SFT"),
    "rounds": ("rlhf_fast.stages.rounds", "RoundsConfig", "Llama 2's iterated rounds: reward-model refresh, RS, PPO"),
    "dpo": ("rlhf_fast.stages.dpo", "DPOConfig", "DPO and its variants (IPO, SLiC hinge, robust, SimPO) on preference pairs"),
    "label": ("rlhf_fast.stages.label", "LabelConfig", "RLAIF: an AI labeller (LM judge or reward model) turns candidates into preferences"),
    "rest": ("rlhf_fast.stages.rest", "ReSTConfig", "ReST: Grow (N scored samples per prompt), then Improve steps above rising reward thresholds"),
    "hir": ("rlhf_fast.stages.hir", "HIRConfig", "Hindsight Instruction Relabeling: sample, relabel by feedback, fine-tune; several rounds"),
    "cai": ("rlhf_fast.stages.cai", "CAIConfig", "Constitutional AI: critique and revise by a constitution, SFT on the revisions (+ RL-CAI pairs)"),
    "generate": ("rlhf_fast.stages.generate", "GenerateConfig", "best-of-N sampling with reward model(s)"),
    "pipeline": ("rlhf_fast.stages.pipeline", "PipelineConfig", "SFT -> reward model -> PPO, chained"),
    "demo": ("rlhf_fast.demo", None, "the embedded end-to-end pipeline on a tiny model, no downloads"),
    "selfcheck": ("rlhf_fast.selfcheck", None, "every kernel on this machine's backends vs its fp64 reference"),
}


def usage() -> str:
    width = max(map(len, COMMANDS)) + 2
    lines = [f"  {name:<{width}}{help_}" for name, (_, _, help_) in COMMANDS.items()]
    return ("usage: rlhf-fast <command> [--config FILE.yaml] [--key value ...] [--debug]\n\ncommands:\n"
            + "\n".join(lines) + "\n\n`rlhf-fast <command> --help` lists that command's keys. Errors print one "
            "line;\n--debug (or RLHF_FAST_DEBUG=1) shows the traceback.")


def run_stage(module, class_name: str, argv: list[str], prog: str) -> int:
    cls = getattr(module, class_name)
    if "--help" in argv or "-h" in argv:
        print(f"usage: {prog} [--config FILE.yaml] [--key value ...]\n\n{cls.__doc__}\n\nkeys:\n{help_text(cls)}")
        return 0
    overrides = parse_overrides(argv)
    config = load_config(cls, overrides.pop("config", None), overrides)
    world = distributed.init(getattr(config, "device", "auto"))  # under torchrun; else one process
    if not world.main:
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for the run; warnings and errors still show
    try:
        module.run(config)
        distributed.barrier()  # no rank tears the group down while another still talks to it
    finally:
        distributed.close()
    return 0


def config_reference() -> str:
    """docs/configs.md: every stage's keys, generated from the config dataclasses."""
    parts = ["# Config reference\n\nGenerated from the config dataclasses by "
             "`python -m rlhf_fast.cli --config-reference > docs/configs.md`; a test keeps it current.\n"]
    for name, (module_name, class_name, help_) in COMMANDS.items():
        if class_name is not None:
            cls = getattr(importlib.import_module(module_name), class_name)
            parts.append(f"## `rlhf-fast {name}`: {help_}\n\n{cls.__doc__}\n\n{markdown_table(cls)}\n")
    return "\n".join(parts)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["--config-reference"]:
        print(config_reference(), end="")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], [a for a in argv[1:] if a != "--debug"]
    debug = "--debug" in argv[1:] or os.environ.get("RLHF_FAST_DEBUG", "") not in ("", "0")
    if command not in COMMANDS:
        print(f"rlhf-fast: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    if not sys.stderr.isatty():  # a log file gets plain lines, not progress-bar frames
        hf_logging.disable_progress_bar()
    module_name, class_name, _ = COMMANDS[command]
    module = importlib.import_module(module_name)
    prog = f"rlhf-fast {command}"
    try:
        if class_name is None:
            return module.main(rest, prog=prog) or 0
        return run_stage(module, class_name, rest, prog)
    except UserError as error:
        if debug:
            raise
        print(f"{prog}: {' '.join(str(error).split(chr(10)))}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    sys.exit(main())
