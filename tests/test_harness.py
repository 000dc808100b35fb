"""The harness itself: packaging, the Triton kernels (interpreted here, compiled for H100), the tiny
saved model, the CLI and selfcheck."""
import importlib
import importlib.metadata
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_rel_close

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_package_is_not_top_level(tmp_path, monkeypatch):
    """kernels/ installs only as rlhf_fast.kernels: a top-level `kernels` is another package's name,
    one transformers probes for; and every package under rlhf_fast/ is installed. Checked whether
    the package is installed or only on a path."""
    import setuptools

    import rlhf_fast.kernels as k

    assert k.__name__ == "rlhf_fast.kernels"
    setup = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: setup.update(kwargs))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    assert setup["package_dir"] == {"rlhf_fast.kernels": "kernels"}
    assert "rlhf_fast.kernels" in setup["packages"] and "kernels" not in setup["packages"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "rlhf_fast").rglob("__init__.py")}
    assert on_disk <= set(setup["packages"]), f"not installed: {sorted(on_disk - set(setup['packages']))}"

    # a fresh interpreter outside the checkout (which, as the current directory, would put kernels/
    # on sys.path itself): a top-level `kernels`, if any, is some other package
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    probe = ("import importlib.util, rlhf_fast.kernels as k; spec = importlib.util.find_spec('kernels'); "
             "print(k.__file__); print(spec.origin if spec and spec.origin else '')")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(path)), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    ours, top_level = result.stdout.splitlines()
    assert not top_level or Path(top_level).resolve().parent != Path(ours).resolve().parent, \
        f"`import kernels` finds rlhf_fast's kernels at {top_level}"

    try:
        dist = importlib.metadata.distribution("rlhf_fast")
    except importlib.metadata.PackageNotFoundError:
        return  # on a path, not installed: no metadata to read
    assert "kernels" not in (dist.read_text("top_level.txt") or "").split()


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
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in readme[:12] if line.startswith("bash ")]  # one sentence, then the two
    assert len(commands) == 2, f"README must open with exactly two commands, found {commands}"
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_selfcheck_passes_on_this_machine(capsys):
    from rlhf_fast.selfcheck import main

    assert main([]) == 0
    assert "all kernels match their fp64 reference" in capsys.readouterr().out


# Every Triton kernel variant the ops launch, compiled to sm_90 cubin: the interpreter never runs
# Triton's compiler, so only this catches code it accepts and the compiler does not. Pointer
# arguments are "*fp32" unless named here; scalars are fp32 if named in FLOAT_ARGS, else i32.
FLOAT_ARGS = {"temperature", "gamma", "lam", "kl_coef", "eps", "ratio_lo", "ratio_hi", "dual_clip"}
LM_HEAD = dict(z_ptr="*bf16", zp_ptr="*bf16", zq_ptr="*bf16", targets_ptr="*i64", counted_ptr="*i1")
ROWS = dict(m_ptr="*u8", mask_ptr="*u8", lp_ptr="*bf16", old_ptr="*bf16", adv_ptr="*bf16", grad_lp_ptr="*bf16")
KERNEL_VARIANTS = [  # (module, kernel, pointer types, constexpr variants)
    ("token_logprobs", "_token_logprobs_fwd_kernel", LM_HEAD,
     [dict(HAS_BIAS=bias, WANT_ENTROPY=entropy, BLOCK_V=4096) for bias in (False, True) for entropy in (False, True)]),
    ("token_logprobs", "_token_logprobs_bwd_kernel", LM_HEAD,
     [dict(HAS_BIAS=bias, HAS_GRAD_ENTROPY=entropy, BLOCK_V=4096) for bias in (False, True) for entropy in (False, True)]),
    ("token_kl", "_token_kl_fwd_kernel", LM_HEAD, [dict(HAS_BIAS=bias, BLOCK_V=4096) for bias in (False, True)]),
    ("token_kl", "_token_kl_bwd_kernel", LM_HEAD, [dict(HAS_BIAS=bias, BLOCK_V=4096) for bias in (False, True)]),
    ("gae", "_gae_fwd_kernel", ROWS,
     [dict(KL_REWARDS=False, ESTIMATOR=0, WANT_STATS=False, BLOCK_T=1024)]
     + [dict(KL_REWARDS=True, ESTIMATOR=estimator, WANT_STATS=True, BLOCK_T=1024) for estimator in (0, 1, 2)]),
    ("masked_whiten", "_row_moments_kernel", ROWS, [dict(BLOCK_T=1024)]),
    ("masked_whiten", "_whiten_apply_kernel", ROWS,
     [dict(SHIFT_MEAN=shift, BLOCK_ROWS=1024, BLOCK_T=1024) for shift in (False, True)]),
    ("ppo_loss", "_ppo_loss_fwd_kernel", ROWS, [dict(HAS_DUAL_CLIP=dual, BLOCK_T=1024) for dual in (False, True)]),
    ("ppo_loss", "_ppo_loss_reduce_kernel", ROWS, [dict(SEQ_MEAN=seq, BLOCK_B=512, BLOCK_NB=4) for seq in (False, True)]),
    ("ppo_loss", "_ppo_loss_bwd_kernel", ROWS,
     [dict(HAS_DUAL_CLIP=dual, SEQ_MEAN=seq, BLOCK_T=1024, BLOCK_NB=4) for dual in (False, True) for seq in (False, True)]),
]


def compile_every_kernel_for_h100():
    """Compile KERNEL_VARIANTS to sm_90 cubin (no GPU needed); run without TRITON_INTERPRET."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for module, name, pointers, variants in KERNEL_VARIANTS:
        kernel = getattr(importlib.import_module(f"rlhf_fast.kernels.{module}"), name)
        for constexprs in variants:
            signature = {arg: "constexpr" if arg in constexprs else pointers.get(arg, "*fp32") if arg.endswith("_ptr")
                         else "fp32" if arg in FLOAT_ARGS else "i32" for arg in kernel.arg_names}
            compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))
            assert "cubin" in compiled.asm, f"{module}.{name} {constexprs}: no cubin"


def test_triton_kernels_compile_for_h100():
    """The interpreter skips Triton's compiler: compile every kernel to sm_90 cubin in a child process."""
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import test_harness; "
              "test_harness.compile_every_kernel_for_h100()")
    result = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
