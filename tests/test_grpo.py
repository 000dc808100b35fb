"""GRPO and the other critic-free estimators on PPO's stage: groups, no critic, KL as a loss term,
reward functions, resume; and what PPO logs from the rollout engine."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rlhf_fast.config import ConfigError
from rlhf_fast.stages import ppo


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def length_reward(prompts, completions, target, **fields):
    """A verifiable reward: closeness of the completion's length in words to the prompt's target."""
    return [-abs(len(c.split()) - t) for c, t in zip(completions, target)]


def grpo_config(model_dir, tmp_path, **overrides):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}:", "target": 2} for i in range(5)])
    keys = dict(model=str(model_dir), prompts=str(prompts), output_dir=str(tmp_path / "grpo"),
                reward_functions=["test_grpo:length_reward"], lora_r=4, iterations=2, batch_size=8,
                samples_per_prompt=4, mini_batch_size=4, micro_batch_size=2, max_new_tokens=4, max_length=16,
                learning_rate=1e-2)
    return ppo.GRPOConfig(**{**keys, **overrides})


def test_grpo_samples_groups_trains_no_critic_and_keeps_the_kl_as_a_loss_term(tiny_model_dir, tmp_path):
    trainer = ppo.PPOTrainer(grpo_config(tiny_model_dir, tmp_path))
    assert trainer.actor.value_head is None and trainer.config.kl_in_loss
    trained = {id(p) for p in trainer.params}
    assert all("lora_" in n for n, p in trainer.actor.named_parameters() if id(p) in trained), "policy adapter only"
    rollout, rows = trainer.rollout()
    assert [r.prompt for r in rows[:4]] == [rows[0].prompt] * 4 and len(rows) == 8, "rows grouped by prompt"
    scores, raw = trainer.score(rollout, rows)
    words = [len(t.split()) for t in trainer.tokenizer.batch_decode(rollout.responses(), skip_special_tokens=True)]
    assert scores.tolist() == [-abs(w - 2) for w in words]
    stats = trainer.step()
    assert "value/loss" not in stats and "ppo/kl" in stats
    assert "rollout/logprob_diff" not in stats, "old_logprobs auto takes the rollout's in fp32"
    trainer.train()
    saved = tmp_path / "grpo" / "policy"
    assert (saved / "adapter").is_dir() and not (saved / "value_head.safetensors").exists()


@pytest.mark.parametrize("estimator", ["dr_grpo", "rloo", "reinforce_pp"])
def test_every_critic_free_estimator_runs_a_step(tiny_model_dir, tmp_path, estimator):
    trainer = ppo.PPOTrainer(grpo_config(tiny_model_dir, tmp_path, advantage_estimator=estimator, iterations=1))
    stats = trainer.step()
    assert torch.isfinite(torch.tensor(stats["ppo/policy_loss"])) and "value/loss" not in stats


def test_grpo_resume_continues_exactly(tiny_model_dir, tmp_path):
    straight = grpo_config(tiny_model_dir, tmp_path, iterations=4, save_every=2, output_dir=str(tmp_path / "a"))
    ppo.run(straight)
    resumed = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    torch.manual_seed(99)
    ppo.run(grpo_config(tiny_model_dir, tmp_path, iterations=4, save_every=2, output_dir=str(resumed), resume=True))
    a = load_file(tmp_path / "a" / "policy" / "adapter" / "policy" / "adapter_model.safetensors")
    b = load_file(resumed / "policy" / "adapter" / "policy" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_group_estimators_need_groups_and_critic_free_ones_no_value_init(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="set samples_per_prompt >= 2"):
        grpo_config(tiny_model_dir, tmp_path, samples_per_prompt=1)
    with pytest.raises(ConfigError, match="batch_size / samples_per_prompt: 8 is not a positive multiple of 3"):
        grpo_config(tiny_model_dir, tmp_path, samples_per_prompt=3)
    with pytest.raises(ConfigError, match="value_init_from_reward: grpo trains no value function"):
        grpo_config(tiny_model_dir, tmp_path, value_init_from_reward=True)


class GradientCapture:
    """Stands in for the optimiser step: keeps each step's gradients and clears them."""

    def __init__(self, trainer):
        self.params, self.grads = trainer.params, []

    def __call__(self, loss):
        self.grads.append([p.grad.clone() for p in self.params])
        for p in self.params:
            p.grad = None
        return 0.0


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_add_up_to_the_minibatch_under_every_aggregate(tiny_model_dir, tmp_path, loss_agg):
    """The same minibatch in micro-batches of 1 or of 4 gives the same gradient: each micro-batch's
    loss is weighted by its share of the minibatch's tokens (or responses)."""
    trainer = ppo.PPOTrainer(grpo_config(tiny_model_dir, tmp_path, loss_agg=loss_agg, micro_batch_size=1,
                                         max_new_tokens=6))
    rollout, rows = trainer.rollout()
    exp = trainer.make_experience(rollout, trainer.score(rollout, rows)[0])
    trainer.compute_advantages(exp)
    response = exp.rollout.response_mask
    for row, cut in ((5, 3), (2, 1)):  # ragged responses, so token shares and response shares differ
        last = int(response[row].nonzero().max())
        response[row, last - cut + 1:last + 1] = 0
    capture = GradientCapture(trainer)
    trainer.stepper = capture
    trainer._update(exp, [0, 5, 2, 7])
    trainer.config.micro_batch_size = 4
    trainer._update(exp, [0, 5, 2, 7])
    for one, four in zip(*capture.grads):
        assert torch.allclose(one, four, rtol=1e-4, atol=1e-7)
