"""What every test module uses (tests never import each other): comparisons that explain a failure,
where each backend's tensors live, and masks of response tokens."""
import torch


def device_for(backend: str) -> torch.device:
    """Where a backend's inputs live in the tests: CUDA where there is one, else the CPU (Triton then
    runs through its interpreter, which conftest turns on). "native" is a CPU op: always the CPU."""
    cuda = torch.cuda.is_available() and backend != "native"
    return torch.device("cuda" if cuda else "cpu")


def randomize_lora(model, seed: int, scale: float = 0.3):
    """Every LoRA A and B of `model` random (a fresh adapter's B is 0, which would hide it); `model` back."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return model


def tiny_config(architecture: str, vocab_size: int = 211):
    """A tiny transformers config of one of the decoder families the tests cover: llama, qwen2,
    qwen3 (per-head q/k norms), mistral (no sliding window) or gpt2 (learned positions, no RoPE)."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    if architecture == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    make = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
            "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig}[architecture]
    extra = {"sliding_window": None} if architecture == "mistral" else {}
    if architecture == "qwen3":
        extra["head_dim"] = 16  # not hidden / heads: the projections' width is heads x head_dim
    return make(**common, intermediate_size=64, num_key_value_heads=2, **extra)


def random_prompts(tokenizer, lengths, seed=0) -> list[list[int]]:
    """Prompts of the given lengths, random non-special token ids of `tokenizer`."""
    generator = torch.Generator().manual_seed(seed)
    low = max(tokenizer.all_special_ids) + 1
    return [torch.randint(low, len(tokenizer), (n,), generator=generator).tolist() for n in lengths]


def hf_greedy(model, tokenizer, prompts, max_new_tokens, eos_ids=None) -> torch.Tensor:
    """HF `generate`'s greedy ids [B, P + new] for left-padded prompts on the model's device
    (eos_ids: the ids that end a row, default the tokenizer's EOS): the reference rollouts match."""
    from rlhf_fast.data import pad_batch

    device = next(model.parameters()).device
    ids, mask = pad_batch(prompts, tokenizer.pad_token_id, side="left")
    return model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                          max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=[tokenizer.eos_token_id] if eos_ids is None else list(eos_ids))


def relative_error(out, ref) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_rel_close(out, ref, tol, name="output"):
    """||out - ref|| / ||ref|| <= tol, with matching shapes and NaN/inf positions (any devices)."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    bad_out, bad_ref = ~torch.isfinite(out64), ~torch.isfinite(ref64)
    if not torch.equal(bad_out, bad_ref):
        where = torch.nonzero(bad_out != bad_ref)[:5].tolist()
        raise AssertionError(f"{name}: non-finite mismatch at {where}")
    finite = ~bad_ref
    err = relative_error(out64[finite], ref64[finite]) if finite.any() else 0.0
    if err > tol:
        diff = (out64 - ref64).abs().masked_fill(~finite, 0).flatten()
        worst = diff.topk(min(5, diff.numel())).indices
        rows = [(tuple(int(j) for j in torch.unravel_index(torch.tensor(i), out64.shape)), out64.flatten()[i].item(),
                 ref64.flatten()[i].item()) for i in worst.tolist()]
        raise AssertionError(f"{name}: relative error {err:.3e} > {tol:.1e}; worst (index, out, ref): {rows}")


def response_mask(B, T, holes=False):
    """(B, T) bool on the CPU: one span of response tokens per row with left and right padding.

    Row 0 is full, row 1 empty, row 2 a single token, the rest random spans (rows that exist);
    holes=True also punches a gap into each span (not the convention, but the spec covers it).
    """
    mask = torch.zeros(B, T, dtype=torch.bool)
    for row in range(B):
        if row == 0:
            start, end = 0, T
        elif row == 1:
            start, end = 0, 0
        elif row == 2:
            start = int(torch.randint(T, ()))
            end = start + 1
        else:
            start = int(torch.randint(T, ()))
            end = int(torch.randint(start, T + 1, ()))
        mask[row, start:end] = True
        if holes and end - start > 2:
            mask[row, (start + end) // 2] = False
    return mask


class GemmCounter:
    """Context manager counting the matrix products (aten mm, addmm, matmul, any overload) that run
    inside it, on every device, forward or backward: `with GemmCounter() as c: ...; c.count`.
    Batched products (bmm: e.g. the row-wise dots of an einsum) are not GEMMs of the LM head."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        aten = torch.ops.aten
        gemms = {aten.mm, aten.addmm, aten.addmm_, aten.matmul}
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket in gemms:
                    counter.count += 1
                return func(*args, **(kwargs or {}))

        self.count = 0
        self._mode = Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def spy_kernel_launches(monkeypatch, module, name, record: list):
    """Replace module.name, a Triton kernel, by one that appends each launch's keyword (meta-)
    parameters to `record` before launching the real kernel."""
    kernel = getattr(module, name)

    class Spy:
        def __getitem__(self, grid):
            launch = kernel[grid]

            def call(*args, **meta):
                record.append(dict(meta, kernel=name))
                return launch(*args, **meta)
            return call

    monkeypatch.setattr(module, name, Spy())


def make_inputs(n, d, v, dtype=torch.float32, bias=True, ignore_every=5):
    """CPU leaves (the same on every machine; the tests move them to their device): logits of std ~2,
    every ignore_every-th target from row 1 on is -100."""
    hidden = torch.randn(n, d).to(dtype).requires_grad_()
    weight = (torch.randn(v, d) / d ** 0.5 * 2).to(dtype).requires_grad_()
    b = (torch.randn(v) * 0.5).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,))
    targets[1::ignore_every] = -100
    return hidden, weight, b, targets


def leaves_on(device, *tensors):
    """Fresh leaf copies on device, each requiring grad if the original does (None stays None)."""
    return [None if x is None else x.detach().to(device, copy=True).requires_grad_(x.requires_grad)
            for x in tensors]


def assert_same_d_weight(one_chunk, many_chunks, dtype):
    """d weight made in one chunk and in many agree: to fp32 rounding, or (bf16 outputs of an fp32
    accumulator) in all but 1% of entries and never by more than one bf16 ulp."""
    if dtype == torch.float32:
        assert_rel_close(many_chunks, one_chunk, 1e-6, "d weight, many chunks vs one")
    else:
        differs = many_chunks != one_chunk
        assert differs.double().mean() < 0.01, f"{differs.sum()} of {differs.numel()} bf16 d weights differ"
        assert torch.all((many_chunks - one_chunk).abs() <= one_chunk.abs() * 2 ** -7), "more than one bf16 ulp"


# A child CLI run (`python -c KILL_AFTER_CHECKPOINT.format(step=N) <argv>`, or the same text as a
# script under torchrun) that SIGKILLs itself the moment checkpoint N is written: a kill -9 at a chosen
# moment, not a race with the clock. Under torchrun rank 0 is the one killed.
KILL_AFTER_CHECKPOINT = """
import os, signal, sys
from rlhf_fast import distributed
from rlhf_fast.training import runstate
save = runstate.save
def save_then_die(run_dir, step, *args, **kwargs):
    path = save(run_dir, step, *args, **kwargs)
    if step == {step} and distributed.current().main:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
runstate.save = save_then_die
from rlhf_fast.cli import main
main(sys.argv[1:])
"""
