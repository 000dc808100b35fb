"""Step 3 of InstructGPT: PPO against the reward model with a per-token KL penalty; and, on the
same code path, the critic-free estimators users expect beside it (GRPO, Dr. GRPO, RLOO, REINFORCE++).

Each iteration:
  1. rollout()            sample samples_per_prompt responses to each of a batch of prompts from the
                          current policy (the rollout engine);
  2. score()              reward model(s) and reward functions on (prompt, response), optionally
                          normalised / clipped;
  3. make_experience()    old log-probs and values (policy), reference log-probs (adapters off);
  4. compute_advantages() the advantage estimator: GAE on r_t = -beta KL_t (+ score at the last
                          token) with the value function, or a critic-free one (rlhf_fast.estimators);
  5. train_minibatches()  epochs over shuffled minibatches: clipped surrogate from hidden states
                          (fused head, no logits; + beta KL to the reference when the KL is a loss
                          term) + clipped value loss with a critic (+ PPO-ptx);
  6. the KL controller adapts beta toward a target KL (Ziegler et al., 2019), if asked.
`rlhf-fast grpo` is this stage with GRPO's defaults (GRPOConfig).

Under torchrun each rank samples, scores and makes the experience of its share of the batch's
rows; the experience is then gathered, so advantages, whitening and the KL controller see the whole
batch as one process would, and each rank trains on its share of every minibatch's micro-batches.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_fast import data, distributed, estimators, kernels, rewards
from rlhf_fast.batching import collate
from rlhf_fast.checkpoint import atomic_directory, check_finite
from rlhf_fast.config import ConfigError, check_divides, option, require
from rlhf_fast.data import PROMPT_FIELDS, SFT_FIELDS, columns_option, split_option
from rlhf_fast.device import autocast
from rlhf_fast.memory import format_ledger, memory_ledger, peak_memory_gb
from rlhf_fast.models.adapters import add_lora, load_lora, set_trainable
from rlhf_fast.models import sharding
from rlhf_fast.models.heads import ScalarHead
from rlhf_fast.models.loading import load_trainable_lm
from rlhf_fast.models.logprobs import response_nll
from rlhf_fast.models.modes import evaluating
from rlhf_fast.models.reward import HEAD_FILE, load_reward_models, read_reward_config
from rlhf_fast.models.roles import VALUE_ADAPTER, VALUE_MODES, ActorCritic
from rlhf_fast.models.trunk import unwrap_peft
from rlhf_fast.rewards import RewardConfig
from rlhf_fast.rollout import Rollout, RolloutEngine, SamplingConfig, logprob_diff
from rlhf_fast.seeding import run_generator, seed_everything
from rlhf_fast.training.config import TrainConfig
from rlhf_fast.training.loop import run_steps, save_final
from rlhf_fast.training import rundir
from rlhf_fast.training.optim import OptimizerStep, build_optimizer


OLD_LOGPROBS = ("auto", "rollout", "recompute")


def resolve_old_logprobs(choice: str, dtype: torch.dtype) -> str:
    """"rollout" | "recompute" for the weights' dtype: "auto" takes the rollout's in fp32 (2e-7 to 3e-7
    from a recompute on the CPU), recomputes in half precision (not measured yet; `rollout/logprob_diff`
    shows it)."""
    if choice == "auto":
        return "rollout" if dtype == torch.float32 else "recompute"
    return choice


@dataclass
class PPOConfig(RewardConfig, SamplingConfig, TrainConfig):
    """PPO on {"prompt"} JSONL against a reward model saved by `rlhf-fast rm`."""

    prompts: str = option("", "prompt source: JSONL, parquet, arrow, json or csv file, "
                              "saved dataset directory or hub dataset (docs/data.md)")
    prompts_columns: dict[str, str] = columns_option("prompts", PROMPT_FIELDS)
    prompts_split: str = split_option("prompts")
    advantage_estimator: str = option("gae", "'gae' (PPO with a value function), or critic-free: 'grpo', "
                                             "'dr_grpo', 'rloo', 'reinforce_pp' (no value head, no value "
                                             "optimiser state)", choices=estimators.ESTIMATORS)
    samples_per_prompt: int = option(1, "responses sampled per prompt (a group); batch_size counts responses",
                                     min=1)
    iterations: int = option(20, "rollout + update iterations", min=1)
    mini_batch_size: int = option(8, "sequences per optimiser step within a PPO epoch", min=1)
    experience_batch_size: int = option(0, "rows per no-grad forward of the experience pass (old log-probs, "
                                           "values, reference log-probs; TRL: local_rollout_forward_batch_size); "
                                           "0 = micro_batch_size. Larger is faster, at more activation memory",
                                        min=0)
    old_logprobs: str = option("auto", "where the old log-probs (and the values of a value head on the policy "
                                       "trunk) come from: 'rollout' (the engine's own, from an fp32 head as the "
                                       "trainer's, and the hidden states it drew from: one policy forward fewer "
                                       "per iteration, as TRL does), 'recompute' (a policy forward over the "
                                       "rollout, as verl and OpenRLHF do), 'auto' (rollout with fp32 weights, "
                                       "where the two differ by rounding; recompute in bf16/fp16, where the "
                                       "KV-cached decode's activations are rounded otherwise)",
                               choices=OLD_LOGPROBS, before="recompute")
    ppo_epochs: int = option(2, "passes over each rollout batch", min=1)
    max_new_tokens: int = option(32, "response budget per rollout", min=1)
    clip_low: float = option(0.2, "PPO ratio clip below 1", min=0.0, below=1.0)
    clip_high: float = option(0.2, "PPO ratio clip above 1", min=0.0)
    value_clip: float = option(0.2, "value-function clip around the old values", min=0.0)
    vf_coef: float = option(0.5, "weight of the value loss", min=0.0)
    entropy_coef: float = option(0.0, "entropy bonus weight")
    gamma: float = option(1.0, "GAE discount", min=0.0, max=1.0)
    lam: float = option(0.95, "GAE lambda", min=0.0, max=1.0)
    kl_coef: float = option(0.05, "initial beta of the KL penalty to the reference", min=0.0)
    kl_estimator: str = option("k1", "per-token KL estimator: k1, k2 or k3 (GRPO uses k3)",
                               choices=kernels.KL_ESTIMATORS)
    loss_agg: str = option("token-mean", "how token losses make the loss: 'token-mean' (over the minibatch's "
                                         "tokens), 'seq-mean-token-mean' (GRPO's paper: each response's mean, "
                                         "then the mean), 'seq-mean-token-sum-norm' (Dr. GRPO: each response's "
                                         "sum / max_new_tokens, then the mean)",
                           choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"))
    kl_mode: str = option("auto", "where the KL goes: 'reward' (per token, InstructGPT; summed per sequence "
                                  "for the group estimators), 'loss' (beta x KL term, GRPO), 'auto' (loss for "
                                  "grpo / dr_grpo / rloo, reward otherwise)", choices=("auto", "reward", "loss"))
    target_kl: float = option(0.0, "adaptive KL controller's target (0 = fixed beta)", min=0.0)
    kl_horizon: int = option(10000, "adaptive KL controller's horizon (samples)", min=1)
    whiten_advantages: bool = option(True, "whiten advantages over the batch's response tokens")
    advantage_backend: str = option("auto", "kernels backend of GAE / whitening: 'auto' (Triton on CUDA, the "
                                            "native op on CPU when built, else torch), or one of them; pin it "
                                            "to make runs match across builds (their floats differ in the last bits)",
                                    choices=("auto", "triton", "torch", "native", "reference"))
    normalize_scores: bool = option(False, "standardise scores by running mean/std")
    score_clip: float = option(0.0, "clip scores to +-score_clip after normalisation (0 = off)", min=0.0)
    missing_eos_penalty: float = option(0.0, "subtracted from the score of responses without EOS")
    value_mode: str = option("head", "value function: 'head' on the policy trunk (detached), 'shared' "
                                     "(its gradient trains the trunk too), 'adapter' (own LoRA adapter + head)",
                             choices=VALUE_MODES)
    value_init_from_reward: bool = option(False, "start the value head (and, in adapter mode, the value "
                                                 "adapter) from the reward model's; else V = 0")
    offload_reference: bool = option(False, "full fine-tuning: keep the frozen reference on the CPU")
    ptx_data: str = option("", "SFT source for the PPO-ptx pretraining-mix term (empty = off; docs/data.md)")
    ptx_data_columns: dict[str, str] = columns_option("ptx_data", SFT_FIELDS)
    ptx_data_split: str = split_option("ptx_data")
    ptx_coef: float = option(0.0, "weight of the PPO-ptx NLL term (InstructGPT's gamma)", min=0.0)

    def __post_init__(self):
        super().__post_init__()
        check_divides(self.batch_size, self.mini_batch_size, "batch_size / mini_batch_size")
        check_divides(self.mini_batch_size, self.micro_batch_size, "mini_batch_size / micro_batch_size")
        if self.value_mode == "adapter" and self.lora_r == 0:
            raise ConfigError("value_mode 'adapter' needs a LoRA policy (lora_r > 0)")
        self.check_rewards()
        self.check_sampling()
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError("ptx_coef > 0 needs ptx_data (an SFT JSONL file)")
        check_divides(self.batch_size, self.samples_per_prompt, "batch_size / samples_per_prompt")
        if self.advantage_estimator in estimators.GROUP_BASELINES and self.samples_per_prompt < 2:
            raise ConfigError(f"advantage_estimator {self.advantage_estimator!r} compares the samples of a prompt: "
                              "set samples_per_prompt >= 2")
        if self.critic_free and self.value_init_from_reward:
            raise ConfigError(f"value_init_from_reward: {self.advantage_estimator} trains no value function")
        if self.value_init_from_reward and not self.reward_directories():
            raise ConfigError("value_init_from_reward needs a reward model to copy")
        require(self.prompts, "prompts", "a prompt source (docs/data.md)")

    def check_world(self, world: distributed.World) -> None:
        """Every rank gets whole micro-batches of each minibatch (batch_size then follows)."""
        super().check_world(world)
        if world.size > 1:
            check_divides(self.mini_batch_size, self.micro_batch_size * world.size,
                          f"mini_batch_size / (micro_batch_size x {world.size} ranks)")

    @property
    def critic_free(self) -> bool:
        return self.advantage_estimator in estimators.CRITIC_FREE

    @property
    def kl_in_loss(self) -> bool:
        if self.kl_mode == "auto":
            return self.advantage_estimator in estimators.GROUP_BASELINES
        return self.kl_mode == "loss"


@dataclass
class GRPOConfig(PPOConfig):
    """GRPO (Shao et al. 2024) on {"prompt"} JSONL: PPO's stage with a group of samples per prompt, the
    group-normalised reward as every token's advantage, no value function, and beta x k3 KL to the
    reference as a loss term; set advantage_estimator for Dr. GRPO, RLOO or REINFORCE++."""

    advantage_estimator: str = option("grpo", "'grpo', 'dr_grpo', 'rloo', 'reinforce_pp', or 'gae' (PPO)",
                                      choices=estimators.ESTIMATORS)
    samples_per_prompt: int = option(4, "responses sampled per prompt (a group); batch_size counts responses",
                                     min=1)
    kl_coef: float = option(0.04, "beta of the KL to the reference (GRPO: 0.04)", min=0.0)
    kl_estimator: str = option("k3", "per-token KL estimator: k1, k2 or k3 (GRPO uses k3)",
                               choices=kernels.KL_ESTIMATORS)
    ppo_epochs: int = option(1, "passes over each rollout batch", min=1)
    loss_agg: str = option("seq-mean-token-mean", "'seq-mean-token-mean' (GRPO's paper), 'token-mean', or "
                                                  "'seq-mean-token-sum-norm' (Dr. GRPO: sum / max_new_tokens)",
                           choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
                           before="token-mean")  # GRPO averaged over tokens before the option existed


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) (Ziegler et al., 2019)."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, num_samples: int) -> float:
        if self.target > 0:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.beta *= 1.0 + error * num_samples / self.horizon
        return self.beta


class RunningMoments:
    """Running mean and std of scores (Chan et al.'s parallel update)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-8

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        delta = x.mean().item() - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + x.var(unbiased=False).item() * n
                    + delta ** 2 * self.count * n / total) / total
        self.count = total


@dataclass
class Experience:
    rollout: Rollout
    scores: torch.Tensor               # [B]
    old_logprobs: torch.Tensor         # [B, L-1]
    ref_logprobs: torch.Tensor         # [B, L-1]
    old_values: torch.Tensor | None    # [B, L-1]; None without a critic
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


class PPOTrainer:
    def __init__(self, config: PPOConfig):
        self.config = config
        seed_everything(config.seed)
        rundir.prepare(config, "ppo")
        # the data and the reward models are checked before any model loads
        records = data.load_prompts(data.source_of(config, "prompts"))
        for directory in config.reward_directories().values():
            read_reward_config(directory)
        model, self.tokenizer, self.device = load_trainable_lm(config, "policy", padding_side="left")
        self.reward_models = load_reward_models(config.reward_directories(),
                                                shared_trunk=model if config.lora_r else None,
                                                device=self.device, dtype=config.dtype)
        for reward_model in self.reward_models.values():
            if config.lora_r and reward_model.adapter is not None:
                model = reward_model.trunk  # reward adapters were loaded onto the policy's PeftModel
        # the one a value function may copy
        self.reward_model = next(iter(self.reward_models.values()), None)
        self.scorer = rewards.Scorer(config, self.reward_models)
        if config.value_mode == "adapter" and not config.critic_free:
            model = self._add_value_adapter(model)
        value_head = None if config.critic_free else self._value_head(model.config.hidden_size)
        self.actor = (ActorCritic(model, value_head, value_mode=config.value_mode) if config.lora_r else
                      ActorCritic.full_finetune(model, value_head, config.offload_reference, config.value_mode))
        if config.fsdp:
            sharding.shard(self.actor.model)  # every adapter is on
            if self.actor.reference_model is not None and not config.offload_reference:
                sharding.shard(self.actor.reference_model)  # full fine-tuning's frozen copy, gathered per layer
        self.old_logprobs = resolve_old_logprobs(config.old_logprobs, next(unwrap_peft(model).parameters()).dtype)
        from_rollout = self.old_logprobs == "rollout"
        self.engine = RolloutEngine(self.actor.model, self.tokenizer, generation_weights=config.generation_weights,
                                    generation_batch_size=config.generation_batch_size, max_length=config.max_length,
                                    fp32_head=from_rollout, return_hidden=from_rollout and self._values_on_trunk)
        self.records = records
        self.prompts = self._encode_prompts(records)
        self.ptx = self._ptx_examples()
        self.params = [p for p in self.actor.parameters() if p.requires_grad]
        optimizer, scheduler = build_optimizer(self.params, config, self._num_updates())
        self.stepper = OptimizerStep(self.params, optimizer, scheduler, max_grad_norm=config.max_grad_norm,
                                     max_skipped=config.max_skipped_steps)
        self.kl_ctl = AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
        self.score_moments = RunningMoments()
        self.generator = run_generator(config.seed)  # prompt picks, minibatch order, ptx batches

    def _encode_prompts(self, records) -> list[list[int]]:
        """Prompt ids; a prompt that leaves no room for max_new_tokens is an error naming its line."""
        budget = self.config.max_length - self.config.max_new_tokens
        encoded = []
        for record in records:
            ids = data.encode_prompt(self.tokenizer, record.prompt)
            if len(ids) > budget:
                raise data.DataError(f"{record.source}: prompt is {len(ids)} tokens; with max_new_tokens="
                                     f"{self.config.max_new_tokens} it exceeds max_length={self.config.max_length}")
            encoded.append(ids)
        return encoded

    def _add_value_adapter(self, model):
        """A trainable "value" adapter beside "policy": a copy of the reward adapter when asked
        (InstructGPT starts the value function from the reward model), else a fresh one."""
        c = self.config
        reward_adapter = self.reward_model.adapter_dir
        if c.value_init_from_reward and reward_adapter is not None:
            model = load_lora(model, reward_adapter, VALUE_ADAPTER, trainable=True)
        else:
            model = add_lora(model, VALUE_ADAPTER, r=c.lora_r, alpha=c.lora_alpha, dropout=c.lora_dropout,
                             target_modules=c.lora_target_modules)
            model.set_adapter("policy")
        set_trainable(model, {"policy", VALUE_ADAPTER})
        return model

    def _value_head(self, hidden_size: int) -> ScalarHead:
        if self.config.value_init_from_reward:
            reward_head = Path(next(iter(self.config.reward_directories().values()))) / HEAD_FILE
            return ScalarHead.load(reward_head, device=self.device)
        head = ScalarHead(hidden_size).to(self.device)
        torch.nn.init.zeros_(head.proj.weight)  # V = 0 until it has learnt: a baseline that misleads no one
        return head

    def _ptx_examples(self):
        if not self.config.ptx_data:
            return []
        examples = data.load_sft(data.source_of(self.config, "ptx_data"), self.tokenizer)
        return [data.encode_pair(self.tokenizer, e.prompt, e.response, self.config.max_length, source=e.source)
                for e in examples]

    def _num_updates(self) -> int:
        c = self.config
        return c.iterations * c.ppo_epochs * (c.batch_size // c.mini_batch_size)

    # 1. rollout
    def rollout(self) -> tuple[Rollout, list]:
        """Responses to a random batch of prompts, samples_per_prompt each (rows grouped by prompt),
        and each row's prompt record: under torchrun, this rank's share of the rows."""
        n = self.config.samples_per_prompt
        picks = self._draw(len(self.prompts), self.config.batch_size // n)
        mine = distributed.share(self.config.batch_size)
        rollout = self.engine.sample_with([self.prompts[i] for i in picks], self.config, num_samples=n,
                                          rows=mine if distributed.current().size > 1 else None)
        return rollout, [self.records[i] for i in picks for _ in range(n)][mine]

    # 2. score
    @torch.no_grad()
    def score(self, rollout: Rollout, rows: list) -> tuple[torch.Tensor, dict]:
        """(scores used for training [B], {reward model / function name: raw scores} plus "combined")."""
        completions = (self.tokenizer.batch_decode(rollout.responses(), skip_special_tokens=True)
                       if self.scorer.functions else [])  # only reward functions read the text
        safety_prompt = torch.tensor([self.config.safety_tag in r.tags for r in rows], device=self.device)
        combined, raw = self.scorer(rollout.input_ids, rollout.attention_mask, prompts=rows, completions=completions,
                                    safety_prompt=safety_prompt)
        raw["combined"] = combined
        scores = combined - self.config.missing_eos_penalty * (~rollout.ended_with_eos).float()
        if self.config.normalize_scores:
            self.score_moments.update(distributed.gather_rows(scores))  # the whole batch's moments
            scores = (scores - self.score_moments.mean) / (self.score_moments.var ** 0.5 + 1e-8)
        if self.config.score_clip > 0:
            scores = scores.clamp(-self.config.score_clip, self.config.score_clip)
        return scores, raw

    # 3. experience
    @torch.no_grad()
    def make_experience(self, rollout: Rollout, scores: torch.Tensor) -> Experience:
        """Old log-probs and values of the policy, and the reference's log-probs, experience_batch_size
        rows at a time (no gradient, so the batch is bounded by activation memory alone: in bench.ppo_step's
        tiny shape on the 2-core CPU, 16 rows at once took 230 ms against 330 ms in 4-row batches, and
        gave the same bits). With old_logprobs "rollout" (resolved), the policy's are the engine's, and a
        value head on the policy trunk reads the hidden states the engine drew each token from: no policy
        forward. In eval mode, as the rollout samples: LoRA dropout does not make the old log-probs noisy."""
        with evaluating(self.actor):
            return self._experience(rollout, scores, self.config.temperature)

    def _experience(self, rollout: Rollout, scores: torch.Tensor, temperature: float) -> Experience:
        old_logprobs, ref_logprobs, old_values = [], [], []
        for micro in self._row_slices(rollout.input_ids.shape[0],
                                      self.config.experience_batch_size or self.config.micro_batch_size):
            ids, mask, resp = rollout.input_ids[micro], rollout.attention_mask[micro], rollout.response_mask[micro]
            if self.old_logprobs == "rollout":
                logprobs, values = rollout.logprobs[micro], self._rollout_values(rollout, micro)
            else:
                head, values = self.actor(ids, mask, resp)
                logprobs = self.actor.logprobs(head, temperature=temperature)[0]
            ref_logprobs.append(self.actor.reference_logprobs(ids, mask, resp, temperature=temperature))
            old_logprobs.append(logprobs)
            if values is not None:
                old_values.append(values * resp)
        return Experience(rollout, scores, torch.cat(old_logprobs), torch.cat(ref_logprobs),
                          torch.cat(old_values) if old_values else None)

    @property
    def _values_on_trunk(self) -> bool:
        """Whether the value function reads the policy trunk's hidden states (not its own adapter's)."""
        return self.actor.value_head is not None and self.config.value_mode != "adapter"

    def _rollout_values(self, rollout: Rollout, rows: slice) -> torch.Tensor | None:
        """V(s_t) [b, L-1] of these rows from the states the engine drew each response token from
        (the policy trunk's final hidden states), placed on the target frame; None without a critic.
        The "adapter" value mode runs its own trunk (ActorCritic.values)."""
        ids, mask = rollout.input_ids[rows], rollout.attention_mask[rows]
        if not self._values_on_trunk:
            return self.actor.values(None, ids, mask)
        if rollout.response_hidden is None:
            raise ValueError("old_logprobs 'rollout': the rollout carries no hidden states for the value head "
                             "(sample it with RolloutEngine(..., return_hidden=True))")
        response = rollout.response_hidden[rows]
        hidden = response.new_zeros((ids.shape[0], ids.shape[1], response.shape[-1]))
        hidden[:, rollout.prompt_length - 1:-1] = response
        return self.actor.values(hidden, ids, mask)

    def gather(self, exp: Experience, raw: dict) -> tuple[Experience, dict]:
        """The whole batch's experience and raw scores from every rank's share (identity in one process)."""
        if distributed.current().size == 1:
            return exp, raw
        r, rows = exp.rollout, distributed.gather_rows
        rollout = Rollout(rows(r.input_ids, self.tokenizer.pad_token_id), rows(r.attention_mask),
                          rows(r.response_mask), r.prompt_length, rows(r.ended_with_eos), rows(r.logprobs))
        values = None if exp.old_values is None else rows(exp.old_values)
        return (Experience(rollout, rows(exp.scores), rows(exp.old_logprobs), rows(exp.ref_logprobs), values),
                {name: rows(value) for name, value in raw.items()})

    # 4. advantages
    def compute_advantages(self, exp: Experience) -> None:
        c = self.config
        exp.advantages, exp.returns = estimators.estimate(
            c.advantage_estimator, exp.scores, exp.old_logprobs, exp.ref_logprobs, exp.rollout.response_mask,
            values=exp.old_values, group_size=c.samples_per_prompt,
            kl_coef=0.0 if c.kl_in_loss else self.kl_ctl.beta, kl_estimator=c.kl_estimator,
            gamma=c.gamma, lam=c.lam, whiten=c.whiten_advantages, backend=c.advantage_backend)

    # 5. PPO epochs
    def train_minibatches(self, exp: Experience) -> dict:
        c = self.config
        totals: dict[str, float] = {}
        updates = 0
        for _ in range(c.ppo_epochs):
            order = torch.randperm(c.batch_size, generator=self.generator).tolist()
            for first in range(0, c.batch_size, c.mini_batch_size):
                minibatch = order[first:first + c.mini_batch_size]
                stats = self._update(exp, minibatch)
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value
                updates += 1
        return {key: value / updates for key, value in totals.items()}

    def _update(self, exp: Experience, minibatch: list[int]) -> dict:
        c = self.config
        r = exp.rollout
        minibatch_mask = r.response_mask[minibatch]
        tokens = minibatch_mask.sum().clamp_min(1)
        sequences = (minibatch_mask.sum(-1) > 0).sum().clamp_min(1)
        # each micro-batch's [loss, *terms x share] summed on the device in float64 (the sums Python's
        # floats made), read once per mini-batch: a read per value would wait for the GPU every time
        names, sums = [], None
        for micro in distributed.micro_batches(minibatch, c.micro_batch_size):  # this rank's share
            rows = torch.tensor(micro, device=self.device)
            mask = r.response_mask[rows]
            # a micro-batch's loss aggregates its own tokens (or responses); weighted by its share of
            # the minibatch's, the micro-batches add up to the minibatch's loss
            share = (mask.sum() / tokens if c.loss_agg == "token-mean"
                     else (mask.sum(-1) > 0).sum() / sequences)
            head, values = self.actor(r.input_ids[rows], r.attention_mask[rows], mask)
            kl_term = ({"ref_logprobs": exp.ref_logprobs[rows], "kl_coef": self.kl_ctl.beta,
                        "kl_estimator": c.kl_estimator} if c.kl_in_loss else {})
            policy_loss, policy_stats = kernels.linear_ppo_loss(
                head.hidden, head.weight, head.targets, exp.old_logprobs[rows], exp.advantages[rows], mask,
                bias=head.bias, clip_low=c.clip_low, clip_high=c.clip_high, entropy_coef=c.entropy_coef,
                temperature=c.temperature, loss_agg=c.loss_agg, loss_norm=c.max_new_tokens, **kl_term)
            terms = {"ppo/policy_loss": policy_loss, **{f"ppo/{k}": v for k, v in policy_stats.items()}}
            loss = policy_loss
            if values is not None:
                v_loss, value_stats = kernels.value_loss(values, exp.old_values[rows], exp.returns[rows], mask,
                                                         clip=c.value_clip)
                loss = loss + c.vf_coef * v_loss
                terms.update({"value/loss": v_loss, **{f"value/{k}": v for k, v in value_stats.items()}})
            loss = loss * share
            loss.backward()
            names = list(terms)
            row = torch.stack([loss, *terms.values()]).detach().double()
            row[1:] *= share.double()
            sums = row if sums is None else sums + row
        totals = [0.0] if sums is None else sums.tolist()
        minibatch_loss, stats = totals[0], dict(zip(names, totals[1:]))
        if c.ptx_coef > 0:
            stats["ppo/ptx_loss"] = self._ptx_backward()
            minibatch_loss += c.ptx_coef * stats["ppo/ptx_loss"]
        minibatch_loss, = distributed.sum_across(minibatch_loss)
        stats = distributed.sum_dict_across(stats)
        stats["ppo/grad_norm"] = self.stepper(minibatch_loss)
        return stats

    def _ptx_backward(self) -> float:
        """InstructGPT's PPO-ptx: gamma x NLL of a pretraining/SFT batch, mixed into the update
        (each rank takes its share of the batch; the returned NLL is this rank's part of the mean)."""
        batch = [self.ptx[i] for i in self._draw(len(self.ptx), self.config.micro_batch_size)]
        count = sum(len(e.input_ids) - e.response_start for e in batch)
        batch = batch[distributed.share(len(batch))]
        if not batch:
            return 0.0
        input_ids, attention_mask, starts = collate(batch, self.tokenizer.pad_token_id, self.device)
        with autocast(self.device, next(self.actor.model.parameters()).dtype):
            nll = response_nll(self.actor.model, input_ids, attention_mask, starts)
        (self.config.ptx_coef * nll / count).backward()
        return nll.item() / count

    def _draw(self, population: int, count: int) -> list[int]:
        """`count` indices drawn with replacement from range(population) by the run's generator."""
        return torch.randint(population, (count,), generator=self.generator).tolist()

    @staticmethod
    def _row_slices(rows: int, size: int):
        for first in range(0, rows, size):
            yield slice(first, first + size)

    def step(self) -> dict:
        rollout, rows = self.rollout()
        scores, raw = self.score(rollout, rows)
        exp, raw = self.gather(self.make_experience(rollout, scores), raw)
        rollout = exp.rollout
        self.compute_advantages(exp)
        self.actor.train()
        stats = self.train_minibatches(exp)
        mask = rollout.response_mask.float()
        kl_per_seq = ((exp.old_logprobs - exp.ref_logprobs) * mask).sum(-1)
        beta = self.kl_ctl.beta
        self.kl_ctl.update(kl_per_seq.mean().item(), self.config.batch_size)
        per_model = {f"reward/{name}_mean": value.mean().item() for name, value in raw.items()
                     if len(raw) > 2 and name != "combined"}
        return {"reward/score_mean": raw["combined"].mean().item(), "reward/score_std": raw["combined"].std().item(),
                **per_model,
                "ppo/kl": kl_per_seq.mean().item(), "ppo/kl_coef": beta,
                "ppo/response_length": rollout.response_lengths.float().mean().item(),
                **({} if self.old_logprobs == "rollout" else  # the same tensor there
                   {"rollout/logprob_diff": logprob_diff(rollout.logprobs, exp.old_logprobs, rollout.response_mask)}),
                "perf/tokens": rollout.response_lengths.sum().item(), **stats}

    def modules(self) -> dict:
        return {"policy": self.actor}

    def stage_state(self) -> dict:
        """What a checkpoint keeps beside the weights and optimiser: the KL coefficient and the run's draws."""
        return {"kl_coef": self.kl_ctl.beta, "generator": self.generator.get_state()}

    def load_stage_state(self, state: dict) -> None:
        self.kl_ctl.beta = state["kl_coef"]
        self.generator.set_state(state["generator"])

    def train(self) -> Path:
        c = self.config
        heads = [] if self.actor.value_head is None else [self.actor.value_head]
        self.ledger = memory_ledger(self.actor.model, heads, generation_batch=self.engine.kv_cache_rows(c.batch_size),
                                    micro_batch=c.micro_batch_size, seq_len=c.max_length,
                                    generation_weights_bytes=self.engine.copy_bytes)
        print(format_ledger(self.ledger))
        logger = run_steps(c, "ppo", lambda iteration: self.step(), num_steps=c.iterations,
                           modules=self.modules(), stepper=self.stepper, device=self.device,
                           stage_state=self.stage_state, load_stage_state=self.load_stage_state,
                           vocab_size=self.actor.head_vocab_size())
        logger.close()
        return save_final(c, "ppo", lambda state=None: self.save(Path(c.output_dir), state), num_steps=c.iterations,
                          modules=self.modules(), stepper=self.stepper, stage_state=self.stage_state,
                          sharded=self.actor.model)

    def save(self, output: Path, state=None) -> Path:
        """<output>/policy: the policy adapter (or model), the value head (and adapter) if there is a
        critic, the tokenizer; written whole or not at all, never with non-finite weights. `state`:
        the policy's whole state dict when it is sharded (FSDP2), gathered to this rank."""
        policy_dir = output / "policy"
        model = self.actor.model if state is None else sharding.plain_copy(self.actor.model, state)
        heads = [] if self.actor.value_head is None else list(self.actor.value_head.named_parameters())
        check_finite({n: p for n, p in [*model.named_parameters(), *heads] if p.requires_grad}, str(policy_dir))
        with atomic_directory(policy_dir) as tmp:
            if self.config.lora_r:
                model.save_pretrained(str(tmp / "adapter"), selected_adapters=["policy"])
                if self.config.value_mode == "adapter" and not self.config.critic_free:
                    model.save_pretrained(str(tmp / "value_adapter"), selected_adapters=[VALUE_ADAPTER])
            else:
                model.save_pretrained(tmp / "model")
            self.tokenizer.save_pretrained(tmp)
            if self.actor.value_head is not None:
                self.actor.value_head.save(tmp / "value_head.safetensors")
        print(f"ppo: policy written to {policy_dir}; peak memory {peak_memory_gb(self.device):.2f} GB")
        return policy_dir


def run(config: PPOConfig) -> Path:
    return PPOTrainer(config).train()
