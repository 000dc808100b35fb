"""The README quotes what its own first command prints: seed 0's row of the demo table is what
`rlhf-fast demo` computes (the figures do not depend on the optional native ops: the demo pins its
backends). One full demo run, as the README's command runs it (default threads), about 40-90 s on the
2-core CI machine."""
import json
import re
from pathlib import Path

import pytest
import torch

from rlhf_fast.demo.run import run_demo

README = Path(__file__).resolve().parents[1] / "README.md"
COLUMNS = {"RM held-out accuracy": None, "SFT oracle": ("sft", "oracle"), "PPO oracle": ("ppo", "oracle"),
           "GRPO oracle": ("grpo", "oracle"), "SFT RM score": ("sft", "reward_model"),
           "PPO RM score": ("ppo", "reward_model"), "PPO KL to SFT": ("ppo", "kl_to_ref"),
           "GRPO KL to SFT": ("grpo", "kl_to_ref")}


def readme_row(seed: int) -> dict[str, str]:
    """The demo table's header and the row of `seed`, as printed in the README."""
    lines = README.read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| seed | RM held-out accuracy |"))
    names = [cell.strip() for cell in lines[header].strip("|").split("|")]
    for line in lines[header + 2:]:
        cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
        if cells[0] == str(seed):
            return dict(zip(names[1:], cells[1:]))
    raise AssertionError(f"README's demo table has no row for seed {seed}")


def test_readme_table_parses():
    row = readme_row(0)
    assert set(row) == set(COLUMNS) and all(re.fullmatch(r"-?\d+\.\d+", v) for v in row.values()), row


@pytest.mark.skipif(torch.cuda.is_available(), reason="the README's demo figures are the CPU's; on CUDA the demo "
                                                     "runs there (device auto) and its floats differ")
def test_seed_0_of_the_demo_prints_the_readme_figures(tmp_path):
    table = run_demo(tmp_path / "demo", seed=0)
    rm_rows = [json.loads(line) for line in (tmp_path / "demo" / "rm" / "metrics.jsonl").read_text().splitlines()]
    computed = {"RM held-out accuracy": [r for r in rm_rows if "rm/eval_accuracy" in r][-1]["rm/eval_accuracy"]}
    computed.update({name: table[policy][key] for name, where in COLUMNS.items() if where
                     for policy, key in [where]})
    quoted = readme_row(0)
    for name, value in computed.items():
        decimals = len(quoted[name].split(".")[1])
        assert f"{value:.{decimals}f}" == quoted[name], f"{name}: the demo computes {value:.4f}, the README says {quoted[name]}"
