"""The harness itself: packaging, the interpreted Triton path, the tiny saved model."""
import importlib.metadata
import os

import pytest
import torch

from compare import assert_rel_close


def test_kernels_package_is_not_top_level():
    dist = importlib.metadata.distribution("rlhf_fast")
    import rlhf_fast.kernels as k

    assert k.__name__ == "rlhf_fast.kernels"
    top_level = (dist.read_text("top_level.txt") or "").split()
    assert "kernels" not in top_level, "kernels/ must install only as rlhf_fast.kernels"


def test_interpreted_triton_kernel_matches_torch():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"

    @triton.jit
    def scaled_exp_kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        tl.store(y_ptr + offs, tl.exp(x * scale), mask=mask)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(1003, device=device)
    y = torch.full_like(x, float("nan"))
    scaled_exp_kernel[(triton.cdiv(x.numel(), 128),)](x, y, x.numel(), 0.5, BLOCK=128)
    assert_rel_close(y, torch.exp(x.double() * 0.5), 1e-6)


def test_tiny_model_round_trips_with_identical_logits(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = tokenizer(["the quick brown fox", "a reward model"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, logits)
    assert logits.shape[-1] == len(tokenizer)
    assert tokenizer.decode(tokenizer("the quick brown fox")["input_ids"]) == "the quick brown fox"


def test_cli_help_lists_subcommands(capsys):
    from rlhf_fast.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("demo", "selfcheck"):
        assert name in out


def test_ci_runs_the_readme_test_command():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text().splitlines()
    commands = [line for line in readme[:6] if line.startswith("bash ")]
    assert len(commands) == 2, f"README must open with exactly two commands, found {commands}"
    assert commands[1] in (root / ".ci" / "run").read_text()


def test_selfcheck_passes_on_this_machine(capsys):
    from rlhf_fast.selfcheck import main

    assert main([]) == 0
    assert "all kernels match their fp64 reference" in capsys.readouterr().out
