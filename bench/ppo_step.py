"""Bench: one PPO iteration end to end, rlhf_fast against TRL 0.29.1's PPOTrainer, in one run.

Both sides train the same randomly initialised Llama-shaped model (built from a config and saved with
save_pretrained into a temp dir, with a word-level tokenizer built here: no download) on the same
prompts, batch split and LoRA:
  - rlhf_fast ppo: rlhf_fast.stages.ppo.PPOTrainer; policy = base + LoRA r16 on all linear layers,
    reference = adapters off, value = a head on the policy trunk, reward = a LoRA adapter + head on the
    same base (an untrained RewardModel saved through rlhf_fast's API, as `rlhf-fast rm` lays it out).
  - trl PPOTrainer 0.29.1 (trl.experimental.ppo): the same LoRA policy through its peft_config, reference
    = adapters off, and what its PPOTrainer needs beside it: a full value model and a full reward model
    (AutoModelForSequenceClassification of the same base; the value model trains, as TRL's does).
    Its old log-probs follow `old_logprobs auto`: the rollout's in fp32 (the CPU: the experience pass
    takes the engine's log-probs and hidden states, as TRL's PPOTrainer takes its generation's logits),
    a recomputing policy forward in bf16 (CUDA).
  - rlhf_fast ppo (old_logprobs recompute | rollout): the same with the choice `auto` does not make on
    this device, so both are measured in one run.
  - rlhf_fast grpo, trl GRPOTrainer: GRPO on both sides, 4 samples per prompt.
bf16 on CUDA, fp32 on the CPU; 1 PPO epoch; one generation batch of the whole rollout batch on both
sides (TRL: local_rollout_forward_batch_size = batch, which also sets its experience forward batch), and
PPO's no-grad experience forwards in batches of the whole rollout batch on both sides too (rlhf_fast:
experience_batch_size = batch; its GRPO keeps the micro-batch, as TRL's GRPOTrainer does).

No response ends early: the tokenizer's EOS id is V, one past the model's V output tokens, so the model
can never sample it and both sides generate the full budget (rlhf_fast's sampler has no min_new_tokens;
TRL runs with stop_token None). The mean response lengths are measured and recorded (TRL's own view
ends a response at its first pad token, which the model may sample: about 1 token in V).

Timing: rlhf_fast's phases by calling PPOTrainer's public methods in step()'s order (rollout, score,
make_experience, compute_advantages, train_minibatches), torch.cuda.synchronize() at each boundary on
CUDA; TRL's train() loop timed from outside: a TrainerCallback's on_step_end closes each iteration, and
its module-level batch_generation, get_reward and masked_whiten are wrapped (synchronised) to split
it into the same phases (rollout = generation; score = reward-model calls; experience = the rest up to
the last reward call: generation log-probs, reference and value forwards; advantages = up to the
advantage whitening: KL rewards, GAE loop; update = the PPO epoch, its logging and the LR step; time
before generation, e.g. gc.collect, is "other"). The first `--warmup` iterations (compilation, caches)
are reported apart and left out of the steady-state medians. Tokens per second: response tokens sampled
per second of steady iterations. Peak memory, each provider in a fresh subprocess: on CUDA
torch.cuda.max_memory_allocated over the whole process (weights, optimizer, activations, KV cache); on
the CPU the process's peak RSS (VmHWM in /proc/self/status), imports included.

Each provider runs in its own process, one iteration per "go" from this one. On CUDA they run one after
the other (each has the GPU to itself); on the CPU they take turns iteration by iteration (both
processes alive, one running at a time), so that a shared machine's background load falls on both alike
(--sequential: one after the other there too). The load average is recorded at the start and the end.

    .venv/bin/python -m bench.ppo_step [--shape tiny|llama-3.2-1b|llama-3.1-8b] [--iterations N]
                                       [--warmup N] [--device cuda|cpu] [--providers LIST]
                                       [--sequential] [--generation-weights auto|merged_copy|lora]
                                       [--gradient-checkpointing] [--results-dir DIR] [--profile DIR]

Default: tiny on the CPU (5 steady iterations), llama-3.2-1b on CUDA (3), 1 warm-up iteration. Issue
12's 8B target is a 24 GB card's: `--shape llama-3.1-8b --generation-weights lora --gradient-checkpointing`
(on an H200 `auto` would take the 13 GiB merged copy, which a 24 GB card's `auto` does not).
--results-dir writes the JSON there and leaves bench/results and the README tables alone (smoke runs);
otherwise bench/results/ppo_step-<device>.json and the tables are written (bench.common.write_results)
after each provider (or each turn), "complete": false until the last one finishes; an interrupted run
(SIGINT, e.g. scripts/gpu_check.sh's time limit) writes what it measured and exits 130. --profile DIR:
rlhf_fast's providers run their last iteration under torch.profiler and write the top ops of each
phase to DIR/ppo_step-profile-<provider>-<device>.txt (self device time on CUDA), e.g. on a GPU:
`--iterations 1 --providers "rlhf_fast ppo" --profile $OUT --results-dir $OUT` (a profiled iteration is
slower: time with a run without it).
"""
import argparse
import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.common import device_slug, environment, quantiles, write_results
from bench.table import render

BENCH = "ppo_step"


@dataclass(frozen=True)
class Shape:
    """A model shape and the rollout batch that DESIGN.md's PPO targets are stated at."""

    name: str                 # the label's first word: bench/targets.py finds rows by it
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool                # tied input embedding and LM head
    batch: int                # prompts per iteration (one response each)
    prompt_tokens: int
    new_tokens: int
    mini_batch: int
    micro_batch: int
    rope_theta: float = 500000.0


SHAPES = {
    # CPU: a smaller split, batch 16 -> mini-batch 8 -> micro-batch 4 (recorded in the JSON as "split")
    "tiny": Shape("tiny", vocab=512, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024, tied=False,
                  batch=16, prompt_tokens=32, new_tokens=64, mini_batch=8, micro_batch=4, rope_theta=10000.0),
    # LlamaConfig of Llama-3.2-1B (no rope scaling: it changes no FLOP)
    "llama-3.2-1b": Shape("Llama-3.2-1B", vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8,
                          intermediate=8192, tied=True, batch=64, prompt_tokens=128, new_tokens=128,
                          mini_batch=16, micro_batch=8),
    "llama-3.1-8b": Shape("Llama-3.1-8B", vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=8,
                          intermediate=14336, tied=False, batch=64, prompt_tokens=128, new_tokens=128,
                          mini_batch=16, micro_batch=8),
}
GPU_SHAPES = ("llama-3.2-1b", "llama-3.1-8b")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
LEARNING_RATE, KL_COEF, TEMPERATURE, SEED = 1e-4, 0.05, 1.0, 0
PHASES = ("rollout", "score", "experience", "advantages", "update")

OURS, TRL, OURS_GRPO, TRL_GRPO = "rlhf_fast ppo", "trl PPOTrainer", "rlhf_fast grpo", "trl GRPOTrainer"
OURS_RECOMPUTE, OURS_ROLLOUT = "rlhf_fast ppo (old_logprobs recompute)", "rlhf_fast ppo (old_logprobs rollout)"
RESULT_MARK = "PPO_STEP_RESULT "  # starts a provider's report lines on stdout, among what the trainers print
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "unk_token": "<unk>"}
EOS = "</s>"


def shape_label(shape: Shape, dtype: str) -> str:
    """"Llama-3.2-1B 64x(128+128) LoRA r16 bf16": what bench/targets.py matches ("~Llama-3.2-1B")."""
    dims = f" V={shape.vocab} D={shape.hidden} L={shape.layers}" if shape.name == "tiny" else ""
    return (f"{shape.name}{dims} {shape.batch}x({shape.prompt_tokens}+{shape.new_tokens}) "
            f"LoRA r{LORA['r']} {dtype}")


# --- fixtures: model, tokenizer, reward adapter, prompts --------------------------------------------

def build_tokenizer(model_vocab: int):
    """A word-level tokenizer: <pad> 0, <s> 1, <unk> 2, words "w3" ... "w{V-1}", and EOS at id V,
    one past the model's output vocabulary, so a model of V tokens never samples it. No post-processor:
    a prompt of n words is n ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    vocab.update({f"w{i}": i for i in range(len(vocab), model_vocab)})
    vocab[EOS] = model_vocab
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, **SPECIAL_TOKENS)


def model_config(shape: Shape, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.tied,
                       max_position_embeddings=max(2048, shape.prompt_tokens + shape.new_tokens),
                       rope_theta=shape.rope_theta, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=None)  # EOS: the tokenizer's, never sampled


def prompt_texts(shape: Shape, count: int, seed: int = SEED) -> list[str]:
    """`count` prompts of exactly shape.prompt_tokens random words (ids 3 .. V-1)."""
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(len(SPECIAL_TOKENS), shape.vocab)}" for _ in range(shape.prompt_tokens))
            for _ in range(count)]


def build_fixtures(shape: Shape, device: str, dtype: torch.dtype, workdir: Path) -> dict:
    """Save the base model + tokenizer, the reward model and the prompts under `workdir`; paths back.

    The model is initialised on `device` in `dtype` (an 8B model initialises in seconds on a GPU,
    minutes on the CPU) and freed before any provider runs."""
    from transformers import AutoModelForCausalLM

    from rlhf_fast.models.adapters import add_lora
    from rlhf_fast.models.heads import ScalarHead
    from rlhf_fast.models.reward import RewardModel

    paths = {"model": workdir / "base", "reward": workdir / "reward", "prompts": workdir / "prompts.jsonl"}
    tokenizer = build_tokenizer(shape.vocab)
    texts = prompt_texts(shape, 2 * shape.batch)
    lengths = {len(tokenizer(text)["input_ids"]) for text in texts}
    assert lengths == {shape.prompt_tokens}, f"prompts encode to {lengths} tokens, not {shape.prompt_tokens}"
    paths["prompts"].write_text("".join(json.dumps({"prompt": text}) + "\n" for text in texts))
    torch.manual_seed(SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(shape, tokenizer), dtype=dtype)
    model.save_pretrained(paths["model"])
    tokenizer.save_pretrained(paths["model"])
    # the reward model as `rlhf-fast rm` saves it: a LoRA adapter on this base and a scalar head
    trunk = add_lora(model, "reward", r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                     target_modules=LORA["target_modules"])
    RewardModel(trunk, ScalarHead(shape.hidden).to(device), adapter="reward").save(paths["reward"],
                                                                                  base=paths["model"])
    del model, trunk
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {key: str(path) for key, path in paths.items()}


# --- a provider's process: set up, then one iteration per "go" from the parent ----------------------

def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


class Clock:
    """perf_counter seconds, after the device's queued work is done."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def file_name(text: str) -> str:
    """`text` with every run of characters other than letters, digits, '.', '_' and '-' made one '-'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


class PhaseProfile:
    """--profile: torch.profiler over each phase of one iteration, the top ops of each written as a
    table (self device time on CUDA, self CPU time on the CPU) to
    DIR/ppo_step-profile-<provider>-<device>.txt:
    where an iteration's time goes, read in the same run that times it. Each table's heading gives
    the phase's wall time under the profiler and the ops' total self time in it: on CUDA the GPU's
    kernel time, so a phase whose kernels fill a small share of its wall time waits on the host
    (launches, Python, syncs), not on the GPU. Off: a no-op context."""

    ROWS = 25

    def __init__(self, path: Path | None, device: str):
        self.path, self.cuda, self.tables = path, device.startswith("cuda"), []

    @contextlib.contextmanager
    def phase(self, name: str, on: bool):
        if self.path is None or not on:
            yield
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=activities) as prof:
            began = time.perf_counter()
            yield
            if self.cuda:
                torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - began) * 1e3
        ops = prof.key_averages()
        key, what = (("self_device_time_total", "GPU kernels") if self.cuda else
                     ("self_cpu_time_total", "ops' self CPU time"))
        busy_ms = busy_us(ops, self.cuda) / 1e3
        heading = (f"## {name}: {wall_ms:.1f} ms wall under the profiler; {what} {busy_ms:.1f} ms "
                   f"({busy_ms / max(wall_ms, 1e-9):.0%})")
        self.tables.append(heading + "\n" + ops.table(sort_by=key, row_limit=self.ROWS))

    def write(self) -> None:
        if self.path is not None and self.tables:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("\n\n".join(self.tables) + "\n")


def busy_us(ops, cuda: bool) -> float:
    """Microseconds of work in a profile's averaged events: on CUDA the kernels' time, counted once (the
    CPU op that launched a kernel carries its time too, and a user annotation on the GPU timeline spans
    others: torch's own table footer leaves both out, as here); on the CPU every event's self time."""
    if not cuda:
        return sum(op.self_cpu_time_total for op in ops)
    from torch.autograd import DeviceType

    return sum(op.self_device_time_total for op in ops
               if op.device_type == DeviceType.CUDA and not getattr(op, "is_user_annotation", False))


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return _status_mb("VmHWM")


class Parent:
    """The provider's side of the protocol: `report` one marked JSON line on stdout (among whatever the
    trainers print there), `wait` for the parent's "go" on stdin before each iteration."""

    @staticmethod
    def report(**message) -> None:
        print(RESULT_MARK + json.dumps(message), flush=True)

    @staticmethod
    def wait() -> None:
        if not sys.stdin.readline():
            raise SystemExit("ppo_step: the parent process is gone")


def run_rlhf_fast(spec: dict, parent: Parent, *, grpo: bool = False, old_logprobs: str = "auto") -> None:
    """rlhf_fast's PPO (or, grpo, its GRPO: groups of 4 samples per prompt, no critic, k3 KL as a loss
    term; as many sequences per iteration), each phase timed by calling PPOTrainer's public methods in
    step()'s order; old_logprobs as PPOConfig's. Each iteration reports `rollout/logprob_diff` (engine
    vs trainer log-probs; 0 where the old log-probs are the rollout's). With --profile the last
    iteration's phases run under torch.profiler (PhaseProfile): its times include the profiler's
    overhead, so time with one run and profile with another."""
    from rlhf_fast.rollout import logprob_diff
    from rlhf_fast.stages.ppo import GRPOConfig, PPOConfig, PPOTrainer

    shape, clock, device = Shape(**spec["shape"]), Clock(spec["device"]), spec["device"]
    rss_after_imports = _status_mb("VmRSS")
    began = clock()
    # PPO's experience forwards take the whole batch, as TRL's local_rollout_forward_batch_size does here
    config_class, extra = ((GRPOConfig, {"samples_per_prompt": 4}) if grpo else
                           (PPOConfig, {"experience_batch_size": shape.batch}))
    config = config_class(
        **extra, model=spec["paths"]["model"], reward_model=spec["paths"]["reward"], prompts=spec["paths"]["prompts"],
        output_dir=str(Path(spec["workdir"]) / "rlhf_fast-run"), overwrite=True, device=device,
        dtype=spec["dtype"], attn_implementation=spec["attn"], seed=SEED, lora_r=LORA["r"],
        lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], lora_target_modules=LORA["target_modules"],
        iterations=spec["warmup"] + spec["iterations"], batch_size=shape.batch, mini_batch_size=shape.mini_batch,
        micro_batch_size=shape.micro_batch, ppo_epochs=1, max_new_tokens=shape.new_tokens,
        max_length=shape.prompt_tokens + shape.new_tokens, temperature=TEMPERATURE, kl_coef=KL_COEF,
        learning_rate=LEARNING_RATE, gradient_checkpointing=spec.get("gradient_checkpointing", False),
        generation_weights=spec.get("generation_weights", "auto"),
        old_logprobs=old_logprobs)
    trainer = PPOTrainer(config)
    profile_dir = spec.get("profile_dir")
    profile_name = f"{BENCH}-profile-{file_name(spec['provider'])}-{device_slug(device)}.txt"
    profiler = PhaseProfile(None if profile_dir is None else Path(profile_dir) / profile_name, device)
    parent.report(event="ready", setup_s=clock() - began, rss_after_imports_mb=rss_after_imports)
    for iteration in range(config.iterations):
        parent.wait()
        last = iteration == config.iterations - 1  # the one profiled (--profile): the first if it is the only one
        marks = [clock()]
        with profiler.phase("rollout", last):
            rollout, rows = trainer.rollout()
        marks.append(clock())
        with profiler.phase("score", last):
            scores, _ = trainer.score(rollout, rows)
        marks.append(clock())
        with profiler.phase("experience", last):
            experience = trainer.make_experience(rollout, scores)
        marks.append(clock())
        with profiler.phase("advantages", last):
            trainer.compute_advantages(experience)
        marks.append(clock())
        trainer.actor.train()  # as step() does before its PPO epochs
        with profiler.phase("update", last):
            trainer.train_minibatches(experience)
        marks.append(clock())
        if last:
            profiler.write()
        # outside the timed phases; 0 by construction where the old log-probs are the rollout's
        diff = logprob_diff(rollout.logprobs, experience.old_logprobs, rollout.response_mask)
        lengths = rollout.response_lengths
        parent.report(event="iteration", ms=(marks[-1] - marks[0]) * 1e3,
                      phases_ms={phase: (b - a) * 1e3 for phase, a, b in zip(PHASES, marks, marks[1:])},
                      response_tokens=int(lengths.sum()), rows=int(lengths.numel()),
                      generated_width=int(rollout.input_ids.shape[1] - rollout.prompt_length),
                      ended_with_eos=int(rollout.ended_with_eos.sum()), peak_mb=peak_mb(device),
                      logprob_diff=diff, old_logprobs=trainer.old_logprobs)
    parent.report(event="done", status="ok", peak_mb=peak_mb(device))


def trl_phases(events: list[tuple]) -> list[dict]:
    """Per-iteration times from the events of TRL's train() loop, in the order they happened:
    ("begin", t), ("rollout", t0, t1, info), ("value" | "score", t0, t1), ("whiten", t0, t1),
    ("step_end", t). An iteration runs from its "begin" (or the previous step_end) to its step_end."""
    out, start, current = [], None, []
    for event in events:
        if event[0] == "begin":
            start = event[1]
        elif event[0] != "step_end":
            current.append(event)
        else:
            end = event[1]
            rollout = next(e for e in current if e[0] == "rollout")
            forwards = [e for e in current if e[0] in ("value", "score")]
            whitened = [e for e in current if e[0] == "whiten"]
            experience_end = forwards[-1][2] if forwards else rollout[2]
            advantages_end = whitened[-1][2] if whitened else experience_end
            score = sum(e[2] - e[1] for e in forwards if e[0] == "score")
            phases = {"rollout": rollout[2] - rollout[1], "score": score,
                      "experience": experience_end - rollout[2] - score,
                      "advantages": advantages_end - experience_end, "update": end - advantages_end,
                      "other": rollout[1] - start}
            out.append({"ms": (end - start) * 1e3, "phases_ms": {k: v * 1e3 for k, v in phases.items()},
                        **rollout[3]})
            start, current = end, []
    return out


class TRLRun:
    """What both TRL providers read from the spec before they build a trainer (the clock starts here)."""

    def __init__(self, spec: dict):
        from transformers import AutoTokenizer

        self.shape, self.clock, self.device = Shape(**spec["shape"]), Clock(spec["device"]), spec["device"]
        self.cuda = self.device.startswith("cuda")
        self.rss_after_imports = _status_mb("VmRSS")
        self.began = self.clock()
        self.total = spec["warmup"] + spec["iterations"]
        self.dtype = getattr(torch, spec["torch_dtype"])
        self.model_dir = spec["paths"]["model"]
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, padding_side="left")
        self.texts = [json.loads(line)["prompt"] for line in Path(spec["paths"]["prompts"]).read_text().splitlines()]


def run_trl(spec: dict, parent: Parent) -> None:
    """TRL's PPOTrainer.train(), timed from outside (see the module docstring); a callback holds each
    iteration until the parent says go."""
    version = importlib.metadata.version("trl")
    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
        from trl.experimental.ppo import ppo_trainer as impl
    except Exception as error:  # installed but unusable here (e.g. against this transformers): a row, not a crash
        parent.report(event="done", status=f"import failed: {type(error).__name__}: {error}"[:160], version=version)
        return
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    run = TRLRun(spec)
    shape, clock, device, cuda, began, total, dtype, model_dir, tokenizer, texts = (
        run.shape, run.clock, run.device, run.cuda, run.began, run.total, run.dtype, run.model_dir, run.tokenizer,
        run.texts)
    rss_after_imports = run.rss_after_imports
    pad_id = tokenizer.pad_token_id
    dataset = Dataset.from_dict({"input_ids": [tokenizer(text)["input_ids"] for text in texts]})
    load = dict(dtype=dtype, attn_implementation=spec["attn"])
    policy = AutoModelForCausalLM.from_pretrained(model_dir, **load)
    value_model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, **load)
    reward_model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, **load)
    args = PPOConfig(
        output_dir=str(Path(spec["workdir"]) / "trl-run"), report_to="none", save_strategy="no",
        disable_tqdm=True, seed=SEED, bf16=cuda, fp16=False, use_cpu=not cuda, learning_rate=LEARNING_RATE,
        per_device_train_batch_size=shape.micro_batch, gradient_accumulation_steps=shape.batch // shape.micro_batch,
        num_mini_batches=shape.batch // shape.mini_batch, num_ppo_epochs=1,
        local_rollout_forward_batch_size=shape.batch, response_length=shape.new_tokens,
        total_episodes=shape.batch * total, temperature=TEMPERATURE, kl_coef=KL_COEF, stop_token=None,
        missing_eos_penalty=None, num_sample_generations=0, dataloader_num_workers=0)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None,
                         reward_model=reward_model, train_dataset=dataset, value_model=value_model,
                         eval_dataset=dataset, peft_config=peft_config)
    parent.report(event="ready", setup_s=clock() - began, rss_after_imports_mb=rss_after_imports, version=version)

    events, done = [], []

    class Iterations(TrainerCallback):
        """Opens each iteration on the parent's go, closes it at on_step_end and reports it."""

        def on_train_begin(self, *args, **kwargs):
            parent.wait()
            events.append(("begin", clock()))

        def on_step_end(self, *args, **kwargs):
            events.append(("step_end", clock()))
            parent.report(event="iteration", peak_mb=peak_mb(device), **trl_phases(events)[-1])
            done.append(True)
            if len(done) < total:
                parent.wait()
                events.append(("begin", clock()))

    def timed(fn, kind, info=None):
        """fn, its (synchronised) start and end appended to `events` as (kind(*args), t0, t1[, info])."""
        def wrapper(*a, **k):
            t0 = clock()
            out = fn(*a, **k)
            t1 = clock()
            events.append((kind(*a), t0, t1) + (() if info is None else (info(out, *a),)))
            return out
        return wrapper

    def rollout_info(out, model, queries, *rest):
        responses = out[0][:, queries.shape[1]:]
        is_pad = responses == pad_id
        # TRL's response length: up to its first pad token (first_true_indices), the whole width without one
        lengths = torch.where(is_pad.any(1), is_pad.int().argmax(1), responses.shape[1])
        return {"response_tokens": int(responses.numel()), "rows": int(responses.shape[0]),
                "generated_width": int(responses.shape[1]), "trl_response_tokens": int(lengths.sum())}

    impl.batch_generation = timed(impl.batch_generation, lambda *a: "rollout", info=rollout_info)
    impl.get_reward = timed(impl.get_reward, lambda model, *a: "score" if model is reward_model else "value")
    impl.masked_whiten = timed(impl.masked_whiten, lambda *a: "whiten")
    trainer.add_callback(Iterations())
    trainer.train()
    parent.report(event="done", status="ok", peak_mb=peak_mb(device))


def run_trl_grpo(spec: dict, parent: Parent) -> None:
    """TRL 0.29.1's GRPOTrainer.train() on the same model, LoRA, reward model (a full sequence
    classifier, as TRL needs) and groups of 4: one optimiser step per generation batch of shape.batch
    completions, timed per step as a whole (its phases are not split)."""
    version = importlib.metadata.version("trl")
    try:
        from trl import GRPOConfig, GRPOTrainer
    except Exception as error:  # installed but unusable here: a row, not a crash
        parent.report(event="done", status=f"import failed: {type(error).__name__}: {error}"[:160], version=version)
        return
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, TrainerCallback

    run = TRLRun(spec)
    shape, clock, device, cuda, began, total, dtype, model_dir, tokenizer, texts = (
        run.shape, run.clock, run.device, run.cuda, run.began, run.total, run.dtype, run.model_dir, run.tokenizer,
        run.texts)
    rss_after_imports = run.rss_after_imports
    reward_model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=dtype,
                                                                      attn_implementation=spec["attn"])
    args = GRPOConfig(
        output_dir=str(Path(spec["workdir"]) / "trl-grpo-run"), report_to="none", save_strategy="no",
        disable_tqdm=True, seed=SEED, bf16=cuda, fp16=False, use_cpu=not cuda, learning_rate=LEARNING_RATE,
        per_device_train_batch_size=shape.micro_batch, gradient_accumulation_steps=shape.batch // shape.micro_batch,
        num_generations=4, max_completion_length=shape.new_tokens, temperature=TEMPERATURE, beta=0.04,
        loss_type="grpo", num_iterations=1, max_steps=total, dataloader_num_workers=0,
        model_init_kwargs={"dtype": dtype, "attn_implementation": spec["attn"]})
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward_model, args=args,
                          train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
                          reward_processing_classes=tokenizer, peft_config=peft_config)
    parent.report(event="ready", setup_s=clock() - began, rss_after_imports_mb=rss_after_imports, version=version)
    marks = []

    class Iterations(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            parent.wait()
            marks.append(clock())

        def on_step_end(self, *args, **kwargs):
            parent.report(event="iteration", ms=(clock() - marks[-1]) * 1e3, peak_mb=peak_mb(device),
                          response_tokens=shape.batch * shape.new_tokens, rows=shape.batch,
                          generated_width=shape.new_tokens)

    trainer.add_callback(Iterations())
    trainer.train()
    parent.report(event="done", status="ok", peak_mb=peak_mb(device))


CHILDREN = {OURS: run_rlhf_fast, OURS_RECOMPUTE: functools.partial(run_rlhf_fast, old_logprobs="recompute"),
            OURS_ROLLOUT: functools.partial(run_rlhf_fast, old_logprobs="rollout"),
            TRL_GRPO: run_trl_grpo, OURS_GRPO: functools.partial(run_rlhf_fast, grpo=True), TRL: run_trl}


def child_main(provider: str, spec_path: str) -> None:
    """A provider's process: run it; an error ends it with a "done" message naming it."""
    spec, parent = json.loads(Path(spec_path).read_text()), Parent()
    spec["provider"] = provider
    try:
        CHILDREN[provider](spec, parent)
    except torch.OutOfMemoryError as error:
        parent.report(event="done", status=f"failed: out of memory ({str(error).splitlines()[0][:100]})",
                      peak_mb=peak_mb(spec["device"]))
    except Exception as error:
        import traceback

        traceback.print_exc()
        parent.report(event="done", status=f"failed: {type(error).__name__}: {error}"[:160])


# --- the parent: fixtures, the providers' processes, rows -------------------------------------------

class Provider:
    """One provider's process, driven one iteration at a time: "go" on its stdin, its report back."""

    def __init__(self, key: str, name: str, spec_path: Path):
        self.key, self.name, self.spec_path = key, name, spec_path
        self.proc, self.last_line = None, ""
        self.info, self.iterations, self.status = {}, [], "not run (interrupted)"

    def start(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "TRL_EXPERIMENTAL_SILENCE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.ppo_step", "--child", self.key,
                                      "--spec", str(self.spec_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=Path(__file__).resolve().parent.parent)

    def _receive(self) -> dict | None:
        """The next report, or None when the process ended without one."""
        for line in self.proc.stdout:
            if line.startswith(RESULT_MARK):
                return json.loads(line[len(RESULT_MARK):])
            self.last_line = line.strip() or self.last_line
        return None

    def ready(self) -> bool:
        message = self._receive()
        if message is not None and message["event"] == "ready":
            self.info.update({k: v for k, v in message.items() if k != "event"})
            return True
        self.finish(message)
        return False

    def step(self) -> bool:
        """One iteration; False when the process has ended (its status says why)."""
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.finish(None)
            return False
        message = self._receive()
        if message is not None and message["event"] == "iteration":
            self.iterations.append(message)
            return True
        self.finish(message)
        return False

    def finish(self, message="next") -> None:
        if message == "next":
            message = self._receive()
        self.proc.stdin.close()
        code = self.proc.wait()
        if message is not None and message["event"] == "done":
            self.info.update({k: v for k, v in message.items() if k not in ("event", "status")})
            self.status = message["status"]
        else:
            self.status = f"failed: exit code {code} ({self.last_line[:100] or 'no output'})"

    def stop(self) -> None:
        """End the process if it still runs (an interrupted bench)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def result(self) -> dict:
        return {"status": self.status, "iterations": self.iterations, **self.info}


def drive(providers: list[Provider], total: int, interleave: bool, progress) -> None:
    """Run every provider for `total` iterations: taking turns iteration by iteration (interleave: their
    processes live side by side, one runs at a time, so background load falls on all alike), or one
    after the other (each alone on the device). `progress()` after each turn or provider."""
    for group in [providers] if interleave else [[p] for p in providers]:
        for provider in group:
            provider.start()
        running = [p for p in group if p.ready()]
        for _ in range(total):
            running = [p for p in running if p.step()]
            if interleave:
                progress()
        for provider in running:
            provider.finish()
        progress()


def provider_rows(label: str, provider: str, result: dict, warmup: int, total: int) -> list[dict]:
    """An "iteration" row (steady median, peak, tokens/s, first iteration) and one row per phase; a
    run stopped early (a time limit) keeps what it measured, its status saying so."""
    runs = result.get("iterations", [])
    interrupted = result["status"] == "not run (interrupted)"
    if result["status"] != "ok" and not (interrupted and len(runs) > warmup):
        peak = result.get("peak_mb")
        return [{"shape": label, "mode": "iteration", "provider": provider, "status": result["status"],
                 **({"peak_mb": peak} if peak else {})}]
    status = "ok" if result["status"] == "ok" else f"interrupted after {len(runs)} of {total} iterations"
    steady = runs[warmup:]
    median, p20, p80 = quantiles([it["ms"] for it in steady])
    steady_s = sum(it["ms"] for it in steady) / 1e3
    tokens_per_s = sum(it["response_tokens"] for it in steady) / steady_s
    first = runs[0]["ms"] if warmup else None
    rows_sampled = sum(it["rows"] for it in steady)
    row = {"shape": label, "mode": "iteration", "provider": provider, "median_ms": median, "p20_ms": p20,
           "p80_ms": p80, "peak_mb": result.get("peak_mb", runs[-1]["peak_mb"]), "tokens_per_s": tokens_per_s,
           "first_ms": first, "iterations_ms": [it["ms"] for it in runs], "steady_iterations": len(steady),
           "mean_response_length": sum(it["response_tokens"] for it in steady) / rows_sampled,
           "setup_s": result.get("setup_s"), "rss_after_imports_mb": result.get("rss_after_imports_mb"),
           "rate": f"{tokens_per_s:.0f} tok/s" + (f"; first {first / 1e3:.2f} s" if first is not None else ""),
           "status": status}
    if "trl_response_tokens" in steady[0]:
        row["mean_response_length_trl_view"] = sum(it["trl_response_tokens"] for it in steady) / rows_sampled
    if "ended_with_eos" in steady[0]:
        row["responses_ended_with_eos"] = sum(it["ended_with_eos"] for it in steady)
    if "old_logprobs" in steady[0]:  # rlhf_fast's: where the old log-probs came from
        row["old_logprobs"] = steady[0]["old_logprobs"]
        if row["old_logprobs"] == "recompute":  # mean |engine - trainer| per iteration, then over iterations
            row["logprob_diff"] = statistics.mean(it["logprob_diff"] for it in steady)
            row["rate"] += f"; logprob_diff {row['logprob_diff']:.1e}"
    if "version" in result:
        row["version"] = result["version"]
    rows = [row]
    phases = steady[0].get("phases_ms", {})  # TRL's GRPOTrainer is timed as a whole
    for phase in (PHASES + (("other",) if "other" in phases else ())) if phases else ():
        values = [it["phases_ms"][phase] for it in steady]
        p_median, p_20, p_80 = quantiles(values)
        rows.append({"shape": label, "mode": phase, "provider": provider, "median_ms": p_median, "p20_ms": p_20,
                     "p80_ms": p_80, "rate": f"{sum(values) / 1e3 / steady_s:.0%} of the iteration",
                     **({"first_ms": runs[0]["phases_ms"][phase]} if warmup else {}), "status": status})
    return rows


def compare(rows: list[dict], trl_name: str) -> None:
    """Add "Nx TRL's speed, Mx its peak" to our PPO iteration rows where both were measured."""
    by = {r["provider"]: r for r in rows if r["mode"] == "iteration" and r.get("median_ms") is not None}
    trl = by.get(trl_name)
    for ours in (by.get(OURS), by.get(OURS_RECOMPUTE), by.get(OURS_ROLLOUT)):
        if ours and trl:
            ours["speedup_vs_trl"] = trl["median_ms"] / ours["median_ms"]
            ours["peak_vs_trl"] = ours["peak_mb"] / trl["peak_mb"]
            ours["rate"] += f"; {ours['speedup_vs_trl']:.2f}x TRL's speed, {ours['peak_vs_trl']:.2f}x its peak"


def versions() -> dict:
    found = {}
    for dist in ("trl", "transformers", "peft", "accelerate", "datasets"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def settings(shape: Shape, dtype_name: str, attn: str, iterations: int, warmup: int, interleave: bool) -> dict:
    """What both sides ran with, recorded in the results file."""
    return {
        "shape": {**asdict(shape), "label": shape_label(shape, dtype_name)},
        "dtype": dtype_name, "attn_implementation": attn, "lora": LORA,
        "split": {"batch": shape.batch, "mini_batch": shape.mini_batch, "micro_batch": shape.micro_batch,
                  "generation_batch": shape.batch, "ppo_experience_batch": shape.batch, "ppo_epochs": 1},
        "iterations": iterations, "warmup_iterations": warmup,
        "schedule": ("interleaved: the providers' processes take turns, one iteration at a time" if interleave
                     else "sequential: each provider's process runs alone"),
        "sampling": {"temperature": TEMPERATURE, "top_k": 0, "top_p": 1.0, "max_new_tokens": shape.new_tokens},
        "eos": (f"the tokenizer's EOS is id {shape.vocab}, one past the model's {shape.vocab} output tokens: no "
                "response ends early on either side (rlhf_fast's sampler has no min_new_tokens); mean response "
                "lengths are measured per provider"),
        "providers": {
            OURS: "rlhf_fast.stages.ppo.PPOTrainer: LoRA policy, reference = adapters off, value head on the "
                  "policy trunk (value_mode head), reward = an untrained LoRA adapter + scalar head on the same "
                  "base (RewardModel.save, the layout `rlhf-fast rm` writes); phases timed by calling "
                  "rollout/score/make_experience/compute_advantages/train_minibatches in step()'s order",
            "old_logprobs": f"{OURS}: PPOConfig's default, 'auto': 'rollout' in fp32 (the experience pass takes "
                            "the engine's log-probs, from an fp32 head, and the hidden states it drew each token "
                            "from, which the value head reads, instead of a policy forward, as TRL takes its "
                            "generation's logits; the reference forward stays), 'recompute' in bf16; "
                            f"{OURS_RECOMPUTE!r} / {OURS_ROLLOUT!r} pin either",
            TRL: "trl.experimental.ppo.PPOTrainer with peft_config (same LoRA), ref_model None (adapters off), a "
                 "full value model and a full reward model (AutoModelForSequenceClassification of the same "
                 "base, num_labels 1; the value model trains with the policy, as TRL's PPO needs); "
                 "per_device_train_batch_size = micro, gradient_accumulation_steps = batch / micro, "
                 "num_mini_batches = batch / mini, local_rollout_forward_batch_size = batch, stop_token None; "
                 "iterations timed by a TrainerCallback (on_step_end), phases by wrapping its module-level "
                 "batch_generation / get_reward / masked_whiten",
        },
        "tokens_per_s": "response tokens sampled per second of the steady iterations",
        "peak": ("torch.cuda.max_memory_allocated over the provider's whole process" if dtype_name == "bf16" else
                 "peak RSS (VmHWM) of the provider's own fresh process, imports included"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="default: tiny on the CPU, llama-3.2-1b on CUDA")
    parser.add_argument("--iterations", type=int, help="steady iterations timed (default 5 on the CPU, 3 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1, help="first iterations reported apart (default 1)")
    parser.add_argument("--providers", help=f"comma-separated, of {', '.join(map(repr, CHILDREN))} (default: "
                                            f"all but the old_logprobs choice that {OURS!r} makes: on the CPU "
                                            f"{OURS_ROLLOUT!r}, on CUDA {OURS_RECOMPUTE!r})")
    parser.add_argument("--sequential", action="store_true",
                        help="on the CPU too, run the providers one after the other (default there: they take "
                             "turns iteration by iteration; on CUDA they always run one after the other)")
    parser.add_argument("--generation-weights", choices=("auto", "merged_copy", "lora"), default="auto",
                        help="rlhf_fast's rollout weights (default auto: the merged copy where it needs at most 1/8 "
                             "of the device's memory, so 13 GiB at 8B on an H200; 'lora' for the 24 GB-card "
                             "setup of issue 12's 8B target)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="rlhf_fast's providers recompute each decoder layer in the backward (issue 12's lever "
                             "for the 8B peak); TRL's run as they are")
    parser.add_argument("--results-dir", type=Path, help="write the JSON here only (bench/results and the "
                                                         "READMEs untouched)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="rlhf_fast's providers run their last iteration under torch.profiler and write its "
                             "top ops per phase to DIR/ppo_step-profile-<provider>-<device>.txt (that "
                             "iteration's times include the profiler's overhead)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, args.spec)
        return 0

    if args.profile is not None and args.results_dir is None:
        parser.error("--profile needs --results-dir: a profiled iteration's times must not reach bench/results")
    cuda = args.device.startswith("cuda")
    shape = SHAPES[args.shape or ("llama-3.2-1b" if cuda else "tiny")]
    iterations = args.iterations if args.iterations is not None else (3 if cuda else 5)
    if iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")
    chosen = args.providers or ",".join(key for key in (OURS, OURS_RECOMPUTE, OURS_ROLLOUT, OURS_GRPO, TRL, TRL_GRPO)
                                           if key != (OURS_RECOMPUTE if cuda else OURS_ROLLOUT))
    wanted = list(dict.fromkeys(p.strip() for p in chosen.split(",") if p.strip()))
    unknown = sorted(set(wanted) - set(CHILDREN))
    if unknown:
        parser.error(f"unknown providers {unknown}; choose among {sorted(CHILDREN)}")
    interleave = not cuda and not args.sequential
    dtype_name, torch_dtype = ("bf16", torch.bfloat16) if cuda else ("fp32", torch.float32)
    attn = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
    label, total = shape_label(shape, dtype_name), args.warmup + iterations
    if args.generation_weights != "auto":
        label += f" generation_weights {args.generation_weights} (rlhf_fast)"
    if args.gradient_checkpointing:
        label += " gradient checkpointing (rlhf_fast)"
    try:
        trl_version, trl_missing = importlib.metadata.version("trl"), None
    except importlib.metadata.PackageNotFoundError:
        trl_version, trl_missing = None, "not installed"
    trl_name = f"{TRL} {trl_version or '0.29.1'}"
    meta = {**settings(shape, dtype_name, attn, iterations, args.warmup, interleave), "versions": versions(),
            "threads": torch.get_num_threads(), "load_average_1_5_15": os.getloadavg(), "complete": False}
    if args.profile is not None:  # rlhf_fast's last iteration ran under torch.profiler: its times are not clean
        meta["profiled_last_iteration"] = True
        if not any(key in (OURS, OURS_RECOMPUTE, OURS_ROLLOUT, OURS_GRPO) for key in wanted):
            print("ppo_step: --profile profiles rlhf_fast's providers only; none is chosen", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="ppo_step-") as tmp:
        workdir = Path(tmp)
        spec_path = workdir / "spec.json"
        names = {TRL: trl_name, TRL_GRPO: f"{TRL_GRPO} {trl_version or '0.29.1'}"}
        providers = [Provider(key, names.get(key, key), spec_path) for key in wanted]
        skipped = {key: trl_missing for key in (TRL, TRL_GRPO) if key in wanted and trl_missing}
        for provider in providers:
            provider.status = skipped.get(provider.key, provider.status)

        def rows_now() -> list[dict]:
            rows = [row for p in providers for row in provider_rows(label, p.name, p.result(), args.warmup, total)]
            compare(rows, trl_name)
            if not cuda:  # the GPU shapes wait for a GPU run
                rows += [{"shape": shape_label(SHAPES[name], "bf16") + " (GPU)", "mode": "iteration",
                          "provider": "all", "status": "not run (no CUDA device)"} for name in GPU_SHAPES]
            return rows

        try:
            began = time.perf_counter()
            paths = build_fixtures(shape, args.device, torch_dtype, workdir)
            print(f"ppo_step: {label} on {args.device}: fixtures in {time.perf_counter() - began:.1f} s", flush=True)
            spec_path.write_text(json.dumps({"shape": asdict(shape), "device": args.device, "dtype": dtype_name,
                                             "torch_dtype": str(torch_dtype).removeprefix("torch."), "attn": attn,
                                             "iterations": iterations, "warmup": args.warmup, "paths": paths,
                                             "workdir": str(workdir),
                                             "gradient_checkpointing": args.gradient_checkpointing,
                                             "profile_dir": None if args.profile is None else
                                             str(args.profile.resolve()),
                                             "generation_weights": args.generation_weights}))
            # after each turn: a run stopped at a time limit keeps what it measured ("complete": false)
            drive([p for p in providers if p.key not in skipped], total, interleave,
                  lambda: write_results(BENCH, args.device, rows_now(), args.results_dir, **meta))
        except KeyboardInterrupt:
            for provider in providers:
                provider.stop()
            path = write_results(BENCH, args.device, rows_now(), args.results_dir, **meta)
            print(f"ppo_step: interrupted; what was measured is in {path}", file=sys.stderr)
            return 130
    meta.update(complete=True, load_average_at_end=os.getloadavg())
    rows = rows_now()
    path = write_results(BENCH, args.device, rows, args.results_dir, **meta)
    print(render([{"bench": BENCH, **environment(args.device), "rows": rows}]))
    print(f"ppo_step: results in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
