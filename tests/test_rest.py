"""ReST (stages/rest.py): thresholds and kept sets against hand-computed percentiles, the Grow and
Improve datasets on disk, the policy carried between steps, the reward-weighted NLL, errors, resume."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rlhf_fast import data
from rlhf_fast.errors import CheckpointError, ConfigError, DataError
from rlhf_fast.models.loading import load_causal_lm, load_tokenizer
from rlhf_fast.stages import rest
from rlhf_fast.training import objective, supervised


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def char_reward(prompts, completions, **fields):
    """A scripted reward: the response's length in characters."""
    return [float(len(c)) for c in completions]


def read(path):
    return [record for _, record in data.read_jsonl(path)]


def write_prompts(tmp_path, n=3):
    return data.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}:"} for i in range(n)])


def rest_config(tiny_model_dir, tmp_path, **overrides):
    keys = dict(model=str(tiny_model_dir), prompts=str(write_prompts(tmp_path)), output_dir=str(tmp_path / "rest"),
                reward_functions=["test_rest:char_reward"], samples_per_prompt=4, max_new_tokens=6, max_length=32,
                thresholds=[25.0, 75.0], lora_r=0, max_steps=1, batch_size=2, micro_batch_size=2,
                learning_rate=1e-3, log_every=1)
    return rest.ReSTConfig(**{**keys, **overrides})


def test_percentiles_and_kept_sets_match_hand_computed_values():
    samples = [{"prompt": "a", "responses": [" x", " yy", "  "], "rewards": [1.0, 4.0, 9.0]},
               {"prompt": "b", "responses": [" z", " w"], "rewards": [2.0, 3.0]}]
    rows, empty = rest.flatten(samples)
    assert empty == 1  # the blank response: counted, never kept, not in the percentiles
    assert [r["reward"] for r in rows] == [1.0, 4.0, 2.0, 3.0]
    # sorted 1 2 3 4: percentile q sits at q/100 x 3 -> 25: 1.75, 50: 2.5, 90: 3.7, 100: 4
    assert rest.threshold_values([1.0, 4.0, 2.0, 3.0], [25, 50, 90, 100], "percentile") == \
        pytest.approx([1.75, 2.5, 3.7, 4.0])
    assert rest.threshold_values([1.0, 4.0], [2.5, 3.0], "value") == [2.5, 3.0]
    assert [r["response"] for r in rest.keep_above(rows, 2.5)] == [" yy", " w"]
    assert [r["response"] for r in rest.keep_above(rows, 4.0)] == [" yy"]  # at least tau: the top one stays
    weights = rest.reward_weights([1.0, 3.0], temperature=2.0)
    raw = [math.exp(-1.0), 1.0]
    assert weights == pytest.approx([2 * raw[0] / sum(raw), 2 * raw[1] / sum(raw)])


def test_grow_and_improve_datasets_are_written_and_the_policy_is_carried(tiny_model_dir, tmp_path, monkeypatch):
    started_from, sampled_from = [], []
    real_train, real_sample = objective.train_supervised, rest.sample_and_score

    def spy_train(config):
        started_from.append(config.model)
        return real_train(config)

    def spy_sample(config, *args, **kwargs):
        sampled_from.append(config.model)
        return real_sample(config, *args, **kwargs)

    monkeypatch.setattr(objective, "train_supervised", spy_train)
    monkeypatch.setattr(rest, "sample_and_score", spy_sample)
    config = rest_config(tiny_model_dir, tmp_path, grow_steps=2)
    final = rest.run(config)
    out = tmp_path / "rest"
    steps = [out / f"grow-{g}" / f"improve-{i}" / "sft" / "model" for g in (1, 2) for i in (1, 2)]
    # each Improve step starts from the model the previous one wrote; grow 2 samples from the last one
    assert started_from == [str(tiny_model_dir)] + [str(p) for p in steps[:-1]]
    assert sampled_from == [str(tiny_model_dir), str(steps[1])]
    assert final == steps[-1]
    for g in (1, 2):
        samples = read(out / f"grow-{g}" / "samples.jsonl")
        assert len(samples) == 3 and all(len(s["responses"]) == 4 for s in samples)
        for s in samples:  # the scripted reward of every response, as written
            assert s["rewards"] == [float(len(t)) for t in s["responses"]]
        rewards = sorted(float(len(t)) for s in samples for t in s["responses"] if t.strip())
        for i, q in enumerate((25.0, 75.0), start=1):
            position = q / 100 * (len(rewards) - 1)
            low = int(position)
            tau = rewards[low] + (position - low) * (rewards[min(low + 1, len(rewards) - 1)] - rewards[low])
            expected = [{"prompt": s["prompt"], "response": t, "reward": float(len(t))}
                        for s in samples for t in s["responses"] if t.strip() and len(t) >= tau]
            step = out / f"grow-{g}" / f"improve-{i}"
            assert read(step / "train.jsonl") == expected
            stats = json.loads((step / "stats.json").read_text())
            assert stats["rest/threshold"] == pytest.approx(tau) and stats["rest/kept"] == len(expected)
    assert [r["rest/improve_step"] for r in read(out / "steps.jsonl")] == [1, 2, 1, 2]
    # the written data trains like any SFT file
    assert data.load_sft(out / "grow-2" / "improve-2" / "train.jsonl")


def test_resume_skips_finished_steps_and_reuses_the_grow_dataset(tiny_model_dir, tmp_path, monkeypatch):
    config = rest_config(tiny_model_dir, tmp_path)
    rest.run(config)
    out = tmp_path / "rest"
    with pytest.raises(CheckpointError, match="already holds a ReST run"):
        rest.run(config)
    samples = (out / "grow-1" / "samples.jsonl").read_text()
    first = load_file(out / "grow-1" / "improve-1" / "sft" / "model" / "model.safetensors")
    # a run killed during Improve step 2: its model never written, its run unfinished
    second = out / "grow-1" / "improve-2" / "sft"
    shutil.rmtree(second)
    monkeypatch.setattr(rest, "sample_and_score", lambda *a, **k: pytest.fail("a resumed run must not resample"))
    calls = []
    real_train = objective.train_supervised
    monkeypatch.setattr(objective, "train_supervised", lambda c: calls.append(c.model) or real_train(c))
    rest.run(rest_config(tiny_model_dir, tmp_path, resume=True))
    assert calls == [str(out / "grow-1" / "improve-1" / "sft" / "model")]
    assert (out / "grow-1" / "samples.jsonl").read_text() == samples
    again = load_file(out / "grow-1" / "improve-1" / "sft" / "model" / "model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert (second / "model" / "config.json").exists()


def test_reward_weighted_nll_matches_the_formula(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, dtype="fp32")
    pairs = [("q1:", " the quick fox"), ("a longer prompt:", " dog"), ("q3:", " numbers 1 2 3")]
    encoded = [data.encode_pair(tokenizer, p, r, 32) for p, r in pairs]
    weights = [0.5, 2.0, 0.25]
    items = list(zip(encoded, weights))
    loss, _ = rest.weighted_nll(model, items[:2], items, pad_id=tokenizer.pad_token_id, device=torch.device("cpu"))
    # reference: HF logits, log_softmax, per-row NLL of the response tokens (EOS included)
    def nll(e):
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            logprobs = model(ids).logits[0, :-1].double().log_softmax(-1)
        targets = ids[0, 1:]
        return -logprobs[torch.arange(len(targets)), targets][e.response_start - 1:].sum().item()

    batch_tokens = sum(len(e.input_ids) - e.response_start for e in encoded)  # the optimiser batch's
    expected = sum(w * nll(e) for e, w in items[:2]) / batch_tokens
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    # its gradient (three LM-head GEMMs, made in the forward) against autograd through HF's logits
    head, layer = model.get_output_embeddings().weight, model.model.layers[0].mlp.up_proj.weight
    loss.backward()
    fused = [head.grad.clone(), layer.grad.clone()]
    model.zero_grad()
    formula = 0.0
    for e, w in items[:2]:
        ids = torch.tensor([e.input_ids])
        logprobs = model(ids).logits[0, :-1].log_softmax(-1)
        targets = ids[0, 1:]
        formula = formula - w * logprobs[torch.arange(len(targets)), targets][e.response_start - 1:].sum()
    (formula / batch_tokens).backward()
    for got, want in zip(fused, [head.grad, layer.grad]):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_unit_weights_train_the_same_weights_as_train_supervised(tiny_model_dir, tmp_path):
    train = data.write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"q{i}:", "response": f" fox {i} dog", "weight": 1.0}
                                                         for i in range(4)])
    keys = dict(model=str(tiny_model_dir), data=str(train), lora_r=4, max_steps=3, batch_size=4,
                micro_batch_size=2, max_length=24, learning_rate=1e-2)
    plain = supervised.train_supervised(supervised.SupervisedConfig(output_dir=str(tmp_path / "a"), **keys))
    config = supervised.SupervisedConfig(output_dir=str(tmp_path / "b"), **keys)
    weighted = objective.train_objective(config, rest._encode_weighted(config, train), rest.weighted_nll, stage="sft")
    a, b = load_file(plain / "model.safetensors"), load_file(weighted / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_reward_weighted_run_writes_its_weights(tiny_model_dir, tmp_path):
    rest.run(rest_config(tiny_model_dir, tmp_path, thresholds=[50.0], improve_loss="reward_weighted",
                         weight_temperature=3.0))
    kept = read(tmp_path / "rest" / "grow-1" / "improve-1" / "train.jsonl")
    assert [r["weight"] for r in kept] == pytest.approx(rest.reward_weights([r["reward"] for r in kept], 3.0))


@pytest.mark.parametrize("overrides, error, message", [
    ({"thresholds": [50.0, 50.0]}, ConfigError, r"must rise strictly"),
    ({"thresholds": []}, ConfigError, r"at least one"),
    ({"thresholds": [50.0, 120.0]}, ConfigError, r"percentiles must lie in \[0, 100\]"),
    ({"improve_loss": "mse"}, ConfigError, r"improve_loss: must be one of"),
    ({"weight_temperature": 0.0}, ConfigError, r"weight_temperature: must be > 0"),
    ({"reward_functions": []}, ConfigError, r"reward_model"),
    ({"reward_functions": ["test_rest:no_such"]}, ConfigError, r"no callable 'no_such'"),
])
def test_bad_configs_are_one_line_errors(tiny_model_dir, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message) as caught:
        rest_config(tiny_model_dir, tmp_path, **overrides)
    assert "\n" not in str(caught.value)


def test_a_threshold_that_keeps_nothing_is_an_error(tiny_model_dir, tmp_path):
    config = rest_config(tiny_model_dir, tmp_path, thresholds=[1e6], threshold_kind="value")
    with pytest.raises(DataError, match=r"tau_1 = 1e\+06 \(value 1e\+06\) keeps none of the \d+ responses"):
        rest.run(config)


def test_the_stage_reads_its_keys_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    from rlhf_fast.cli import run_stage

    assert run_stage(rest, "ReSTConfig", ["--help"], "rlhf-fast rest") == 0
    assert "--thresholds" in capsys.readouterr().out
    argv = ["--model", str(tiny_model_dir), "--prompts", str(write_prompts(tmp_path)), "--reward_functions",
            "test_rest:char_reward", "--thresholds", "50,40"]
    with pytest.raises(ConfigError, match=r"thresholds: must rise strictly \(tau_1 < ... < tau_I\), got "
                                          r"\[50.0, 40.0\]"):
        run_stage(rest, "ReSTConfig", argv, "rlhf-fast rest")
