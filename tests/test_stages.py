"""The trainer's stages on the tiny saved model: each checked against what the algorithm promises."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rlhf_fast import batching, kernels
from rlhf_fast.data import DataError
from rlhf_fast.models.adapters import add_lora
from rlhf_fast.models.heads import ScalarHead
from rlhf_fast.models.loading import load_causal_lm, load_tokenizer
from rlhf_fast.models.logprobs import packed_response_nll, response_nll
from rlhf_fast.models.roles import ActorCritic
from rlhf_fast.stages import ppo, rm, sft

# models in fp32 on the machine's device (CUDA when present), their inputs beside them
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fp32_model(model_dir, **kwargs):
    return load_causal_lm(model_dir, device=DEVICE, dtype="fp32", **kwargs)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sft_records(n=8):
    words = ["apple", "banana", "cherry", "grape"]
    return [{"prompt": f"fruit {i}:", "response": f" {words[i % 4]} {words[(i + 1) % 4]}"} for i in range(n)]


def final_loss(output_dir, key):
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def tiny_reward_model(model_dir, tmp_path, *, lora_r, chosen=" apple", rejected=" dog", name="reward",
                      max_steps=1, learning_rate=1e-4):
    """A reward model trained for a few steps on 8 prompts that prefer `chosen` to `rejected`."""
    prefs = write_jsonl(tmp_path / f"{name}-prefs.jsonl",
                        [{"prompt": f"q{i}:", "chosen": chosen, "rejected": rejected} for i in range(8)])
    return rm.run(rm.RMConfig(model=str(model_dir), data=str(prefs), output_dir=str(tmp_path / f"rm-{name}"),
                              adapter_name=name, lora_r=lora_r, max_steps=max_steps, batch_size=4,
                              micro_batch_size=4, max_length=16, learning_rate=learning_rate)), prefs


def test_sft_loss_falls_on_a_memorisable_set(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records())
    out = tmp_path / "sft"
    model_dir = sft.run(sft.SFTConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(out),
                                      lora_r=0, learning_rate=3e-3, batch_size=8, micro_batch_size=4,
                                      max_steps=40, max_length=32))
    losses = final_loss(out, "sft/loss")
    assert losses[-1] < 0.25 * losses[0], losses
    assert (model_dir / "config.json").exists()


def test_sft_loss_is_the_response_nll_of_the_hf_logits(tiny_model_dir):
    model = fp32_model(tiny_model_dir)
    tokenizer = load_tokenizer(tiny_model_dir)
    encoded = batching.encode_examples([type("E", (), {"prompt": r["prompt"], "response": r["response"],
                                                       "source": "t:1"})() for r in sft_records(3)],
                                       tokenizer, 32)
    input_ids, attention_mask, starts = batching.collate(encoded, tokenizer.pad_token_id, DEVICE)
    nll = response_nll(model, input_ids, attention_mask, starts)
    logp = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention_mask).logits.double(), -1)
    expected = 0.0
    for row, e in enumerate(encoded):
        for t in range(e.response_start, len(e.input_ids)):
            expected -= logp[row, t - 1, e.input_ids[t]].item()
    assert abs(nll.item() - expected) < 1e-4 * abs(expected)


def test_resume_continues_exactly(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records())
    common = dict(model=str(tiny_model_dir), data=str(data), lora_r=4, lora_dropout=0.1, learning_rate=1e-2,
                  batch_size=4, micro_batch_size=2, max_steps=4, max_length=32, save_every=2)
    straight = tmp_path / "straight"
    sft.run(sft.SFTConfig(output_dir=str(straight), **common))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    sft.run(sft.SFTConfig(output_dir=str(resumed), resume=True, **common))
    a = load_file(straight / "model" / "model.safetensors")
    b = load_file(resumed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert final_loss(straight, "sft/loss")[2:] == final_loss(resumed, "sft/loss")


def test_reward_model_learns_separable_pairs(tiny_model_dir, tmp_path):
    records = [{"prompt": f"q{i}:", "chosen": f" good answer {i % 5}", "rejected": f" bad answer {i % 5}"}
               for i in range(60)]
    data = write_jsonl(tmp_path / "prefs.jsonl", records)
    out = tmp_path / "rm"
    rm.run(rm.RMConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(out), lora_r=8,
                       learning_rate=3e-3, batch_size=8, micro_batch_size=8, epochs=3, max_length=32,
                       eval_fraction=0.25))
    accuracy = final_loss(out, "rm/eval_accuracy")[-1]
    assert accuracy > 0.9
    assert (out / "reward" / "head.safetensors").exists()


def test_ranking_loss_matches_the_formula():
    chosen, rejected = torch.tensor([1.0, 0.2]), torch.tensor([0.5, 0.4])
    margin, weight = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1 / 6])
    expected = -(1.0 * torch.log(torch.sigmoid(torch.tensor(0.5)))
                 + 1 / 6 * torch.log(torch.sigmoid(torch.tensor(0.2 - 0.4 - 1.0))))
    assert torch.allclose(rm.ranking_loss(chosen, rejected, margin, weight), expected)


def perturbed_policy(tiny_model_dir):
    model = add_lora(fp32_model(tiny_model_dir), "policy", r=4, alpha=8)
    return ActorCritic(model, ScalarHead(model.config.hidden_size).to(DEVICE))


def sequences(tokenizer):
    batch = tokenizer(["the quick brown fox jumps", "a reward model learns which"], return_tensors="pt")
    ids, attention = batch["input_ids"].to(DEVICE), batch["attention_mask"].to(DEVICE)
    response = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.long, device=DEVICE)
    response[:, 1:] = 1
    return ids, attention, response


def policy_logprobs(actor, ids, attention, response):
    head, _ = actor(ids, attention, response)
    return actor.logprobs(head, temperature=1.0)[0]


def test_new_adapter_starts_at_kl_zero_and_reference_is_the_base(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    ids, attention, response = sequences(tokenizer)
    base = fp32_model(tiny_model_dir)
    base_actor = ActorCritic(base, ScalarHead(base.config.hidden_size).to(DEVICE), reference=base)
    base_lp = base_actor.reference_logprobs(ids, attention, response, temperature=1.0)

    actor = perturbed_policy(tiny_model_dir)
    with torch.no_grad():
        policy_lp = policy_logprobs(actor, ids, attention, response)
    assert torch.equal(policy_lp, base_lp), "a fresh LoRA adapter must leave the policy equal to the reference"
    for name, p in actor.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        moved = policy_logprobs(actor, ids, attention, response)
    assert not torch.allclose(moved, base_lp)
    assert torch.equal(actor.reference_logprobs(ids, attention, response, temperature=1.0), base_lp)


def test_ppo_update_follows_the_advantages(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    ids, attention, response = sequences(tokenizer)
    actor = perturbed_policy(tiny_model_dir)
    advantages = torch.where(torch.arange(ids.shape[1] - 1, device=DEVICE) % 2 == 0, 1.0, -1.0)
    advantages = advantages.expand_as(response) * response

    with torch.no_grad():
        before = policy_logprobs(actor, ids, attention, response)
    optimizer = torch.optim.SGD([p for p in actor.parameters() if p.requires_grad], lr=0.05)
    head, _ = actor(ids, attention, response)
    loss, _ = kernels.linear_ppo_loss(head.hidden, head.weight, head.targets, before, advantages, response)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        change = (policy_logprobs(actor, ids, attention, response) - before) * response
    assert (change[advantages > 0] > 0).float().mean() > 0.8
    assert (change[advantages < 0] < 0).float().mean() > 0.8


def test_bad_data_line_fails_before_training(tiny_model_dir, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "a", "response": " b"}\n{"prompt": "a" "response": 1}\n')
    with pytest.raises(DataError, match=r"sft\.jsonl:2"):
        sft.run(sft.SFTConfig(model=str(tiny_model_dir), data=str(path), output_dir=str(tmp_path / "o"),
                              batch_size=2, micro_batch_size=2, max_steps=1))


def test_pipeline_from_the_cli(tiny_model_dir, tmp_path):
    from rlhf_fast.cli import main

    sft_data = write_jsonl(tmp_path / "sft.jsonl", sft_records())
    prefs = write_jsonl(tmp_path / "rank.jsonl", [{"prompt": f"fruit {i}:", "responses": [" apple", " dog", " x"]}
                                                  for i in range(8)])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"fruit {i}:"} for i in range(4)])
    config = tmp_path / "pipeline.yaml"
    out = tmp_path / "run"
    config.write_text(f"""
model: {tiny_model_dir}
output_dir: {out}
sft: {{data: {sft_data}, max_steps: 2, batch_size: 4, micro_batch_size: 4, max_length: 32}}
rm: {{data: {prefs}, max_steps: 2, batch_size: 4, micro_batch_size: 4, max_length: 32, lora_r: 4}}
ppo: {{prompts: {prompts}, iterations: 2, batch_size: 4, mini_batch_size: 2, micro_batch_size: 2,
      max_new_tokens: 4, max_length: 32, lora_r: 4, save_every: 1, old_logprobs: recompute}}
""")
    assert main(["pipeline", "--config", str(config)]) == 0
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    # old log-probs recomputed through the policy's forward: exactly the reference's (TRL #1340's trap)
    assert rows[0]["ppo/kl"] == 0.0, "PPO's first rollout comes from the SFT policy itself"
    for key in ("reward/score_mean", "ppo/clipfrac", "ppo/approx_kl", "value/explained_variance",
                "ppo/entropy", "perf/tokens_per_s", "mem/peak_gb"):
        assert key in rows[-1]
    assert (out / "ppo" / "policy" / "value_head.safetensors").exists()
    assert (out / "ppo" / "checkpoints" / "step-000001").is_dir()


def test_ppo_with_a_reward_model_of_its_own(tiny_model_dir, tmp_path):
    """A fully fine-tuned reward model loads as its own directory; the policy keeps its trunk."""
    reward_dir, _ = tiny_reward_model(tiny_model_dir, tmp_path, lora_r=0)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "q1:"}, {"prompt": "q2:"}])
    trainer = ppo.PPOTrainer(ppo.PPOConfig(
        model=str(tiny_model_dir), reward_model=str(reward_dir), prompts=str(prompts),
        output_dir=str(tmp_path / "ppo"), lora_r=4, iterations=1, batch_size=2, mini_batch_size=2,
        micro_batch_size=2, max_new_tokens=3, max_length=16))
    assert trainer.reward_model.adapter is None and trainer.reward_model.trunk is not trunk_of(trainer)
    stats = trainer.step()
    assert abs(stats["ppo/kl"]) < 1e-5 and torch.isfinite(torch.tensor(stats["ppo/policy_loss"]))


def test_full_fine_tuning_ppo_with_a_lora_reward_model_trains_its_own_weights(tiny_model_dir, tmp_path):
    """The reward adapter loads onto a trunk of its own; the fully trained policy is not that trunk
    (a bug once made the policy the reward model's frozen trunk: 'nothing to train')."""
    reward_dir, _ = tiny_reward_model(tiny_model_dir, tmp_path, lora_r=4)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "q1:"}, {"prompt": "q2:"}])
    trainer = ppo.PPOTrainer(ppo.PPOConfig(
        model=str(tiny_model_dir), reward_model=str(reward_dir), prompts=str(prompts),
        output_dir=str(tmp_path / "ppo"), lora_r=0, iterations=1, batch_size=2, mini_batch_size=2,
        micro_batch_size=2, max_new_tokens=3, max_length=16, learning_rate=1e-2))
    assert trainer.reward_model.adapter == "reward" and trainer.reward_model.trunk is not trunk_of(trainer)
    reward_before = {n: p.clone() for n, p in trainer.reward_model.named_parameters()}
    policy_before = {n: p.clone() for n, p in trunk_of(trainer).named_parameters()}
    trainer.step()
    assert all(torch.equal(p, reward_before[n]) for n, p in trainer.reward_model.named_parameters())
    assert any(not torch.equal(p, policy_before[n]) for n, p in trunk_of(trainer).named_parameters())


def trunk_of(trainer):
    return trainer.actor.model


def test_ppo_prompt_longer_than_the_budget_names_its_line(tiny_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "q1:"}, {"prompt": "the quick brown fox " * 8}])
    reward_dir = tmp_path / "rm" / "reward"
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q:", "chosen": " a", "rejected": " b"}])
    rm.run(rm.RMConfig(model=str(tiny_model_dir), data=str(prefs), output_dir=str(tmp_path / "rm"), lora_r=0,
                       max_steps=1, batch_size=1, micro_batch_size=1, max_length=16, eval_fraction=0.0))
    config = ppo.PPOConfig(model=str(tiny_model_dir), reward_model=str(reward_dir), prompts=str(prompts),
                           output_dir=str(tmp_path / "ppo"), lora_r=4, batch_size=2, mini_batch_size=2,
                           micro_batch_size=2, max_new_tokens=8, max_length=24)
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: prompt is \d+ tokens; with max_new_tokens=8"):
        ppo.PPOTrainer(config)


def adapter_weights(model, adapter):
    return {n.replace(f".{adapter}.", "."): p.detach().clone() for n, p in model.named_parameters()
            if f".lora_A.{adapter}." in n or f".lora_B.{adapter}." in n}


def test_value_adapter_starts_as_the_reward_adapter_and_trains_beside_the_policy(tiny_model_dir, tmp_path):
    reward_dir, _ = tiny_reward_model(tiny_model_dir, tmp_path, lora_r=4, max_steps=2, learning_rate=1e-2)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "q1:"}, {"prompt": "q2:"}])
    trainer = ppo.PPOTrainer(ppo.PPOConfig(
        model=str(tiny_model_dir), reward_model=str(reward_dir), prompts=str(prompts),
        output_dir=str(tmp_path / "ppo"), lora_r=4, value_mode="adapter", value_init_from_reward=True,
        iterations=1, batch_size=2, mini_batch_size=2, micro_batch_size=2, max_new_tokens=3, max_length=16,
        learning_rate=1e-2))
    model = trainer.actor.model
    reward, value, policy = (adapter_weights(model, a) for a in ("reward", "value", "policy"))
    assert reward.keys() == value.keys() and all(torch.equal(reward[k], value[k]) for k in reward)
    assert model.active_adapter == "policy"
    trainer.step()
    assert all(torch.equal(reward[k], w) for k, w in adapter_weights(model, "reward").items())
    assert any(not torch.equal(value[k], w) for k, w in adapter_weights(model, "value").items())
    assert any(not torch.equal(policy[k], w) for k, w in adapter_weights(model, "policy").items())
    assert model.active_adapter == "policy"


def test_packed_rows_give_the_same_response_nll_as_padding(tiny_model_dir):
    model = fp32_model(tiny_model_dir, attn="sdpa")
    tokenizer = load_tokenizer(tiny_model_dir)
    examples = [type("E", (), {"prompt": r["prompt"], "response": r["response"], "source": "t:1"})()
                for r in sft_records(7)]
    encoded = batching.encode_examples(examples, tokenizer, 32)
    rows = batching.pack(encoded, 48)
    assert [e for row in rows for e in row] == encoded and len(rows) < len(encoded)
    assert all(sum(len(e.input_ids) for e in row) <= 48 for row in rows)
    with torch.no_grad():
        padded = response_nll(model, *batching.collate(encoded, tokenizer.pad_token_id, DEVICE))
        packed = packed_response_nll(model, *batching.collate_packed(rows, tokenizer.pad_token_id, DEVICE))
    assert abs(packed.item() - padded.item()) < 1e-4 * abs(padded.item())


def test_sft_with_packing_learns(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records())
    out = tmp_path / "sft"
    sft.run(sft.SFTConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(out), packing=True,
                          lora_r=0, learning_rate=3e-3, batch_size=2, micro_batch_size=2, max_steps=40,
                          max_length=48))
    losses = final_loss(out, "sft/loss")
    assert losses[-1] < 0.25 * losses[0], losses


def test_two_reward_models_on_one_trunk_score_as_each_does_alone(tiny_model_dir, tmp_path):
    from rlhf_fast.models.reward import load_reward_model
    from rlhf_fast.rewards import combine_llama2

    dirs = {name: str(tiny_reward_model(tiny_model_dir, tmp_path, lora_r=4, chosen=good, name=name, max_steps=2,
                                        learning_rate=1e-2)[0])
            for name, good in (("helpful", " apple"), ("safety", " cherry"))}
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "q1:", "tags": ["safety"]}, {"prompt": "q2:"}])
    trainer = ppo.PPOTrainer(ppo.PPOConfig(
        model=str(tiny_model_dir), reward_models=dirs, reward_combination="llama2", prompts=str(prompts),
        output_dir=str(tmp_path / "ppo"), lora_r=4, iterations=1, batch_size=4, mini_batch_size=2,
        micro_batch_size=2, max_new_tokens=3, max_length=16))
    rollout, rows = trainer.rollout()
    _, raw = trainer.score(rollout, rows)
    safety_prompt = torch.tensor(["safety" in r.tags for r in rows], device=trainer.device)
    for name, directory in dirs.items():
        alone = load_reward_model(directory, shared_trunk=load_causal_lm(tiny_model_dir), name=name,
                                  device=trainer.device)
        with torch.no_grad():
            assert torch.allclose(raw[name], alone(rollout.input_ids, rollout.attention_mask), atol=1e-5)
    assert torch.allclose(raw["combined"], combine_llama2(raw["helpful"], raw["safety"], safety_prompt))
    stats = trainer.step()
    assert {"reward/helpful_mean", "reward/safety_mean"} <= stats.keys()


def test_rejection_sampling_keeps_the_best_of_k_and_carries_earlier_rounds(tiny_model_dir, tmp_path):
    from rlhf_fast.stages import rs

    reward_dir, prefs = tiny_reward_model(tiny_model_dir, tmp_path, lora_r=4, max_steps=2)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}:"} for i in range(3)])
    earlier = write_jsonl(tmp_path / "earlier.jsonl", [{"prompt": "old:", "response": " kept from round 1"}])
    out = tmp_path / "rs"
    model_dir = rs.run(rs.RSConfig(model=str(tiny_model_dir), reward_model=str(reward_dir), prompts=str(prompts),
                                   output_dir=str(out), samples_per_prompt=4, max_new_tokens=4, max_length=24,
                                   previous_best=str(earlier), lora_r=0, max_steps=1, batch_size=2,
                                   micro_batch_size=2))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    best = [json.loads(line) for line in (out / "best.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(len(s["responses"]) == 4 for s in samples)
    best_by_prompt = {b["prompt"]: b for b in best}
    for s in samples:
        kept = [(r, t) for r, t in zip(s["rewards"], s["responses"]) if t.strip()]  # empty ones are never kept
        if kept:
            assert (best_by_prompt[s["prompt"]]["reward"], best_by_prompt[s["prompt"]]["response"]) == \
                max(kept, key=lambda pair: pair[0])
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert train[0] == {"prompt": "old:", "response": " kept from round 1"} and train[1:] == best
    round_stats = json.loads((out / "round" / "metrics.jsonl").read_text().splitlines()[0])
    assert round_stats["rs/best_of_k_reward"] >= round_stats["rs/mean_of_k_reward"]
    all_scores = [x for s in samples for x in s["scores"]["reward"]]
    assert round_stats["reward/reward_mean"] == pytest.approx(sum(all_scores) / len(all_scores))
    assert (model_dir / "config.json").exists()


def test_generate_best_of_n_from_the_cli(tiny_model_dir, tmp_path):
    from rlhf_fast.cli import main

    reward_dir, prefs = tiny_reward_model(tiny_model_dir, tmp_path, lora_r=0)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "q1:"}, {"prompt": "q2:"}])
    output = tmp_path / "gen" / "best.jsonl"
    assert main(["generate", "--model", str(tiny_model_dir), "--reward_model", str(reward_dir), "--prompts",
                 str(prompts), "--best-of", "3", "--max_new_tokens", "4", "--output", str(output)]) == 0
    candidates = [json.loads(line) for line in output.with_suffix(".all.jsonl").read_text().splitlines()]
    best = {b["prompt"]: b for b in map(json.loads, output.read_text().splitlines())}
    assert all(len(c["responses"]) == 3 for c in candidates)
    for c in candidates:
        kept = [(r, t) for r, t in zip(c["rewards"], c["responses"]) if t.strip()]
        if kept:
            assert (best[c["prompt"]]["reward"], best[c["prompt"]]["response"]) == max(kept, key=lambda p: p[0])


def test_two_rounds_from_the_cli(tiny_model_dir, tmp_path):
    """Round 1: rejection sampling; round 2: a reward-model refresh, rejection sampling carrying
    round 1's keepers, then PPO on top."""
    from rlhf_fast.cli import main

    reward_dir, prefs = tiny_reward_model(tiny_model_dir, tmp_path, lora_r=4)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}:"} for i in range(3)])
    out = tmp_path / "rounds"
    rs_keys = "{samples_per_prompt: 2, max_new_tokens: 3, max_length: 24, lora_r: 0, max_steps: 1, batch_size: 2, micro_batch_size: 2}"
    (tmp_path / "rounds.yaml").write_text(f"""
model: {tiny_model_dir}
prompts: {prompts}
output_dir: {out}
reward_models: {{helpful: {reward_dir}}}
rounds:
  - rs: {rs_keys}
  - rm: {{helpful: {{data: {prefs}, lora_r: 4, max_steps: 1, batch_size: 4, micro_batch_size: 4, max_length: 16}}}}
    rs: {rs_keys}
    ppo: {{iterations: 1, batch_size: 2, mini_batch_size: 2, micro_batch_size: 2, max_new_tokens: 3, max_length: 24,
          lora_r: 4}}
""")
    assert main(["rounds", "--config", str(tmp_path / "rounds.yaml")]) == 0
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert "rs/best_of_k_reward" in rows[0] and "reward/score_mean" in rows[1]
    first = (out / "round-1" / "rs" / "train.jsonl").read_text().splitlines()
    second = (out / "round-2" / "rs" / "train.jsonl").read_text().splitlines()
    assert second[:len(first)] == first and len(second) > len(first)
    assert (out / "round-2" / "rm-helpful" / "reward" / "head.safetensors").exists()
    assert rows[1]["policy"].endswith("round-2/ppo/policy/model")
    assert (out / "round-2" / "ppo" / "policy" / "model" / "config.json").exists()


def test_rounds_reject_an_unknown_key_before_training(tiny_model_dir, tmp_path):
    from rlhf_fast.config import ConfigError
    from rlhf_fast.stages import rounds

    config = rounds.RoundsConfig(model=str(tiny_model_dir), prompts="p.jsonl", reward_model="r",
                                 output_dir=str(tmp_path), rounds=[{"rs": {}}, {"rs": {"samples_per_promt": 3}}])
    with pytest.raises(ConfigError, match=r"rounds\[2\]\.rs: unknown key\(s\) \['samples_per_promt'\]"):
        rounds.run(config)
    assert not (tmp_path / "round-1").exists()


def test_a_reward_model_refresh_without_data_needs_a_labeller(tiny_model_dir, tmp_path):
    from rlhf_fast.config import ConfigError
    from rlhf_fast.stages import rounds

    config = rounds.RoundsConfig(model=str(tiny_model_dir), prompts="p.jsonl", reward_model="r",
                                 output_dir=str(tmp_path), rounds=[{"rm": {"helpful": {"lora_r": 4}}}])
    with pytest.raises(ConfigError, match=r"rounds\[1\]\.rm\.helpful: no data, and no labeller"):
        rounds.run(config)


def test_the_labeller_ranks_the_current_policys_samples_for_a_refresh(tiny_model_dir, tmp_path):
    from rlhf_fast.stages import rounds

    reward_dir, prefs = tiny_reward_model(tiny_model_dir, tmp_path, lora_r=4)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "q1:"}, {"prompt": "q2:"}])
    calls = []

    def labeller(policy_dir, round_dir):
        calls.append((policy_dir, round_dir))
        return {"helpful": prefs}

    rs_keys = {"samples_per_prompt": 2, "max_new_tokens": 3, "max_length": 24, "lora_r": 0, "max_steps": 1,
               "batch_size": 2, "micro_batch_size": 2}
    rm_keys = {"lora_r": 4, "max_steps": 1, "batch_size": 4, "micro_batch_size": 4, "max_length": 16}
    out = tmp_path / "rounds"
    rounds.run(rounds.RoundsConfig(model=str(tiny_model_dir), prompts=str(prompts), output_dir=str(out),
                                   reward_models={"helpful": str(reward_dir)},
                                   rounds=[{"rs": rs_keys}, {"rm": {"helpful": rm_keys}, "rs": rs_keys}]),
               labeller=labeller)
    assert calls == [(out / "round-1" / "rs" / "sft" / "model", out / "round-2")]
    config = json.loads((out / "round-2" / "rm-helpful" / "reward" / "reward_config.json").read_text())
    assert config["base"] == str(tiny_model_dir)


def test_ppo_resume_continues_exactly(tiny_model_dir, tmp_path):
    """The run's generator (prompt picks, minibatch order), the KL coefficient and the global RNGs
    (sampling) come back from a checkpoint: 2 iterations + resume + 2 equal 4 straight."""
    reward_dir, _ = tiny_reward_model(tiny_model_dir, tmp_path, lora_r=0)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}:"} for i in range(5)])
    common = dict(model=str(tiny_model_dir), reward_model=str(reward_dir), prompts=str(prompts), lora_r=4,
                  iterations=4, batch_size=4, mini_batch_size=2, micro_batch_size=2, max_new_tokens=3,
                  max_length=16, save_every=2, target_kl=0.01, learning_rate=1e-2)
    straight = tmp_path / "straight"
    ppo.run(ppo.PPOConfig(output_dir=str(straight), **common))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    torch.manual_seed(1234)  # a new process starts from other RNG states
    ppo.run(ppo.PPOConfig(output_dir=str(resumed), resume=True, **common))
    a = load_file(straight / "policy" / "adapter" / "policy" / "adapter_model.safetensors")
    b = load_file(resumed / "policy" / "adapter" / "policy" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("ppo/kl_coef", "reward/score_mean", "ppo/policy_loss"):
        assert final_loss(straight, key)[2:] == final_loss(resumed, key), key


def test_inputs_on_another_device_than_the_model_name_both(tiny_model_dir):
    """Not an index_select traceback from inside the embedding: a message with both devices."""
    from rlhf_fast.models import sequence_logprobs

    tokenizer = load_tokenizer(tiny_model_dir)
    ids, attention, response = (t.to("meta") for t in sequences(tokenizer))
    expected = rf"input_ids is on meta but the model is on {DEVICE.type}"
    with pytest.raises(ValueError, match=expected):
        sequence_logprobs(fp32_model(tiny_model_dir), ids, attention)
    with pytest.raises(ValueError, match=expected):
        perturbed_policy(tiny_model_dir)(ids, attention, response)


@pytest.mark.parametrize("setting", [{"value_mode": "head"}, {"value_mode": "adapter"},
                                     {"advantage_estimator": "grpo", "samples_per_prompt": 2}])
def test_old_logprobs_from_the_rollout_equal_the_recomputed_ones(tiny_model_dir, tmp_path, setting):
    """old_logprobs "rollout": the experience's old log-probs are the engine's and a value head reads
    the states the engine drew from, equal to a recomputing forward's within fp32 rounding on the
    same sampled tokens; the reference's are the same bits; the step runs no policy forward."""
    reward_dir, _ = tiny_reward_model(tiny_model_dir, tmp_path, lora_r=4)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}:"} for i in range(4)])
    trainers = {mode: ppo.PPOTrainer(ppo.PPOConfig(
        model=str(tiny_model_dir), reward_model=str(reward_dir), prompts=str(prompts),
        output_dir=str(tmp_path / mode), lora_r=4, iterations=2, batch_size=4, mini_batch_size=4,
        micro_batch_size=2, max_new_tokens=6, max_length=24, learning_rate=1e-2, old_logprobs=mode, **setting))
        for mode in ("recompute", "rollout")}
    for iteration in range(2):  # the second after an update: the value head and the adapters have moved
        experience = {}
        for mode, trainer in trainers.items():
            torch.manual_seed(iteration)
            rollout, rows = trainer.rollout()
            scores, _ = trainer.score(rollout, rows)
            experience[mode] = trainer.make_experience(rollout, scores)
        recomputed, taken = experience["recompute"], experience["rollout"]
        assert torch.equal(recomputed.rollout.input_ids, taken.rollout.input_ids)
        assert torch.equal(taken.old_logprobs, taken.rollout.logprobs)
        assert (taken.old_logprobs - recomputed.old_logprobs).abs().max().item() < 2e-5
        assert torch.equal(taken.ref_logprobs, recomputed.ref_logprobs)
        if recomputed.old_values is None:
            assert taken.old_values is None
        else:
            assert (taken.old_values - recomputed.old_values).abs().max().item() < 2e-5
            assert recomputed.old_values.abs().max().item() > 1e-3 or iteration == 0
        for mode, trainer in trainers.items():
            trainer.compute_advantages(experience[mode])
            trainer.actor.train()
            trainer.train_minibatches(experience[mode])
    trainer = trainers["rollout"]
    rollout, rows = trainer.rollout()
    scores, _ = trainer.score(rollout, rows)
    trainer.actor.forward = lambda *args, **kwargs: pytest.fail("the experience pass ran a policy forward")
    trainer.make_experience(rollout, scores)
    del trainer.actor.forward
    assert "rollout/logprob_diff" not in trainer.step()
    assert "rollout/logprob_diff" in trainers["recompute"].step()


def test_old_logprobs_auto_takes_the_rollouts_in_fp32_and_recomputes_in_half_precision():
    assert ppo.resolve_old_logprobs("auto", torch.float32) == "rollout"
    assert ppo.resolve_old_logprobs("auto", torch.bfloat16) == "recompute"
    assert ppo.resolve_old_logprobs("auto", torch.float16) == "recompute"
    assert ppo.resolve_old_logprobs("recompute", torch.float32) == "recompute"
    assert ppo.resolve_old_logprobs("rollout", torch.bfloat16) == "rollout"


def test_the_experience_pass_runs_without_dropout(tiny_model_dir, tmp_path):
    """With LoRA dropout the update trains in train mode, but the old log-probs and values are the
    policy's own (eval mode, as the rollout samples): the same on every call, and the rollout's."""
    reward_dir, _ = tiny_reward_model(tiny_model_dir, tmp_path, lora_r=4)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}:"} for i in range(4)])
    trainer = ppo.PPOTrainer(ppo.PPOConfig(
        model=str(tiny_model_dir), reward_model=str(reward_dir), prompts=str(prompts),
        output_dir=str(tmp_path / "ppo"), lora_r=4, lora_dropout=0.5, iterations=1, batch_size=4,
        mini_batch_size=4, micro_batch_size=2, max_new_tokens=6, max_length=24, old_logprobs="recompute"))
    for name, p in trainer.actor.model.named_parameters():  # a live adapter: dropout would show
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    rollout, rows = trainer.rollout()
    scores, _ = trainer.score(rollout, rows)
    trainer.actor.train()  # as after an update
    first, second = trainer.make_experience(rollout, scores), trainer.make_experience(rollout, scores)
    assert trainer.actor.training, "the mode is restored"
    assert torch.equal(first.old_logprobs, second.old_logprobs) and torch.equal(first.old_values, second.old_values)
    assert (first.old_logprobs - rollout.logprobs).abs().max().item() < 2e-5
