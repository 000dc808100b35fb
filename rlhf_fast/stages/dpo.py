"""Direct preference optimisation and its variants: the policy learns from preference pairs with no
reward model and no sampling.

For a pair (prompt x, chosen y_c, rejected y_l), DPO (Rafailov et al. 2023) minimises
    -log sigmoid(beta [(log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_l|x) - log ref(y_l|x))])
where ref is the SFT model; `loss_type` picks IPO, SLiC's hinge, robust / conservative DPO or the
reference-free SimPO instead (rlhf_fast.preference_losses holds the formulas). Each step:
  1. the reference's summed response log-probs: the same trunk with adapters off (LoRA: the SFT
     model, no second copy), a frozen copy under full fine-tuning (optionally on the CPU), or a table
     computed once over the dataset before training (precompute_ref_logprobs; full fine-tuning then
     holds no copy at all); through kernels.linear_dpo_logps, which walks the LM head as the loss
     does, so that on the first step the reference's sums are the policy's, bitwise;
  2. the pairs' chosen and rejected sequences go through the policy trunk as ONE batch of 2B rows,
     and only their response positions' hidden states go on to the fused loss head
     (kernels.linear_dpo_loss: each sequence's log-probs summed, the loss (with Llama 2's margin as
     an offset, or an AI labeller's probability as a soft label, when asked) and its gradient made in
     one pass over the LM head, never the logits), weighted like the reward model's (a ranking of k
     counts once: 1/C(k,2) per pair);
  3. one optimiser step through the shared step loop (resume, NaN guards, checkpoints).
Logged under TRL DPOTrainer's names in the stage's namespace: dpo/rewards/chosen, .../rejected,
.../margins, .../accuracies (rewards = beta x the log-ratio to the reference), dpo/logps/chosen,
dpo/logps/rejected (summed over the response).
Output: <output_dir>/model, a plain HF directory with the adapter merged (like sft), so the DPO
policy can start a next stage.
"""
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_fast import data, distributed
from rlhf_fast.batching import batch_indices
from rlhf_fast.config import ConfigError, option, require
from rlhf_fast.data import PREFERENCE_FIELDS, columns_option, split_option
from rlhf_fast.device import autocast, module_device
from rlhf_fast.kernels import linear_dpo_logps, linear_dpo_loss
from rlhf_fast.errors import DataError
from rlhf_fast.memory import format_ledger, memory_ledger, peak_memory_gb
from rlhf_fast.models import sharding
from rlhf_fast.models.loading import load_tokenizer, load_trainable_lm, save_model_dir
from rlhf_fast.models.logprobs import counted_head_inputs, counted_positions, sequence_logprobs
from rlhf_fast.models.roles import ActorCritic
from rlhf_fast.preference_losses import LOSS_TYPES, REFERENCE_FREE, SMOOTHED
from rlhf_fast.seeding import seed_everything
from rlhf_fast.training import rundir
from rlhf_fast.training.config import TrainConfig
from rlhf_fast.training.loop import run_steps, save_final
from rlhf_fast.training.optim import OptimizerStep, build_optimizer, total_steps

# the losses whose label smoothing a soft label can set per pair (robust's divides by 1 - 2e: not at e = 0.5)
SOFT_LABELLED = ("sigmoid", "simpo")


@dataclass
class DPOConfig(TrainConfig):
    """DPO / IPO / SLiC / robust DPO / SimPO on the preference or ranking JSONL that `rm` reads."""

    data: str = option("", "preference or ranking source: JSONL, parquet, arrow, json or csv file, "
                           "saved dataset directory or hub dataset (docs/data.md)")
    data_columns: dict[str, str] = columns_option("data", PREFERENCE_FIELDS)
    data_split: str = split_option("data")
    loss_type: str = option("sigmoid", "'sigmoid' (DPO), 'ipo', 'hinge' (SLiC), 'robust' (robust DPO), 'simpo' "
                                       "(reference-free, length-normalised)", choices=LOSS_TYPES)
    beta: float = option(0.1, "beta: strength of the KL anchor to the reference (SimPO's paper uses ~2)", above=0.0)
    label_smoothing: float = option(0.0, "share of labels assumed flipped: conservative DPO for sigmoid / simpo, "
                                         "robust DPO's noise rate for robust", min=0.0, below=0.5)
    simpo_gamma: float = option(0.5, "SimPO's target reward margin gamma (simpo only)", min=0.0)
    use_margin: bool = option(False, "subtract each pair's Llama 2 margin ('margin' or 'rating') from beta x "
                                     "the log-ratio difference")
    margin_set: str = option("small", "Llama 2 rating -> margin map: 'small' or 'large'", choices=("small", "large"))
    soft_labels: bool = option(False, "train on each pair's 'ai_preference' p (written by `rlhf-fast label`) as a "
                                      "soft label: -p log sig(z) - (1 - p) log sig(-z); pairs without one have p = 1 "
                                      "(sigmoid and simpo)")
    precompute_ref_logprobs: bool = option(False, "compute the reference's log-probs once over the data before "
                                                  "training (no reference forward per step; under full "
                                                  "fine-tuning no frozen copy is kept)")
    offload_reference: bool = option(False, "full fine-tuning: keep the frozen reference copy on the CPU")
    eval_fraction: float = option(0.0, "share of prompts held out to report rewards/accuracies on", min=0.0,
                                  below=1.0)

    def __post_init__(self):
        super().__post_init__()
        require(self.data, "data", "a preference or ranking source (docs/data.md)")
        if self.label_smoothing > 0 and self.loss_type not in SMOOTHED:
            raise ConfigError(f"label_smoothing applies to loss_type {', '.join(SMOOTHED)}; {self.loss_type!r} "
                              "does not read it")
        if self.soft_labels and (self.loss_type not in SOFT_LABELLED or self.label_smoothing > 0):
            raise ConfigError(f"soft_labels applies to loss_type {', '.join(SOFT_LABELLED)} without label_smoothing "
                              f"(the labels set it per pair), got {self.loss_type!r}, label_smoothing "
                              f"{self.label_smoothing}")

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE


@dataclass(frozen=True)
class EncodedPair:
    chosen: data.Encoded
    rejected: data.Encoded
    margin: float
    weight: float
    label: float = 1.0  # the probability that chosen is the better one (soft labels), 1 for a hard label


def split_by_prompt(pairs, eval_fraction: float, seed: int):
    """(train, held_out): whole prompts go to one side, so held-out prompts are unseen (as `rm` splits)."""
    prompts = sorted({p.prompt for p in pairs})
    random.Random(seed).shuffle(prompts)
    held_out = set(prompts[:int(len(prompts) * eval_fraction)])
    return [p for p in pairs if p.prompt not in held_out], [p for p in pairs if p.prompt in held_out]


def soft_labels(path) -> dict[str, float]:
    """{"path:line": ai_preference} of the lines that carry one (a number in [0.5, 1]: the chosen side
    is the one the labeller preferred); DataError naming a line with another value."""
    labels = {}
    for source, record in data.read_rows(path, PREFERENCE_FIELDS, "preference"):
        if "ai_preference" in record:
            value = record["ai_preference"]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.5 <= value <= 1:
                raise DataError(f"{source}: field 'ai_preference' must be a number in [0.5, 1] (the labeller's "
                                f"probability that chosen is better), got {value!r}")
            labels[source] = float(value)
    return labels


def encode_pairs(pairs, tokenizer, max_length: int, *, split: str, labels=None) -> list[EncodedPair]:
    """Token ids of both sides of every pair, with its soft label from `labels` (by source line).
    Truncated responses are counted; pairs whose sides differ only in white space, or are the same
    tokens after truncation, teach nothing (h = 0, no gradient) and are dropped with a count."""
    encoded, truncated, identical = [], 0, 0
    for p in pairs:
        if p.chosen.split() == p.rejected.split():
            identical += 1
            continue
        chosen = data.encode_pair(tokenizer, p.prompt, p.chosen, max_length, source=p.source)
        rejected = data.encode_pair(tokenizer, p.prompt, p.rejected, max_length, source=p.source)
        truncated += chosen.truncated + rejected.truncated
        if chosen.input_ids == rejected.input_ids:
            identical += 1
            continue
        encoded.append(EncodedPair(chosen, rejected, p.margin, p.weight, (labels or {}).get(p.source, 1.0)))
    if truncated:
        print(f"dpo: {truncated} of {2 * len(pairs)} {split} responses truncated to max_length={max_length}")
    if identical:
        print(f"dpo: dropped {identical} {split} pairs whose chosen and rejected are the same after white space "
              f"or truncation to max_length={max_length}")
    return encoded


def collate_pairs(pairs: list[EncodedPair], pad_id: int, device):
    """One right-padded batch of 2B rows, the B chosen sequences then the B rejected ones:
    input_ids, attention_mask [2B, T] and response starts [2B]."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    input_ids, attention_mask = data.pad_batch([r.input_ids for r in rows], pad_id, side="right")
    starts = torch.tensor([r.response_start for r in rows])
    return input_ids.to(device), attention_mask.to(device), starts.to(device)


def response_logprob_sums(model, input_ids, attention_mask, starts) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs of each row's response tokens [R] fp32, their count [R]) through the fused
    head: only the response positions' hidden states meet the LM head's weight, never (R, T, V)."""
    device = module_device(model)
    with autocast(device, next(model.parameters()).dtype):
        logprobs, _ = sequence_logprobs(model, input_ids.to(device), attention_mask.to(device),
                                        response_start=starts.to(device))
    lengths = counted_positions(attention_mask, starts).sum(-1)
    return logprobs.sum(-1).to(input_ids.device), lengths


def response_head_inputs(where: str, model, input_ids, attention_mask, starts):
    """(LM head, hidden [M, D], targets [M], sequence_ends [R]) of a collated batch's R rows: the trunk
    runs once and only the M response positions, row after row, go on to the fused head."""
    device = module_device(model)
    with autocast(device, next(model.parameters()).dtype):
        head, hidden, targets, counted = counted_head_inputs(where, model, input_ids.to(device),
                                                             attention_mask.to(device), starts.to(device))
    return head, hidden, targets, counted.sum(-1).cumsum(0)


def pair_logprob_sums(model, input_ids, attention_mask, starts) -> torch.Tensor:
    """[2B] fp32: the summed response log-probs of a collated batch's rows (chosen, then rejected)
    through kernels.linear_dpo_logps, which walks the LM head as linear_dpo_loss does: where the model
    is the policy's twin (the first step) the sums are the policy's own, bitwise (rewards exactly 0)."""
    head, hidden, targets, sequence_ends = response_head_inputs("dpo reference", model, input_ids, attention_mask,
                                                                starts)
    chosen, rejected = linear_dpo_logps(hidden, head.weight, targets, bias=head.bias, sequence_ends=sequence_ends)
    return torch.cat([chosen, rejected]).to(input_ids.device)


class Reference:
    """The reference's summed response log-probs per row of a collated batch: the policy's trunk with
    adapters off (or the frozen copy) on the fly, or rows of a table precomputed before training."""

    def __init__(self, actor: ActorCritic):
        self.actor = actor
        self.tables: dict[str, torch.Tensor] = {}  # split -> [N, 2] (chosen, rejected)

    @torch.no_grad()
    def logprobs(self, input_ids, attention_mask, starts) -> torch.Tensor:
        with self.actor.as_reference() as reference:
            return pair_logprob_sums(reference, input_ids, attention_mask, starts)

    @torch.no_grad()
    def precompute(self, split: str, pairs: list[EncodedPair], pad_id: int, micro_batch: int, device) -> None:
        """The reference's (chosen, rejected) sums for every pair of `split`, in order, micro-batch by micro-batch."""
        rows = []
        for first in range(0, len(pairs), micro_batch):
            micro = pairs[first:first + micro_batch]
            sums = self.logprobs(*collate_pairs(micro, pad_id, device))
            rows.append(torch.stack([sums[:len(micro)], sums[len(micro):]], dim=1))
        self.tables[split] = torch.cat(rows) if rows else torch.zeros(0, 2, device=device)

    def __call__(self, split: str, indices: list[int], input_ids, attention_mask, starts) -> torch.Tensor:
        """[2B]: the chosen rows' sums, then the rejected rows'."""
        if split in self.tables:
            table = self.tables[split][indices]
            return torch.cat([table[:, 0], table[:, 1]])
        return self.logprobs(input_ids, attention_mask, starts)


def pair_losses(config: DPOConfig, model, reference: Reference | None, pairs: list[EncodedPair], indices: list[int],
                split: str, pad_id: int, device, weights: torch.Tensor | None = None):
    """(loss, stats) of B pairs: the sum over pairs of weight x the loss of config.loss_type (weights
    [B], None: 1) and TRL's metrics as means over the B pairs (kernels.linear_dpo_loss's stats).
    One policy trunk forward over the 2B rows (chosen then rejected); the reference's sums; the
    response positions through the fused loss head, which makes the gradient in the same pass."""
    input_ids, attention_mask, starts = collate_pairs(pairs, pad_id, device)
    ref = reference(split, indices, input_ids, attention_mask, starts) if reference is not None else None   # [2B]
    n = len(pairs)
    head, hidden, targets, sequence_ends = response_head_inputs("dpo", model, input_ids, attention_mask, starts)
    margin = torch.tensor([p.margin for p in pairs], device=device) if config.use_margin else None
    smoothing = (1 - torch.tensor([p.label for p in pairs], device=device) if config.soft_labels
                 else config.label_smoothing)
    return linear_dpo_loss(hidden, head.weight, targets, None if ref is None else ref[:n],
                           None if ref is None else ref[n:], bias=head.bias, sequence_ends=sequence_ends,
                           loss_type=config.loss_type, beta=config.beta, label_smoothing=smoothing,
                           simpo_gamma=config.simpo_gamma, margin=margin, pair_weights=weights, reduction="sum")


def add_pair_stats(totals: dict, stats: dict, pairs: int) -> None:
    """Accumulate a micro-batch's metrics (means over its pairs) as mean x pairs."""
    for name, value in stats.items():
        totals[name] = totals.get(name, 0.0) + value.item() * pairs


def pair_count_means(totals: dict, pairs: int) -> dict[str, float]:
    """The batch's means (TRL's metrics over all its pairs) from add_pair_stats' totals."""
    return {name: total / pairs for name, total in totals.items()}


@torch.no_grad()
def evaluate(config: DPOConfig, model, reference, pairs: list[EncodedPair], pad_id: int, device) -> dict:
    """TRL's reward metrics and the loss on held-out pairs, as `dpo/eval_<name>`."""
    totals, loss = {}, 0.0
    for indices in distributed.micro_batches(list(range(len(pairs))), config.micro_batch_size):  # this rank's share
        micro = [pairs[i] for i in indices]
        micro_loss, stats = pair_losses(config, model, reference, micro, indices, "held_out", pad_id, device)
        loss += micro_loss.item()
        add_pair_stats(totals, stats, len(micro))
    loss, = distributed.sum_across(loss)
    metrics = pair_count_means(distributed.sum_dict_across(totals), len(pairs))
    return {"dpo/eval_loss": loss / len(pairs), **{f"dpo/eval_{k}": v for k, v in metrics.items()}}


def run(config: DPOConfig) -> Path:
    seed_everything(config.seed)
    output = rundir.prepare(config, "dpo")
    # the data is read and checked before the model loads
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    margins = data.LLAMA2_MARGINS_SMALL if config.margin_set == "small" else data.LLAMA2_MARGINS_LARGE
    pairs = data.load_preferences(data.source_of(config, "data"), margins, tokenizer=tokenizer)
    labels = soft_labels(data.source_of(config, "data")) if config.soft_labels else None
    train_pairs, eval_pairs = split_by_prompt(pairs, config.eval_fraction, config.seed)
    train = encode_pairs(train_pairs, tokenizer, config.max_length, split="training", labels=labels)
    held_out = encode_pairs(eval_pairs, tokenizer, config.max_length, split="held-out", labels=labels)
    if not train:
        raise DataError(f"{config.data}: no training pair left to learn from (see the counts above)")
    print(f"dpo: {len(train)} training pairs, {len(held_out)} held-out pairs, loss {config.loss_type}, "
          f"beta {config.beta}")

    model, tokenizer, device = load_trainable_lm(config, "policy", tokenizer=tokenizer)
    pad_id = tokenizer.pad_token_id
    # the reference: adapters off (LoRA), a frozen copy (full fine-tuning), a precomputed table, or none (SimPO)
    if config.lora_r > 0 or not config.needs_reference:
        actor = ActorCritic(model, None)
    elif config.precompute_ref_logprobs:
        actor = ActorCritic(model, None, reference=model)  # read once, below, before any step changes it
    else:
        actor = ActorCritic.full_finetune(model, None, config.offload_reference)
    reference = Reference(actor) if config.needs_reference else None
    if reference is not None and config.precompute_ref_logprobs:
        # before the first step (and before a resume loads trained weights) the policy IS the reference
        model.eval()
        reference.precompute("training", train, pad_id, config.micro_batch_size, device)
        reference.precompute("held_out", held_out, pad_id, config.micro_batch_size, device)
        print(f"dpo: reference log-probs precomputed for {len(train) + len(held_out)} pairs")

    if config.fsdp:
        sharding.shard(model)  # after the reference is set up
        if actor.reference_model not in (None, model) and not config.offload_reference:
            sharding.shard(actor.reference_model)  # full fine-tuning's frozen copy, gathered per layer
    num_steps = total_steps(config, len(train))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, config, num_steps)
    stepper = OptimizerStep(params, optimizer, scheduler, max_grad_norm=config.max_grad_norm,
                            max_skipped=config.max_skipped_steps)
    ledger = memory_ledger(model, micro_batch=2 * config.micro_batch_size, seq_len=config.max_length)
    if actor.reference_model not in (None, model) and module_device(actor.reference_model) == device:
        ledger["reference (frozen copy)"] = sum(p.numel() * p.element_size()
                                                for p in actor.reference_model.parameters())
    print(format_ledger(ledger))
    model.train()

    def train_step(step: int) -> dict:
        indices = batch_indices(len(train), config.batch_size, config.seed, step)
        total_weight = sum(train[i].weight for i in indices)
        loss_sum, tokens, totals = 0.0, 0, {}
        for micro_indices in distributed.micro_batches(indices, config.micro_batch_size):  # this rank's share
            micro = [train[i] for i in micro_indices]
            weight = torch.tensor([p.weight for p in micro], device=device)
            loss, stats = pair_losses(config, model, reference, micro, micro_indices, "training", pad_id, device,
                                      weights=weight)
            (loss / total_weight).backward()
            loss_sum += loss.item()
            tokens += sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in micro)
            add_pair_stats(totals, stats, len(micro))
        loss_sum, tokens = distributed.sum_across(loss_sum, tokens)
        loss = loss_sum / total_weight
        metrics = pair_count_means(distributed.sum_dict_across(totals), len(indices))
        return {"dpo/loss": loss, **{f"dpo/{k}": v for k, v in metrics.items()}, "dpo/grad_norm": stepper(loss),
                "perf/tokens": tokens}

    modules = {"policy": model}
    logger = run_steps(config, "dpo", train_step, num_steps=num_steps, modules=modules, stepper=stepper,
                       device=device, vocab_size=actor.head_vocab_size())
    model.eval()
    if held_out:
        metrics = evaluate(config, model, reference, held_out, pad_id, device)
        logger.log(num_steps, metrics)
        print(f"dpo: held-out reward accuracy {metrics['dpo/eval_rewards/accuracies']:.3f}, margin "
              f"{metrics['dpo/eval_rewards/margins']:.3f} over {len(held_out)} pairs")
    logger.close()
    model_dir = output / "model"
    save_final(config, "dpo", lambda state=None: save_model_dir(model, tokenizer, model_dir, state),
               num_steps=num_steps, modules=modules, stepper=stepper, sharded=model)
    print(f"dpo: model written to {model_dir}; peak memory {peak_memory_gb(device):.2f} GB")
    return model_dir
