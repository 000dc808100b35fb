"""AI-feedback labelling (RLAIF, Lee et al. 2023): candidate responses in, preference pairs out.

  1. candidates: each prompt's responses, from a JSONL file of {"prompt", "responses": [...]} or
     sampled from a policy (samples_per_prompt per prompt, through the rollout engine); a line's
     "criteria" (e.g. a constitution principle's preference question, RL-CAI) fills the template's
     {criteria} for its pairs;
  2. every pair of a prompt's distinct, non-blank candidates is judged by an AI labeller: an LM
     judge (the probability of its verdict tokens after a template that states the criteria,
     averaged over both orders of the pair to cancel position bias) or a reward model
     (sigmoid of the reward difference); rlhf_fast.judges holds both;
  3. each pair is written as {"prompt", "chosen", "rejected", "ai_preference"}, chosen being the
     response the labeller prefers and ai_preference its probability (>= 0.5), so `rm` and `dpo`
     train on the file as they train on human labels.
Everything that can be checked (the candidates file, the template's placeholders, the verdicts being
single tokens of the judge's tokenizer, the model directories) is checked before any model loads.
"""
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import torch

from rlhf_fast import data, distributed, judges
from rlhf_fast.config import ConfigError, check_fields, option
from rlhf_fast.data import PROMPT_FIELDS, columns_option, split_option
from rlhf_fast.device import pick_device
from rlhf_fast.errors import DataError
from rlhf_fast.models.loading import check_model_dir, load_causal_lm, load_tokenizer
from rlhf_fast.models.reward import read_reward_config
from rlhf_fast.rollout import SamplingConfig, sample_with
from rlhf_fast.seeding import seed_everything

CANDIDATE_FIELDS = ("prompt", "responses", "criteria")  # a candidates record: {"prompt", "responses": [...]}


@dataclass
class LabelConfig(SamplingConfig):
    """Preference pairs labelled by an AI judge (LM or reward model) from candidate responses."""

    candidates: str = option("", "JSONL of {\"prompt\", \"responses\": [...]} to label (or sample them: policy + "
                                 "prompts); any source: docs/data.md")
    candidates_columns: dict[str, str] = columns_option("candidates", CANDIDATE_FIELDS)
    candidates_split: str = split_option("candidates")
    policy: str = option("", "model directory to sample candidates from, for the prompts in `prompts`")
    prompts: str = option("", "prompt source (with policy): JSONL, parquet, arrow, json or csv file, saved "
                              "dataset directory or hub dataset (docs/data.md)")
    prompts_columns: dict[str, str] = columns_option("prompts", PROMPT_FIELDS)
    prompts_split: str = split_option("prompts")
    samples_per_prompt: int = option(2, "candidates sampled per prompt (every pair of them is labelled)", min=2)
    judge: str = option("", "LM judge: a local causal-LM directory")
    reward_model: str = option("", "or a reward model as the judge: a directory written by `rlhf-fast rm`")
    template: str = option(judges.DEFAULT_TEMPLATE, "LM judge prompt stating the criteria, with {prompt}, "
                                                    "{response_a} and {response_b}, and optionally {criteria} (each "
                                                    "line's 'criteria' field) ({{ }} for literal braces)")
    template_file: str = option("", "read the template from this file instead")
    verdict_a: str = option(" A", "the judge's verdict token for response A (one token of its tokenizer)")
    verdict_b: str = option(" B", "the judge's verdict token for response B (one token of its tokenizer)")
    chat: bool = option(False, "wrap the filled template as a user turn in the judge's chat template")
    min_preference: float = option(0.5, "write only pairs the labeller prefers with at least this probability",
                                   min=0.5, below=1.0)
    output: str = option("preferences.jsonl", "where the labelled pairs go (sampled candidates: *.candidates.jsonl)")
    batch_size: int = option(8, "prompts per sampling call; sequences per judge forward", min=1)
    max_length: int = option(1024, "token budget of a judge input (or of prompt + response for a reward model)",
                             min=2)
    seed: int = option(0, "sampling seed")
    device: str = option("auto", "'auto', 'cuda' or 'cpu'")
    dtype: str = option("auto", "'auto' (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32",
                        choices=("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32"))
    attn_implementation: str = option("auto", "'auto' (flash_attention_2 if installed, else sdpa)")
    trust_remote_code: bool = option(False, "allow model code from the model directories (off: safer)")

    def __post_init__(self):
        check_fields(self)
        self.check_sampling()
        if bool(self.candidates) == bool(self.policy or self.prompts):
            raise ConfigError("set either candidates (a JSONL of prompts and responses) or policy and prompts "
                              "(to sample the candidates), not both")
        if not self.candidates and not (self.policy and self.prompts):
            raise ConfigError("sampling candidates needs both policy (a model directory) and prompts (a JSONL file)")
        if bool(self.judge) == bool(self.reward_model):
            raise ConfigError("set exactly one labeller: judge (an LM directory) or reward_model (a reward model "
                              "directory)")
        if self.template_file and self.template != judges.DEFAULT_TEMPLATE:
            raise ConfigError("set template or template_file, not both")
        if self.judge:
            judges.check_template(self.judge_template(), judges.PAIRWISE,
                                  what="template_file" if self.template_file else "template")

    def judge_template(self) -> str:
        if not self.template_file:
            return self.template
        try:
            return Path(self.template_file).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"template_file: cannot read {self.template_file} ({e.strerror})") from None


def read_candidates(path) -> list[dict]:
    """[{"prompt", "responses", "criteria", "source"}] from {"prompt", "responses": [...]} lines (+ an
    optional "criteria" text); DataError naming the line when responses is not a list of at least 2
    strings."""
    records = []
    for source, record in data.read_rows(path, CANDIDATE_FIELDS, "candidates"):
        prompt = record.get("prompt")
        if not isinstance(prompt, str):
            raise DataError(f"{source}: field 'prompt' must be a string; expected {{\"prompt\", \"responses\": [...]}}")
        responses = record.get("responses")
        if not isinstance(responses, list) or len(responses) < 2:
            got = "no 'responses'" if responses is None else f"{len(responses)} responses" if isinstance(
                responses, list) else f"'responses' of type {type(responses).__name__}"
            raise DataError(f"{source}: expected 'responses', a list of at least 2 candidate responses, got {got}")
        for i, response in enumerate(responses):
            if not isinstance(response, str):
                raise DataError(f"{source}: responses[{i}] must be a string, got {response!r}")
        criteria = record.get("criteria")
        if criteria is not None and not isinstance(criteria, str):
            raise DataError(f"{source}: field 'criteria' must be a string, got {criteria!r}")
        records.append({"prompt": prompt, "responses": responses, "criteria": criteria, "source": source})
    return records


def check_criteria(config: LabelConfig, records: list[dict]) -> None:
    """A judge template that places {criteria} needs every line to give one (DataError naming the first
    that does not)."""
    if config.judge and "criteria" in judges.template_fields(config.judge_template()):
        for r in records:
            if not isinstance(r.get("criteria"), str):
                raise DataError(f"{r['source']}: the judge's template places {{criteria}} but this line has no text "
                                "field 'criteria'")


@torch.no_grad()
def sample_candidates(config: LabelConfig, device) -> list[dict]:
    """samples_per_prompt responses per prompt from the policy, through the rollout engine (under
    torchrun each rank samples its share of the prompts; every rank returns them all)."""
    records = data.load_prompts(data.source_of(config, "prompts"))
    records = records[distributed.share(len(records))]
    tokenizer = load_tokenizer(config.policy, padding_side="left", trust_remote_code=config.trust_remote_code)
    policy = load_causal_lm(config.policy, device=device, dtype=config.dtype, attn=config.attn_implementation,
                            trust_remote_code=config.trust_remote_code)
    k, out = config.samples_per_prompt, []
    for first in range(0, len(records), config.batch_size):
        chunk = records[first:first + config.batch_size]
        rollout = sample_with(policy, tokenizer, [data.encode_prompt(tokenizer, r.prompt) for r in chunk], config,
                              num_samples=k)
        texts = tokenizer.batch_decode(rollout.responses(), skip_special_tokens=True)
        out += [{"prompt": r.prompt, "responses": texts[i * k:(i + 1) * k], "criteria": r.fields.get("criteria"),
                 "source": r.source} for i, r in enumerate(chunk)]
    del policy
    return [candidate for part in distributed.gather_objects(out) for candidate in part]


def candidate_pairs(candidates: list[dict]) -> tuple[list[tuple[str, str, str, str | None]], int, int]:
    """(every (prompt, a, b, criteria) pair of a prompt's distinct non-blank responses, blank responses
    skipped, duplicate responses skipped)."""
    pairs, blank, duplicate = [], 0, 0
    for c in candidates:
        kept = []
        for response in c["responses"]:
            if not response.strip():
                blank += 1
            elif response.split() in [k.split() for k in kept]:
                duplicate += 1
            else:
                kept.append(response)
        pairs += [(c["prompt"], a, b, c.get("criteria")) for a, b in combinations(kept, 2)]
    return pairs, blank, duplicate


def load_judge(config: LabelConfig, device):
    """The labeller, its tokenizer-level checks (verdict tokens) done before its weights load."""
    if config.reward_model:
        return judges.RewardModelJudge.load(config.reward_model, tokenizer_dir=config.policy or None, device=device,
                                            dtype=config.dtype, max_length=config.max_length,
                                            batch_size=config.batch_size)
    return judges.LMJudge.load(config.judge, device=device, dtype=config.dtype, attn=config.attn_implementation,
                               trust_remote_code=config.trust_remote_code, template=config.judge_template(),
                               verdicts=(config.verdict_a, config.verdict_b), chat=config.chat,
                               batch_size=config.batch_size, max_length=config.max_length)


def check_judge(config: LabelConfig) -> None:
    """The judge's directory and (LM judge) that each verdict is one token of its tokenizer: no weights loaded."""
    if config.reward_model:
        read_reward_config(config.reward_model)
        return
    tokenizer = load_tokenizer(config.judge, trust_remote_code=config.trust_remote_code)
    judges.verdict_token_ids(tokenizer, (config.verdict_a, config.verdict_b), where="verdict_a / verdict_b")


def label_pairs(judge, pairs, min_preference: float) -> list[dict]:
    """{"prompt", "chosen", "rejected", "ai_preference"} (+ the pair's "criteria", if any) for every pair
    the judge prefers with at least min_preference (a tie at exactly 0.5 keeps the first response as chosen)."""
    if not pairs:
        return []
    prompts, a, b, criteria = (list(column) for column in zip(*pairs))
    p = judge.preference(prompts, a, b, criteria).tolist()
    out = []
    for x, ya, yb, pa, c in zip(prompts, a, b, p, criteria):
        chosen, rejected, preference = (ya, yb, pa) if pa >= 0.5 else (yb, ya, 1.0 - pa)
        if preference >= min_preference:
            record = {"prompt": x, "chosen": chosen, "rejected": rejected, "ai_preference": round(preference, 6)}
            out.append(record if c is None else {**record, "criteria": c})
    return out


def run(config: LabelConfig) -> Path:
    seed_everything(config.seed)
    device = pick_device(config.device)
    # 0. everything checkable before a model loads
    candidates = read_candidates(data.source_of(config, "candidates")) if config.candidates else None
    if candidates is None:
        check_criteria(config, [{"criteria": r.fields.get("criteria"), "source": r.source}
                                for r in data.load_prompts(data.source_of(config, "prompts"))])
        check_model_dir(config.policy)
    else:
        check_criteria(config, candidates)
    check_judge(config)
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # 1. candidates
    if candidates is None:
        candidates = sample_candidates(config, device)
        written = [{k: c[k] for k in ("prompt", "responses", "criteria") if c[k] is not None} for c in candidates]
        distributed.on_main(lambda: data.write_jsonl(output.with_suffix(".candidates.jsonl"), written))
    pairs, blank, duplicate = candidate_pairs(candidates)
    if blank or duplicate:
        print(f"label: skipped {blank} blank and {duplicate} duplicate responses")
    if not pairs:
        raise DataError(f"no pair to label: {len(candidates)} prompts have fewer than 2 distinct non-blank responses")
    # 2-3. the labeller's preference for each pair
    labelled = label_pairs(load_judge(config, device), pairs, config.min_preference)
    distributed.on_main(lambda: data.write_jsonl(output, labelled))
    mean = sum(r["ai_preference"] for r in labelled) / max(len(labelled), 1)
    print(f"label: {len(labelled)} of {len(pairs)} pairs written to {output} (mean ai_preference {mean:.3f}, "
          f"min_preference {config.min_preference})")
    return output
