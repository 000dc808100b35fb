"""HIR, Hindsight Instruction Relabeling (Zhang et al. 2023): instruction following as goal
reaching, learnt from successes and failures alike with the supervised loss.

Each of `rounds` rounds:
  1. online sampling: K responses per query from the current policy, each asked with the goal
     instruction (the model's input is instruction_template with {instruction} and {prompt});
  2. relabelling: feedback names, for each response, the instruction it does satisfy (the paper's
     scripted feedback: "a correct answer" or "a wrong answer"): a Python feedback function, or
     a reward threshold (reward >= feedback_threshold: the goal instruction, else failure_instruction);
  3. offline training: the SFT loss on (relabelled instruction + query, response), plus, with
     contrastive_coef > 0, the paper's contrastive term: each response should be likelier under
     its own relabelled instruction than under the round's other instructions,
         L_c = -(1/B) sum_i log softmax_j(P_ij)[own_i],  P_ij = mean token log p(o_i | p_j, q_i)
     over the round's distinct relabelled instructions p_j (the reference code contrasts the
     correct and the wrong instruction, with P the mean token log-prob, as here);
the next round samples from the new policy. At inference, ask with the goal instruction.
Outputs per round: round-<r>/samples.jsonl (query, response, relabelled instruction, reward),
round-<r>/train.jsonl (the relabelled pairs, an SFT file), round-<r>/stats.json,
round-<r>/sft/model; rounds.jsonl gathers the stats.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_fast import data, distributed
from rlhf_fast.config import ConfigError, option, require
from rlhf_fast.data import PROMPT_FIELDS, columns_option, split_option
from rlhf_fast.device import pick_device
from rlhf_fast.errors import DataError
from rlhf_fast.feedback import call_function, check_template, load_function, sample_texts, write_jsonl_atomic
from rlhf_fast.models.loading import load_causal_lm, load_tokenizer
from rlhf_fast.models.reward import load_reward_models
from rlhf_fast.rewards import RewardConfig, Scorer
from rlhf_fast.rollout import SamplingConfig
from rlhf_fast.seeding import seed_everything
from rlhf_fast.training.objective import fine_tune_step, prepare_steps, row_logprob_sums
from rlhf_fast.training.supervised import SupervisedConfig

TEMPLATE_FIELDS = ("instruction", "prompt")


@dataclass
class HIRConfig(RewardConfig, SamplingConfig, SupervisedConfig):
    """Hindsight Instruction Relabeling: sample with the goal instruction, relabel each response with the
    instruction it satisfies (a feedback function or a reward threshold), fine-tune; several rounds.
    The training keys apply to each round's fine-tuning."""

    prompts: str = option("", "prompt (query) source: JSONL, parquet, arrow, json or csv file, "
                              "saved dataset directory or hub dataset (docs/data.md)")
    prompts_columns: dict[str, str] = columns_option("prompts", PROMPT_FIELDS)
    prompts_split: str = split_option("prompts")
    instruction_template: str = option("{instruction} {prompt}", "the model's input: a template with the "
                                                                  "placeholders {instruction} and {prompt}")
    goal_instruction: str = option("Give a correct answer.", "the instruction responses are sampled with, and "
                                                             "the one to ask with at inference")
    feedback_function: str = option("", "'module:function' called as f(prompts=[...], completions=[...], **the "
                                        "prompt lines' other fields) -> the instruction each completion satisfies; "
                                        "replaces the reward threshold")
    feedback_threshold: float = option(0.0, "without feedback_function: a response whose reward (reward_model(s) "
                                            "and/or reward_functions) is >= this keeps the goal instruction")
    failure_instruction: str = option("Give a wrong answer.", "without feedback_function: the instruction a "
                                                              "response below feedback_threshold is relabelled with")
    samples_per_prompt: int = option(4, "K: responses sampled per query each round", min=1)
    rounds: int = option(2, "rounds of sampling, relabelling and fine-tuning", min=1)
    contrastive_coef: float = option(0.0, "weight of the contrastive term (0 = the SFT loss alone)", min=0.0)

    def __post_init__(self):
        super().__post_init__()
        self.check_sampling()
        require(self.prompts, "prompts", "a prompt source (docs/data.md)")
        check_template(self.instruction_template, "instruction_template", TEMPLATE_FIELDS)
        for key in ("goal_instruction", "failure_instruction"):
            if not getattr(self, key).strip():
                raise ConfigError(f"{key}: must be non-blank text")
        rewards = self.reward_model or self.reward_models or self.reward_functions
        if self.feedback_function:
            if rewards:
                raise ConfigError("feedback_function relabels on its own: leave reward_model(s) and "
                                  "reward_functions unset, or drop feedback_function to relabel by reward threshold")
            load_function(self.feedback_function, "feedback function")
        else:
            self.check_rewards()
            if self.goal_instruction == self.failure_instruction:
                raise ConfigError("goal_instruction and failure_instruction must differ")
        if self.packing and self.contrastive_coef > 0:
            raise ConfigError("packing: not supported with contrastive_coef > 0 (one row per instruction)")


def model_input(config: HIRConfig, instruction: str, prompt: str) -> str:
    return config.instruction_template.format(instruction=instruction, prompt=prompt)


# -------------------------------------------------------------------------------------------------
# 1. online sampling

def sample_round(config: HIRConfig, policy: Path, records: list) -> list[dict]:
    """K responses per query, each asked with the goal instruction: [{prompt, response}] rows."""
    device = pick_device(config.device)
    tokenizer = load_tokenizer(policy, padding_side="left")
    model = load_causal_lm(policy, device=device, dtype=config.dtype, attn=config.attn_implementation)
    asked = [model_input(config, config.goal_instruction, r.prompt) for r in records]
    texts = sample_texts(model, tokenizer, asked, config, num_samples=config.samples_per_prompt,
                         prompts_per_batch=config.micro_batch_size)
    return [{"prompt": r.prompt, "record": r, "response": t} for r, ts in zip(records, texts) for t in ts]


# -------------------------------------------------------------------------------------------------
# 2. relabelling

def relabel(config: HIRConfig, rows: list[dict], policy: Path) -> list[dict]:
    """Each row with "instruction": the one its response satisfies (and "reward" when relabelled by
    a reward threshold)."""
    if not rows:
        return []
    prompts = [r["prompt"] for r in rows]
    completions = [r["response"] for r in rows]
    if config.feedback_function:
        function = load_function(config.feedback_function, "feedback function")
        keys = sorted({k for r in rows for k in r["record"].fields})
        fields = {k: [r["record"].fields.get(k) for r in rows] for k in keys}
        labels = call_function("feedback function", config.feedback_function, function, prompts, "text",
                               completions=completions, **fields)
        return [{**r, "instruction": label} for r, label in zip(rows, labels)]
    rewards = score_responses(config, rows, policy)
    return [{**r, "instruction": config.goal_instruction if reward >= config.feedback_threshold
             else config.failure_instruction, "reward": reward} for r, reward in zip(rows, rewards)]


@torch.no_grad()
def score_responses(config: HIRConfig, rows: list[dict], policy: Path) -> list[float]:
    """The reward of each (query, response), as the reward model(s) were trained to see it (query,
    then response and EOS, no instruction), plus the reward functions."""
    device = pick_device(config.device)
    tokenizer = load_tokenizer(policy)
    scorer = Scorer(config, load_reward_models(config.reward_directories(), device=device, dtype=config.dtype))
    rewards = []
    for first in range(0, len(rows), config.micro_batch_size):
        chunk = rows[first:first + config.micro_batch_size]
        encoded = [data.encode_pair(tokenizer, r["prompt"], r["response"], config.max_length) for r in chunk]
        input_ids, attention_mask = (t.to(device) for t in data.pad_batch([e.input_ids for e in encoded],
                                                                           tokenizer.pad_token_id))
        safety = torch.tensor([config.safety_tag in r["record"].tags for r in chunk], device=device)
        combined, _ = scorer(input_ids, attention_mask, prompts=[r["record"] for r in chunk],
                             completions=[r["response"] for r in chunk], safety_prompt=safety)
        rewards += combined.tolist()
    return rewards


# -------------------------------------------------------------------------------------------------
# 3. offline training

def contrastive_terms(mean_logprobs: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """-log softmax_j(P_ij)[own_i] per example: mean_logprobs [B, K] (P_ij, the mean token log-prob of
    response i under instruction j), own [B] int64 (its relabelled instruction). Returns [B] fp32."""
    return -(mean_logprobs.gather(1, own[:, None])[:, 0] - torch.logsumexp(mean_logprobs, dim=1))


def contrastive_loss(coef: float):
    """micro_loss for train_objective: the SFT loss (summed NLL / the batch's response tokens) +
    coef x the mean contrastive term; one forward over every (response, instruction) row. Items
    are (Encoded under each of the K instructions, own index)."""
    def loss(model, micro: list, batch: list, *, pad_id: int, device):
        tokens = sum(len(encs[own].input_ids) - encs[own].response_start for encs, own in batch)
        k = len(micro[0][0])
        sums, counts = row_logprob_sums(model, [e for encs, _ in micro for e in encs], pad_id, device)
        sums, counts = sums.view(len(micro), k), counts.view(len(micro), k)      # [B, K]
        own = torch.tensor([o for _, o in micro], device=sums.device)
        nll = -sums.gather(1, own[:, None]).sum() / tokens
        contrast = contrastive_terms(sums / counts.clamp_min(1), own).sum() / len(batch)
        return nll + coef * contrast, {"hir/nll": nll.item(), "hir/contrastive": contrast.item()}
    return loss


def encode_contrastive(config: HIRConfig, train_file: Path):
    """encode(tokenizer) for train_objective: each relabelled pair encoded under every distinct
    instruction of the round (sorted), with the index of its own."""
    def encode(tokenizer):
        records = [(source, r) for source, r in data.read_jsonl(train_file)]
        for source, r in records:
            for key in ("instruction", "query", "response"):
                if not isinstance(r.get(key), str):
                    raise DataError(f"{source}: field {key!r} must be a string (a HIR train.jsonl line)")
        instructions = sorted({r["instruction"] for _, r in records})
        items = []
        for source, r in records:
            encs = [data.encode_pair(tokenizer, model_input(config, p, r["query"]), r["response"], config.max_length,
                                     source=source) for p in instructions]
            items.append((encs, instructions.index(r["instruction"])))
        truncated = sum(encs[own].truncated for encs, own in items)
        if truncated:
            print(f"hir: {truncated} of {len(items)} responses truncated to max_length={config.max_length}")
        return items
    return encode


# -------------------------------------------------------------------------------------------------

def write_round(config: HIRConfig, policy: Path, records: list, round_dir: Path, index: int) -> None:
    """Steps 1-2 of a round: samples.jsonl (every response, its relabelled instruction, None for an
    empty one) and train.jsonl (the relabelled pairs)."""
    round_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed + index)
    rows = sample_round(config, policy, records)
    empty = [r for r in rows if not r["response"].strip()]
    labelled = relabel(config, [r for r in rows if r["response"].strip()], policy)
    if not labelled:
        raise DataError(f"{round_dir}: all {len(rows)} sampled responses are empty; nothing to relabel "
                        "(raise max_new_tokens?)")
    write_jsonl_atomic(round_dir / "samples.jsonl",
                       [{k: v for k, v in r.items() if k != "record"} for r in labelled]
                       + [{"prompt": r["prompt"], "response": r["response"], "instruction": None} for r in empty])
    write_jsonl_atomic(round_dir / "train.jsonl", [{"prompt": model_input(config, r["instruction"], r["prompt"]),
                                                    "response": r["response"], "instruction": r["instruction"],
                                                    "query": r["prompt"]} for r in labelled])


def round_stats(config: HIRConfig, samples: list[dict], policy: Path, index: int) -> dict:
    """How the round's samples were relabelled: hir/goal_rate is the share that satisfied the goal."""
    labelled = [r for r in samples if r["instruction"] is not None]
    counts = {}
    for r in labelled:
        counts[r["instruction"]] = counts.get(r["instruction"], 0) + 1
    stats = {"hir/round": index, "hir/sampled": len(samples), "hir/empty": len(samples) - len(labelled),
             "hir/goal_rate": counts.get(config.goal_instruction, 0) / len(samples),
             "hir/instructions": counts, "hir/policy": str(policy)}
    if labelled and "reward" in labelled[0]:
        stats["hir/mean_reward"] = sum(r["reward"] for r in labelled) / len(labelled)
    print(f"hir: round {index}: {len(samples)} responses ({stats['hir/empty']} empty, not trained on), "
          f"{stats['hir/goal_rate']:.1%} satisfy the goal instruction; relabelled as {counts}")
    if config.goal_instruction not in counts:
        print(f"hir: round {index}: no response was relabelled with the goal instruction "
              f"{config.goal_instruction!r}; the policy is asked with it at inference")
    if config.contrastive_coef > 0 and len(counts) < 2:
        print(f"hir: round {index}: one relabelled instruction only; the contrastive term is 0 this round")
    return stats


def run(config: HIRConfig) -> Path:
    """Every round; returns the last round's model directory."""
    output = Path(config.output_dir)
    prepare_steps(config, output, "round-*", "a HIR run")
    records = data.load_prompts(data.source_of(config, "prompts"))
    policy, all_stats = Path(config.model), []
    for index in range(1, config.rounds + 1):
        round_dir = output / f"round-{index}"
        train_file = round_dir / "train.jsonl"
        if distributed.on_main(train_file.exists):  # rank 0's view decides for every rank
            print(f"hir: {train_file} is written; reusing it")
        else:
            write_round(config, policy, records, round_dir, index)    # 1-2. sample, relabel
        stats = round_stats(config, [r for _, r in data.read_jsonl(round_dir / "samples.jsonl")], policy, index)
        distributed.on_main(lambda: (round_dir / "stats.json").write_text(json.dumps(stats) + "\n"))
        all_stats.append(stats)
        # 3. fine-tune on the relabelled pairs
        if config.contrastive_coef > 0:
            policy = fine_tune_step(config, policy, train_file, round_dir / "sft", stage="sft",
                                    encode=encode_contrastive(config, train_file),
                                    micro_loss=contrastive_loss(config.contrastive_coef))
        else:
            policy = fine_tune_step(config, policy, train_file, round_dir / "sft")
    distributed.on_main(lambda: data.write_jsonl(output / "rounds.jsonl", all_stats))
    print(f"hir: final policy {policy}; ask it with {model_input(config, config.goal_instruction, '<prompt>')!r}")
    return policy
