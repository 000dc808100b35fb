"""The demo's rows for the seed's sampling alternatives (issue 17), each from a trained SFT model:
  - ReST: Grow/Improve with the hidden oracle as the reward function;
  - HIR: each sample relabelled by scripted feedback (the oracle says whether it is a good answer);
  - SL-CAI on the safety axis: a scripted critic names the tool words of a response, a scripted
    reviser strikes them (and declines tool requests), the policy is fine-tuned on the revisions;
each evaluated on 64 held-out prompts x 4 samples as the other demo rows are (ReST and HIR by
the oracle against SFT; CAI by the safety and helpfulness oracles before and after).

From the demos, once their SFT models exist:
    rows = run_rest_rows(output, sft_dir, seed) | run_hir_rows(output, sft_dir, seed)   # demo/run.py's SFT
    cai_rows = run_cai_rows(output, safety_sft_dir, seed)                                # demo/llama2.py's SFT
CAI wants the --llama2 demo's SFT model: its tokenizer (safety.corpus) has " sorry" as a token and
its demonstrator declines some tool requests. From the main demo's SFT model, whose tokenizer
spells " sorry" in bytes, the same run raised safety on tool requests less and left byte noise
(seed 0, 4 epochs: tagged safety -2.91 -> -0.16).
Standalone (builds both SFT models first): python -m rlhf_fast.demo.sampling_alternatives --seed 0
"""
import argparse
import functools
import json
import random
import time
from pathlib import Path

import torch

from rlhf_fast.data import write_jsonl
from rlhf_fast.demo import safety, task
from rlhf_fast.demo.steps import sample_candidates
from rlhf_fast.stages import cai, hir, rest

EVAL_PROMPTS, EVAL_SAMPLES = 64, 4
TRAIN_KEYS = {"lora_r": 0, "learning_rate": 1e-3, "batch_size": 32, "micro_batch_size": 32, "max_length": 48,
              "max_new_tokens": 12, "log_every": 10, "device": "auto"}
# HIR's instructions: the scripted feedback relabels a sample "good" when the oracle scores it at
# least GOOD_SCORE (the SFT samples' median), else "bad". At 3.0 (the SFT samples' top tenth) only
# 8% were "good" in round 1 and the policy collapsed to byte noise by round 3 (seed 0: oracle -2.4).
HIR_TEMPLATE, HIR_GOAL, HIR_FAILURE, GOOD_SCORE = "{prompt} {instruction}:", "good", "bad", 1.0
HIR_ROUNDS = 5


def one_torch_thread(function):
    """Run `function` with one torch thread: the demo's 64-wide model gains nothing from a second
    one, and on a busy 2-core machine two threads contend (seed 0, load 4-5: the three rows took
    330 s with two threads, 15 s with one; the figures are the same)."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


def held_out(seed: int) -> list[str]:
    """The held-out prompts every row is evaluated on (the same draw as the other demo rows)."""
    rng = random.Random(seed + 1)
    return [task.make_prompt(rng, held_out=True)[0] for _ in range(EVAL_PROMPTS)]


def train_prompts(output: Path, seed: int, n: int = 200, tags: bool = False) -> Path:
    rng = random.Random(seed + 17)
    prompts = [task.make_prompt(rng)[0] for _ in range(n)]
    records = [{"prompt": p, **({"tags": ["safety"]} if tags and safety.is_safety_prompt(p) else {})} for p in prompts]
    return write_jsonl(output / "prompts.jsonl", records)


def oracle_row(model_dir: Path, seed: int, template: str = "{prompt}") -> dict:
    """Mean oracle score and words per response of a policy asked with `template` on the held-out prompts."""
    torch.manual_seed(seed + 1)
    prompts = held_out(seed)
    asked = {template.format(prompt=p): p for p in prompts}
    rows = [(asked[a], r) for a, responses in sample_candidates(model_dir, list(asked), EVAL_SAMPLES)
            for r in responses]
    scores = [task.oracle_score(p, r) for p, r in rows]
    return {"oracle": sum(scores) / len(scores), "words": sum(len(r.split()) for _, r in rows) / len(rows),
            "example": f"{template.format(prompt=rows[0][0])}{rows[0][1]}"}


def safety_row(model_dir: Path, seed: int) -> dict:
    """Safety and helpfulness oracles' means on the held-out prompts (and on the tool requests alone)."""
    torch.manual_seed(seed + 1)
    rows = [(p, r) for p, responses in sample_candidates(model_dir, held_out(seed), EVAL_SAMPLES) for r in responses]
    tagged = [(p, r) for p, r in rows if safety.is_safety_prompt(p)]

    def mean(score, pairs):
        return sum(score(p, r) for p, r in pairs) / max(len(pairs), 1)

    return {"safety": mean(safety.safety_score, rows), "helpfulness": mean(safety.helpful_score, rows),
            "safety_tagged": mean(safety.safety_score, tagged),
            "helpfulness_tagged": mean(safety.helpful_score, tagged)}


# -------------------------------------------------------------------------------------------------
# ReST

@one_torch_thread
def run_rest_rows(output: Path, sft_dir: Path, seed: int) -> dict:
    """{"sft": ..., "rest": ...}: ReST with the oracle as its reward function (2 Grow steps of 4
    samples per prompt, Improve steps at the 50th and 80th percentiles)."""
    start = time.perf_counter()
    output = Path(output) / "rest"
    output.mkdir(parents=True, exist_ok=True)
    policy = rest.run(rest.ReSTConfig(
        model=str(sft_dir), prompts=str(train_prompts(output, seed)), output_dir=str(output / "run"),
        overwrite=True, reward_functions=["rlhf_fast.demo.task:oracle_reward"], samples_per_prompt=4,
        grow_steps=2, thresholds=[50.0, 80.0], epochs=2, seed=seed, **TRAIN_KEYS))
    rows = {"sft": oracle_row(sft_dir, seed), "rest": oracle_row(policy, seed)}
    rows["rest"]["seconds"] = time.perf_counter() - start
    return rows


# -------------------------------------------------------------------------------------------------
# HIR

def good_answer_feedback(prompts: list[str], completions: list[str], **fields) -> list[str]:
    """The scripted feedback (`rlhf_fast.demo.sampling_alternatives:good_answer_feedback`): the
    instruction each answer satisfies, "good" when the oracle scores it at least GOOD_SCORE."""
    return [HIR_GOAL if task.oracle_score(p, c) >= GOOD_SCORE else HIR_FAILURE for p, c in zip(prompts, completions)]


@one_torch_thread
def run_hir_rows(output: Path, sft_dir: Path, seed: int) -> dict:
    """{"hir": ...}: 5 HIR rounds (4 samples per prompt, relabelled good / bad by the scripted
    feedback, with the contrastive term), the policy then asked with the goal instruction."""
    start = time.perf_counter()
    output = Path(output) / "hir"
    output.mkdir(parents=True, exist_ok=True)
    policy = hir.run(hir.HIRConfig(
        model=str(sft_dir), prompts=str(train_prompts(output, seed)), output_dir=str(output / "run"), overwrite=True,
        instruction_template=HIR_TEMPLATE, goal_instruction=HIR_GOAL,
        feedback_function="rlhf_fast.demo.sampling_alternatives:good_answer_feedback", samples_per_prompt=4,
        rounds=HIR_ROUNDS, contrastive_coef=0.5, epochs=2, seed=seed, **TRAIN_KEYS))
    row = oracle_row(policy, seed, HIR_TEMPLATE.replace("{instruction}", HIR_GOAL))
    row["seconds"] = time.perf_counter() - start
    return {"hir": row}


# -------------------------------------------------------------------------------------------------
# SL-CAI on the safety axis

CONSTITUTION = {"principles": [
    {"name": "harm", "critique_request": "Name the tools in the response: tools are dangerous here.",
     "revision_request": "Rewrite the response without any tool.",
     "preference": "Which response names fewer tools?"},
    {"name": "decline", "critique_request": "Does the response help with a request for tools?",
     "revision_request": "Decline a request for tools politely; otherwise keep the answer, without tools.",
     "preference": "Which response declines a tool request, or names fewer tools?"}]}


def tool_critic(prompts, responses, critique_requests, principles) -> list[str]:
    """Scripted critic: names the tool words of each response (`...:tool_critic`)."""
    return [f"tools named: {' '.join(w for w in r.split() if w in task.TOPICS[safety.SAFETY_TOPIC]) or 'none'}"
            for r in responses]


def tool_reviser(prompts, responses, critiques, revision_requests, principles) -> list[str]:
    """Scripted reviser: a tool request is declined (" sorry"); elsewhere the tools the critique
    named are struck out (a response left empty becomes " sorry")."""
    revisions = []
    for prompt, response, critique in zip(prompts, responses, critiques):
        named = set(critique.removeprefix("tools named: ").split()) - {"none"}
        if safety.is_safety_prompt(prompt):
            revisions.append(f" {safety.REFUSAL}")
        else:
            kept = [w for w in response.split() if w not in named]
            revisions.append(" " + " ".join(kept) if kept else f" {safety.REFUSAL}")
    return revisions


@one_torch_thread
def run_cai_rows(output: Path, sft_dir: Path, seed: int) -> dict:
    """{"before": ..., "after": ...}: safety and helpfulness of the SFT model and of the SL-CAI model
    (one critique-revision round of every response, scripted critic and reviser)."""
    start = time.perf_counter()
    output = Path(output) / "cai"
    output.mkdir(parents=True, exist_ok=True)
    constitution = output / "constitution.yaml"
    constitution.write_text(json.dumps(CONSTITUTION))  # JSON is YAML
    policy = cai.run(cai.CAIConfig(
        model=str(sft_dir), prompts=str(train_prompts(output, seed, 400, tags=True)), constitution=str(constitution),
        output_dir=str(output / "run"), overwrite=True, revision_rounds=1, samples_per_prompt=2,
        critic_function="rlhf_fast.demo.sampling_alternatives:tool_critic",
        reviser_function="rlhf_fast.demo.sampling_alternatives:tool_reviser", epochs=2, seed=seed, **TRAIN_KEYS))
    rows = {"before": safety_row(sft_dir, seed), "after": safety_row(policy, seed)}
    rows["after"]["seconds"] = time.perf_counter() - start
    return rows


@one_torch_thread
def main(argv=None) -> dict:
    from rlhf_fast.demo.steps import begin_demo, sft_on_demonstrations

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="runs/sampling-alternatives")
    args = parser.parse_args(argv)
    output = Path(args.output_dir) / f"seed-{args.seed}"
    rng, base, common = begin_demo(output / "main", task.corpus(), args.seed)
    sft_dir = sft_on_demonstrations(output / "main", base, task.demonstrate, 3000, rng, common)
    rng, base, common = begin_demo(output / "llama2", safety.corpus(), args.seed)
    safety_sft_dir = sft_on_demonstrations(output / "llama2", base, safety.demonstrate, 3000, rng, common)
    rows = {**run_rest_rows(output, sft_dir, args.seed), **run_hir_rows(output, sft_dir, args.seed)}
    rows["cai"] = run_cai_rows(output, safety_sft_dir, args.seed)
    (output / "sampling_alternatives.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
