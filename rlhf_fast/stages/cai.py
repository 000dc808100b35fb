"""Constitutional AI (Bai et al. 2022): harmlessness from AI feedback, guided by a constitution.

SL-CAI (this stage):
  1. sample a response to each (red-team) prompt from the policy;
  2. `revision_rounds` times: draw a principle from the constitution, have a critic write a critique
     of the current response by that principle's critique request, and a reviser rewrite the
     response by its revision request in the light of the critique;
  3. fine-tune the policy with the SFT loss on (prompt, final revision), plus any helpfulness data
     (the paper mixes in helpful samples so the model stays helpful).
Critic and reviser are a local causal LM (the policy by default, or critic_model) prompted with the
constitution's templates, or Python functions (critic_function, reviser_function), so tests and
demos can script them.

RL-CAI (after SL-CAI): two responses per prompt from the SL-CAI model are compared by a judge
asked a principle's `preference` question; the preferences train a reward model, then PPO or GRPO
(`rlhf-fast rm`, `rlhf-fast ppo`), or go straight to DPO. With judge_function (a Python judge) this
stage writes preferences.jsonl itself; a model judge is the RLAIF labeller (`rlhf-fast label`), which
reads the pairs.jsonl this stage writes with the principles' preference questions as its criteria.
Outputs: revisions.jsonl (each prompt's initial response, every critique and revision and the
principle drawn), train.jsonl, stats.json, sft/model; with rl_pairs or judge_function: pairs.jsonl
({prompt, responses: [a, b]}), and with judge_function preferences.jsonl ({prompt, chosen,
rejected, principle, ai_preference}).
"""
import json
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

from rlhf_fast import data, distributed
from rlhf_fast.config import ConfigError, option, require
from rlhf_fast.data import PROMPT_FIELDS, SFT_FIELDS, columns_option, split_option
from rlhf_fast.constitution import Constitution, Principle, load_constitution
from rlhf_fast.device import pick_device
from rlhf_fast.errors import DataError
from rlhf_fast.feedback import call_function, load_function, sample_texts, write_jsonl_atomic
from rlhf_fast.models.loading import load_causal_lm, load_tokenizer
from rlhf_fast.rollout import SamplingConfig
from rlhf_fast.seeding import seed_everything
from rlhf_fast.training.objective import fine_tune_step, prepare_steps
from rlhf_fast.training.supervised import SupervisedConfig

# critic(prompts, responses, principles) -> critiques; reviser(prompts, responses, critiques, principles) -> revisions
Critic = Callable[[list[str], list[str], list[Principle]], list[str]]
Reviser = Callable[[list[str], list[str], list[str], list[Principle]], list[str]]
# judge(prompts, responses_a, responses_b, principles) -> P(a is the better response), each in [0, 1]
Judge = Callable[[list[str], list[str], list[str], list[Principle]], list[float]]


@dataclass
class CAIConfig(SamplingConfig, SupervisedConfig):
    """Constitutional AI, supervised part (SL-CAI): responses to {"prompt"} lines critiqued and revised by
    principles drawn from a constitution, then SFT on the final revisions; optionally the pairs (and, with a
    Python judge, the preferences) for RL-CAI."""

    prompts: str = option("", "(red-team) prompt source: JSONL, parquet, arrow, json or csv file, "
                              "saved dataset directory or hub dataset (docs/data.md)")
    prompts_columns: dict[str, str] = columns_option("prompts", PROMPT_FIELDS)
    prompts_split: str = split_option("prompts")
    constitution: str = option("", "constitution YAML: principles with critique_request and revision_request")
    revision_rounds: int = option(1, "critique-revision rounds per response, a principle drawn for each "
                                     "(Bai et al. used up to 4)", min=1)
    samples_per_prompt: int = option(1, "responses sampled (and revised) per prompt", min=1)
    critic_model: str = option("", "model directory that writes critiques and revisions (default: the policy)")
    critic_function: str = option("", "'module:function' writing critiques instead of a model: f(prompts=, "
                                      "responses=, critique_requests=, principles=[names]) -> [str]")
    reviser_function: str = option("", "'module:function' writing revisions instead of a model: f(prompts=, "
                                       "responses=, critiques=, revision_requests=, principles=) -> [str]")
    critique_max_new_tokens: int = option(64, "model critic: token budget of a critique", min=1)
    revision_max_new_tokens: int = option(64, "model reviser: token budget of a revision", min=1)
    output_stop: str = option("\n\n", "model critic/reviser: text is cut at the first occurrence of this "
                                      "('' = keep it all)")
    helpful_data: str = option("", "SFT source mixed into the training set (helpfulness samples; docs/data.md)")
    helpful_data_columns: dict[str, str] = columns_option("helpful_data", SFT_FIELDS)
    helpful_data_split: str = split_option("helpful_data")
    rl_pairs: bool = option(False, "after SL-CAI, sample two responses per prompt from the SL-CAI model into "
                                   "pairs.jsonl for RL-CAI's labeller")
    judge_function: str = option("", "'module:function' judging the pairs by a principle's preference question: "
                                     "f(prompts=, responses_a=, responses_b=, criteria=, principles=) -> "
                                     "[P(a better)] in [0, 1]; writes preferences.jsonl (implies rl_pairs)")

    def __post_init__(self):
        super().__post_init__()
        self.check_sampling()
        require(self.prompts, "prompts", "a (red-team) prompt source (docs/data.md)")
        require(self.constitution, "constitution", "a constitution YAML file")
        constitution = load_constitution(self.constitution)
        for key, role in (("critic_function", "critic function"), ("reviser_function", "reviser function"),
                          ("judge_function", "judge function")):
            if getattr(self, key):
                load_function(getattr(self, key), role)
        if self.critic_model and self.critic_function and self.reviser_function:
            raise ConfigError("critic_model is unused when critic_function and reviser_function are both set")
        if self.judge_function:
            constitution.judged()


# -------------------------------------------------------------------------------------------------
# critics and revisers: a model prompted with the constitution's templates, or Python functions

def cut(text: str, stop: str) -> str:
    return text.split(stop, 1)[0] if stop else text


def model_writers(model, tokenizer, constitution: Constitution, config: CAIConfig) -> tuple[Critic, Reviser]:
    """A critic and a reviser that prompt `model` with the constitution's templates and sample one
    answer each through the rollout engine, which stops at config.output_stop (cut off the text)."""
    sampling = {f.name: getattr(config, f.name) for f in fields(SamplingConfig)}
    if config.output_stop:
        sampling["stop"] = [*config.stop, config.output_stop]

    def write(texts: list[str], max_new_tokens: int) -> list[str]:
        budget = SamplingConfig(**{**sampling, "max_new_tokens": max_new_tokens})
        answers = sample_texts(model, tokenizer, texts, budget, num_samples=1, prompts_per_batch=config.micro_batch_size)
        return [cut(a[0], config.output_stop) for a in answers]

    def critic(prompts, responses, principles):
        return write([constitution.critique_prompt(p, r, c) for p, r, c in zip(prompts, responses, principles)],
                     config.critique_max_new_tokens)

    def reviser(prompts, responses, critiques, principles):
        return write([constitution.revision_prompt(p, r, c, q) for p, r, c, q in
                      zip(prompts, responses, critiques, principles)], config.revision_max_new_tokens)

    return critic, reviser


def function_critic(name: str) -> Critic:
    function = load_function(name, "critic function")

    def critic(prompts, responses, principles):
        return call_function("critic function", name, function, prompts, "text", responses=responses,
                             critique_requests=[p.critique_request for p in principles],
                             principles=[p.name for p in principles])
    return critic


def function_reviser(name: str) -> Reviser:
    function = load_function(name, "reviser function")

    def reviser(prompts, responses, critiques, principles):
        return call_function("reviser function", name, function, prompts, "text", responses=responses,
                             critiques=critiques, revision_requests=[p.revision_request for p in principles],
                             principles=[p.name for p in principles])
    return reviser


def function_judge(name: str) -> Judge:
    function = load_function(name, "judge function")

    def judge(prompts, responses_a, responses_b, principles):
        values = call_function("judge function", name, function, prompts, "number", responses_a=responses_a,
                               responses_b=responses_b, criteria=[p.preference for p in principles],
                               principles=[p.name for p in principles])
        for prompt, value in zip(prompts, values):
            if not 0 <= value <= 1:
                raise DataError(f"judge function {name} returned {value} for prompt {prompt!r}; expected "
                                "P(a better) in [0, 1]")
        return values
    return judge


# -------------------------------------------------------------------------------------------------
# SL-CAI

def critique_and_revise(prompts: list[str], responses: list[str], constitution: Constitution, critic: Critic,
                        reviser: Reviser, rounds: int, rng: random.Random) -> tuple[list[dict], dict]:
    """(one chain per response: {prompt, initial, steps: [{principle, critique, revision}], response},
    counts). A principle is drawn per response and round; a blank critique is passed on as it is, a
    blank revision keeps the response it was meant to revise (both counted)."""
    chains = [{"prompt": p, "initial": r, "steps": [], "response": r} for p, r in zip(prompts, responses)]
    counts = {"cai/empty_critiques": 0, "cai/empty_revisions": 0}
    for _ in range(rounds):
        principles = [constitution.draw(rng) for _ in chains]
        current = [c["response"] for c in chains]
        critiques = critic(prompts, current, principles)
        revisions = reviser(prompts, current, critiques, principles)
        for chain, principle, critique, revision in zip(chains, principles, critiques, revisions):
            counts["cai/empty_critiques"] += not critique.strip()
            counts["cai/empty_revisions"] += not revision.strip()
            chain["steps"].append({"principle": principle.name, "critique": critique, "revision": revision})
            if revision.strip():
                chain["response"] = revision
    return chains, counts


def revise(config: CAIConfig, constitution: Constitution, output: Path) -> dict:
    """Steps 1-2: sample, critique and revise; writes revisions.jsonl and train.jsonl; returns stats."""
    device = pick_device(config.device)
    records = data.load_prompts(data.source_of(config, "prompts"))
    tokenizer = load_tokenizer(config.model, padding_side="left")
    policy = load_causal_lm(config.model, device=device, dtype=config.dtype, attn=config.attn_implementation)
    seed_everything(config.seed)
    prompts = [r.prompt for r in records for _ in range(config.samples_per_prompt)]
    initial = [t for ts in sample_texts(policy, tokenizer, [r.prompt for r in records], config,
                                        num_samples=config.samples_per_prompt,
                                        prompts_per_batch=config.micro_batch_size) for t in ts]
    critic = function_critic(config.critic_function) if config.critic_function else None
    reviser = function_reviser(config.reviser_function) if config.reviser_function else None
    if critic is None or reviser is None:
        if config.critic_model:
            writer_tokenizer = load_tokenizer(config.critic_model, padding_side="left")
            writer = load_causal_lm(config.critic_model, device=device, dtype=config.dtype,
                                    attn=config.attn_implementation)
        else:
            writer_tokenizer, writer = tokenizer, policy
        model_critic, model_reviser = model_writers(writer, writer_tokenizer, constitution, config)
        critic, reviser = critic or model_critic, reviser or model_reviser
    chains, counts = critique_and_revise(prompts, initial, constitution, critic, reviser, config.revision_rounds,
                                         random.Random(config.seed))
    train = [{"prompt": c["prompt"], "response": c["response"]} for c in chains if c["response"].strip()]
    helpful = ([r for _, r in data.read_rows(data.source_of(config, "helpful_data"), SFT_FIELDS, "SFT")]
               if config.helpful_data else [])
    if not train and not helpful:
        raise DataError(f"cai: every one of the {len(chains)} final responses is empty; nothing to train on")
    write_jsonl_atomic(output / "revisions.jsonl", chains)
    write_jsonl_atomic(output / "train.jsonl", train + helpful)
    stats = {**counts, "cai/responses": len(chains), "cai/empty_final": len(chains) - len(train),
             "cai/changed": sum(c["response"] != c["initial"] for c in chains), "cai/helpful_examples": len(helpful)}
    print(f"cai: {len(chains)} responses, {stats['cai/changed']} changed by {config.revision_rounds} critique-revision "
          f"round(s); {counts['cai/empty_critiques']} blank critiques, {counts['cai/empty_revisions']} blank revisions "
          f"(the response kept), {stats['cai/empty_final']} empty final responses not trained on; "
          f"{len(train)} + {len(helpful)} helpful examples to fine-tune on")
    return stats


# -------------------------------------------------------------------------------------------------
# RL-CAI's data: pairs from the SL-CAI model, and preferences from a judge

def sample_pairs(config: CAIConfig, constitution: Constitution, policy: Path, path: Path) -> list[dict]:
    """Two responses per prompt from the SL-CAI policy, in `rlhf-fast label`'s candidates format; each
    pair carries a principle drawn from those with a preference question, as the judge's {criteria}."""
    device = pick_device(config.device)
    tokenizer = load_tokenizer(policy, padding_side="left")
    model = load_causal_lm(policy, device=device, dtype=config.dtype, attn=config.attn_implementation)
    seed_everything(config.seed + 1)
    prompts = [r.prompt for r in data.load_prompts(data.source_of(config, "prompts"))]
    texts = sample_texts(model, tokenizer, prompts, config, num_samples=2, prompts_per_batch=config.micro_batch_size)
    pairs = [{"prompt": p, "responses": ts} for p, ts in zip(prompts, texts)]
    judged = constitution.judged()
    rng = random.Random(config.seed + 2)
    for pair in pairs:
        principle = judged[rng.randrange(len(judged))]
        pair.update(criteria=principle.preference, principle=principle.name)
    write_jsonl_atomic(path, pairs)
    return pairs


def label_with_constitution(pairs: list[dict], constitution: Constitution, judge: Judge,
                            rng: random.Random) -> tuple[list[dict], dict]:
    """(preference records {prompt, chosen, rejected, principle, ai_preference}, counts): each pair
    judged by a principle drawn from those with a preference question (`rlhf-fast label`'s output
    format, plus the principle). Pairs of blank responses or of responses equal up to white space,
    and ties (P = 0.5), give no preference and are counted."""
    judged = constitution.judged()
    usable = [p for p in pairs if p["responses"][0].strip() and p["responses"][1].strip()
              and p["responses"][0].split() != p["responses"][1].split()]
    principles = [judged[rng.randrange(len(judged))] for _ in usable]
    probabilities = judge([p["prompt"] for p in usable], [p["responses"][0] for p in usable],
                          [p["responses"][1] for p in usable], principles) if usable else []
    preferences = []
    for pair, principle, p_first in zip(usable, principles, probabilities):
        if p_first == 0.5:
            continue
        first_wins = p_first > 0.5
        a, b = pair["responses"]
        preferences.append({"prompt": pair["prompt"], "chosen": a if first_wins else b,
                            "rejected": b if first_wins else a, "principle": principle.name,
                            "ai_preference": p_first if first_wins else 1 - p_first})
    counts = {"cai/pairs": len(pairs), "cai/pairs_equal_or_blank": len(pairs) - len(usable),
              "cai/ties": len(usable) - len(preferences), "cai/preferences": len(preferences)}
    return preferences, counts


def rl_cai_data(config: CAIConfig, constitution: Constitution, policy: Path, output: Path) -> None:
    pairs_file = output / "pairs.jsonl"
    pairs = ([r for _, r in data.read_jsonl(pairs_file)] if distributed.on_main(pairs_file.exists)
             else sample_pairs(config, constitution, policy, pairs_file))
    if not config.judge_function:
        print(f"cai: RL-CAI pairs in {pairs_file}; label them with the constitution's preference questions as the "
              "judge's criteria (`rlhf-fast label`), then `rlhf-fast rm` and `rlhf-fast ppo`/`grpo`, or "
              "`rlhf-fast dpo`")
        return
    preferences, counts = label_with_constitution(pairs, constitution, function_judge(config.judge_function),
                                                  random.Random(config.seed + 2))
    write_jsonl_atomic(output / "preferences.jsonl", preferences)
    print(f"cai: {counts['cai/preferences']} preferences from {counts['cai/pairs']} pairs "
          f"({counts['cai/pairs_equal_or_blank']} equal or blank, {counts['cai/ties']} ties) in "
          f"{output / 'preferences.jsonl'}: train a reward model on it (`rlhf-fast rm`), then PPO/GRPO, or DPO")


def run(config: CAIConfig) -> Path:
    """SL-CAI (and RL-CAI's data when asked); returns the SL-CAI model directory."""
    output = Path(config.output_dir)
    prepare_steps(config, output, "revisions.jsonl", "a CAI run")
    constitution = load_constitution(config.constitution)
    if distributed.on_main((output / "train.jsonl").exists):  # rank 0's view decides for every rank
        print(f"cai: {output / 'train.jsonl'} is written; resuming at the fine-tuning")
    else:
        stats = revise(config, constitution, output)
        distributed.on_main(lambda: (output / "stats.json").write_text(json.dumps(stats) + "\n"))
    policy = fine_tune_step(config, config.model, output / "train.jsonl", output / "sft")
    if config.rl_pairs or config.judge_function:
        rl_cai_data(config, constitution, policy, output)
    return policy
