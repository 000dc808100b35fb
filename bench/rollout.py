"""Bench: the rollout engine's decode paths against HF `generate`, sampling one PPO rollout batch.

One call samples bench.ppo_step's rollout batch (its shapes and fixtures: `batch` prompts of
`prompt_tokens` words, `new_tokens` new tokens at temperature 1, never ending early since the
tokenizer's EOS is one past the model's vocabulary) from a LoRA policy (r16 on every linear layer,
random A and B), through
  - hf generate (peft LoRA): transformers' `generate` on the PeftModel (unmerged LoRA, its default
    cache): what the stages called before the engine, and what TRL's PPOTrainer calls;
  - engine merged_copy, engine lora: `RolloutEngine` with each `generation_weights` option, as a
    stage runs it (CUDA: the captured decode step; the CPU: eager, through `LeanDecodeStep`);
  - engine merged_copy (model forward), CPU only: decode steps through the model's forward
    (`lean=False`), the path `LeanDecodeStep` replaces.
Before timing, in fp32 (the CPU), each engine path decodes greedily and its tokens must equal HF
generate's (in bf16 the captured step and HF's kernels round differently: no check there). Tokens per second =
batch x new tokens / median seconds per call. On the CPU the providers take turns call by call
(bench.common.interleaved_ms), so that the shared machine's background load falls on all alike; on
CUDA each provider warms up (the captured step's compilation), then is timed alone, synchronised,
and the results are written after each (an interrupted run keeps what it measured, exit 130).

    .venv/bin/python -m bench.rollout [--shape tiny|llama-3.2-1b|llama-3.1-8b] [--reps N] [--results-dir DIR]

Default: tiny on the CPU (9 calls each), llama-3.2-1b on CUDA (3). bench/results/rollout-<device>.json
and the README tables (bench.common.write_results), or DIR with --results-dir.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.common import interleaved_ms, quantiles, write_results
from bench.ppo_step import LORA, SEED, SHAPES, build_fixtures, shape_label

BENCH = "rollout"
HF, MERGED, LORA_PATH, MERGED_FORWARD = ("hf generate (peft LoRA)", "engine merged_copy", "engine lora",
                                         "engine merged_copy (model forward)")
GREEDY_TOKENS = 8  # the correctness check's response length


def load_policy(fixtures: dict, device: str, dtype: str):
    """The saved base with a LoRA adapter of random A and B (a fresh B is 0: merged = base)."""
    from rlhf_fast.models.adapters import add_lora
    from rlhf_fast.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(fixtures["model"], padding_side="left")
    model = load_causal_lm(fixtures["model"], device=device, dtype=dtype)
    policy = add_lora(model, "policy", r=LORA["r"], alpha=LORA["alpha"], target_modules=LORA["target_modules"])
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return policy.eval(), tokenizer


def prompt_ids(fixtures: dict, tokenizer, batch: int) -> list[list[int]]:
    lines = Path(fixtures["prompts"]).read_text().splitlines()[:batch]
    return [tokenizer(json.loads(line)["prompt"])["input_ids"] for line in lines]


def samplers(policy, tokenizer, prompts, new_tokens: int, device: str) -> dict:
    """{provider: call(greedy: bool, new_tokens) -> token ids [B, new_tokens]}."""
    from rlhf_fast.data import pad_batch
    from rlhf_fast.rollout import RolloutEngine

    ids, mask = (t.to(device) for t in pad_batch(prompts, tokenizer.pad_token_id, side="left"))

    def hf(greedy, count):
        out = policy.generate(input_ids=ids, attention_mask=mask, do_sample=not greedy, max_new_tokens=count,
                              temperature=1.0,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        return out[:, ids.shape[1]:]

    def engine_call(engine):
        def call(greedy, count):
            rollout = engine.sample(prompts, max_new_tokens=count, do_sample=not greedy)
            return rollout.input_ids[:, rollout.prompt_length:]
        return call

    # a fixed cache length, as PPO's max_length: the greedy check and the timed calls share one capture
    length = ids.shape[1] + new_tokens
    # HF generate last: on CUDA the providers run one after another, and a time limit cuts the last
    calls = {MERGED: engine_call(RolloutEngine(policy, tokenizer, generation_weights="merged_copy", max_length=length)),
             LORA_PATH: engine_call(RolloutEngine(policy, tokenizer, generation_weights="lora", max_length=length)),
             HF: hf}
    if device == "cpu":
        calls[MERGED_FORWARD] = engine_call(RolloutEngine(policy, tokenizer, generation_weights="merged_copy",
                                                          max_length=length, lean=False))
    return calls


def greedy_agreement(calls: dict) -> dict[str, float]:
    """Each engine path's share of HF generate's greedy tokens (the same tokens in the same places)."""
    with torch.no_grad():
        reference = calls[HF](True, GREEDY_TOKENS)
        return {name: (call(True, GREEDY_TOKENS) == reference).double().mean().item()
                for name, call in calls.items() if name != HF}


def timed(calls: dict, new_tokens: int, device: str, reps: int):
    """(provider, (median, p20, p80) ms per sampling call) as each is measured: on the CPU all at
    the end (they take turns), on CUDA one after the other. CUDA times a plain synchronised loop:
    triton's do_bench (bench.common.time_ms) would first run a 1 s call five times to size its reps."""
    sampled = {name: (lambda call=call: call(False, new_tokens)) for name, call in calls.items()}
    if device == "cpu":
        with torch.no_grad():
            yield from interleaved_ms(sampled, warmup=1, rep=reps).items()
        return
    for name, call in sampled.items():
        with torch.no_grad():
            call()  # the captured step's compilation, the allocator's first fill
            torch.cuda.synchronize()
            samples = []
            for _ in range(reps):
                start = time.perf_counter()
                call()
                torch.cuda.synchronize()
                samples.append((time.perf_counter() - start) * 1e3)
        yield name, quantiles(samples)


def result_rows(label: str, times: dict, agreement: dict, tokens: int) -> list[dict]:
    rows = []
    for name, (median, p20, p80) in times.items():
        rate = f"{tokens / median * 1e3:.0f} tok/s"
        if HF in times:
            rate += f"; {times[HF][0] / median:.2f}x HF generate's speed"
        if name in agreement:
            rate += f"; greedy = HF's on {agreement[name]:.1%} of tokens"
        rows.append({"shape": label, "mode": "sample", "provider": name, "median_ms": median, "p20_ms": p20,
                     "p80_ms": p80, "tokens_per_s": tokens / median * 1e3, "rate": rate, "status": "ok",
                     **({"greedy_agreement": agreement[name]} if name in agreement else {})})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), help="default: tiny on the CPU, llama-3.2-1b on CUDA")
    parser.add_argument("--reps", type=int, help="timed calls per provider (default 9 on the CPU, 3 on CUDA)")
    parser.add_argument("--results-dir", type=Path, help="write the JSON here; bench/results and the tables untouched")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = SHAPES[args.shape or ("llama-3.2-1b" if device == "cuda" else "tiny")]
    reps = args.reps or (3 if device == "cuda" else 9)
    dtype = "bf16" if device == "cuda" else "fp32"
    label, tokens = shape_label(shape, dtype), shape.batch * shape.new_tokens
    placeholders = [] if device != "cpu" else [
        {"shape": shape_label(SHAPES[name], "bf16") + " (GPU)", "mode": "sample", "provider": "all",
         "status": "not run (no CUDA device)"} for name in ("llama-3.2-1b", "llama-3.1-8b")]
    meta = {"threads": torch.get_num_threads(), "reps": reps, "lora": LORA,
            "sampling": {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "new_tokens": shape.new_tokens},
            "greedy_check": "fp32 only: in bf16 the captured step and HF's kernels round differently"}
    times, agreement, path = {}, {}, None
    try:
        with tempfile.TemporaryDirectory() as workdir:
            fixtures = build_fixtures(shape, device, torch.bfloat16 if dtype == "bf16" else torch.float32,
                                      Path(workdir))
            policy, tokenizer = load_policy(fixtures, device, dtype)
            prompts = prompt_ids(fixtures, tokenizer, shape.batch)
            calls = samplers(policy, tokenizer, prompts, shape.new_tokens, device)
            if dtype == "fp32":
                agreement = greedy_agreement(calls)
                wrong = {name: share for name, share in agreement.items() if share != 1.0}
                assert not wrong, f"greedy tokens differ from HF generate's in fp32: {wrong}"
            for name, measured in timed(calls, shape.new_tokens, device, reps):
                times[name] = measured
                if device != "cpu" or len(times) == len(calls):  # on the CPU they all arrive at the end
                    path = write_results(BENCH, device, result_rows(label, times, agreement, tokens) + placeholders,
                                         args.results_dir, **meta, complete=len(times) == len(calls))
    except KeyboardInterrupt:  # scripts/gpu_check.sh's time limit: what was measured is saved
        print(f"{BENCH}: interrupted after {len(times)} provider(s); results in {path}")
        return 130
    for row in result_rows(label, times, agreement, tokens) + placeholders:
        print(row["provider"], row.get("median_ms"), row.get("rate") or row["status"])
    print(f"{BENCH}: results in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
