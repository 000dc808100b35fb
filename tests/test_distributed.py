"""torchrun with 2 gloo ranks on the CPU against one process with the same global batch and seed:
the same losses and updated weights for sft, rm and ppo; a 2-rank run killed and resumed ends
where the uninterrupted run does; resuming on another number of ranks is an error."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import KILL_AFTER_CHECKPOINT

from rlhf_fast import distributed
from rlhf_fast.errors import CheckpointError
from rlhf_fast.stages import dpo, label, ppo, rm, sft

ROOT = Path(__file__).resolve().parents[1]
RANKS = 2


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def metric(output_dir, key):
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def torchrun(argv: list[str], script: str | None = None, check: bool = True,
             python_path: Path | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m rlhf_fast.cli <argv>` (or a script), gloo on the CPU;
    python_path: a directory the ranks import reward / critic functions from."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}"]
    target = ["-m", "rlhf_fast.cli", *argv] if script is None else [script, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if python_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(python_path), env.get("PYTHONPATH")]))
    process = subprocess.run(launcher + target, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert process.returncode == 0, process.stderr[-3000:]
    return process


def flags(**settings) -> list[str]:
    return [part for key, value in settings.items() for part in (f"--{key}", str(value))]


def assert_same_tensors(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), rtol=1e-4, atol=atol), name


def assert_trained(before: dict, after: dict):
    assert any(not torch.equal(before[k], after[k]) for k in before), "nothing was trained"


# --- shares -----------------------------------------------------------------------------------

def test_shares_cover_the_batch_once_in_order():
    for count in range(0, 12):
        for size in (1, 2, 3, 5):
            slices = [distributed.share(count, distributed.World(rank, size)) for rank in range(size)]
            assert [i for s in slices for i in range(count)[s]] == list(range(count))
            assert max(len(range(count)[s]) for s in slices) - min(len(range(count)[s]) for s in slices) <= 1


def test_ranks_make_the_micro_batches_of_one_process():
    batch = list(range(16))
    one = list(distributed.micro_batches(batch, 4))
    spread = [m for rank in range(2) for m in distributed.micro_batches(batch, 4, distributed.World(rank, 2))]
    assert spread == one == [batch[i:i + 4] for i in range(0, 16, 4)]


def test_batch_must_split_into_whole_micro_batches_per_rank():
    config = sft.SFTConfig(model="m", data="d", batch_size=6, micro_batch_size=2)
    config.check_world(distributed.World(0, 1))
    with pytest.raises(Exception, match=r"batch_size / \(micro_batch_size x 2 ranks\): 6 is not a positive multiple of 4"):
        config.check_world(distributed.World(0, 2))


# --- two ranks against one process --------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    words = ["apple", "banana", "cherry", "grape"]
    return write_jsonl(tmp_path_factory.mktemp("sft") / "sft.jsonl",
                       [{"prompt": f"fruit {i}:", "response": f" {words[i % 4]} {words[(i + 1) % 4]}"}
                        for i in range(12)])


SFT = dict(lora_r=4, learning_rate=1e-2, batch_size=8, micro_batch_size=2, max_length=24, device="cpu")


def test_sft_on_two_ranks_equals_one_process(tiny_model_dir, sft_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    sft.run(sft.SFTConfig(model=str(tiny_model_dir), data=str(sft_data), output_dir=str(one), max_steps=3, **SFT))
    torchrun(["sft", *flags(model=tiny_model_dir, data=sft_data, output_dir=two, max_steps=3, **SFT)])
    assert metric(two, "sft/loss") == pytest.approx(metric(one, "sft/loss"), rel=1e-5)
    assert metric(two, "sft/grad_norm") == pytest.approx(metric(one, "sft/grad_norm"), rel=1e-4)
    base = load_file(tiny_model_dir / "model.safetensors")
    trained = load_file(one / "model" / "model.safetensors")
    assert_trained(base, trained)
    assert_same_tensors(trained, load_file(two / "model" / "model.safetensors"))
    assert not (two / "checkpoints").exists() or not any((two / "checkpoints").iterdir())


@pytest.mark.parametrize("lora_r", [4, 0])
def test_sft_sharded_with_fsdp_on_two_ranks_equals_one_process(tiny_model_dir, sft_data, tmp_path, lora_r):
    settings = {**SFT, "lora_r": lora_r, "learning_rate": 1e-2 if lora_r else 1e-3, "max_steps": 3}
    one, two = tmp_path / "one", tmp_path / "two"
    sft.run(sft.SFTConfig(model=str(tiny_model_dir), data=str(sft_data), output_dir=str(one), **settings))
    torchrun(["sft", *flags(model=tiny_model_dir, data=sft_data, output_dir=two, fsdp="true", **settings)])
    assert metric(two, "sft/loss") == pytest.approx(metric(one, "sft/loss"), rel=1e-5)
    assert metric(two, "sft/grad_norm") == pytest.approx(metric(one, "sft/grad_norm"), rel=1e-4)
    trained = load_file(one / "model" / "model.safetensors")
    assert_trained(load_file(tiny_model_dir / "model.safetensors"), trained)
    assert_same_tensors(trained, load_file(two / "model" / "model.safetensors"))


GATHERED_ROLLOUT = """
import contextlib, sys, torch
from rlhf_fast import distributed
from rlhf_fast.models import sharding
from rlhf_fast.models.adapters import add_lora, adapters_disabled
from rlhf_fast.models.loading import load_causal_lm, load_tokenizer
from rlhf_fast.rollout import RolloutEngine

model_dir, out, weights, lora = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "lora"
world = distributed.init("cpu")
tokenizer = load_tokenizer(model_dir, padding_side="left")
model = load_causal_lm(model_dir, device="cpu", dtype="fp32")
if lora:
    model = add_lora(model, "policy", r=4, alpha=8)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
sharding.shard(model)
engine = RolloutEngine(model, tokenizer, generation_weights=weights, return_hidden=True)
prompts = [[7, 8, 9], [10, 11, 12, 13, 14], [15, 16], [17, 18, 19, 20]]
rows = distributed.share(8, world) if world.size > 1 else None
results = {}
for call in range(3):
    if call == 1:  # the copy made in call 0 must be refreshed: every weight moves (shards in place)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.97)
    torch.manual_seed(call)
    with adapters_disabled(model) if call == 2 and lora else contextlib.nullcontext():
        rollout = engine.sample(prompts, max_new_tokens=6, temperature=0.9, num_samples=2, rows=rows)
    results[call] = {"tokens": distributed.gather_rows(rollout.input_ids, tokenizer.pad_token_id),
                     "logprobs": distributed.gather_rows(rollout.logprobs),
                     "hidden": distributed.gather_rows(rollout.response_hidden)}
results["weights"], results["copy_bytes"] = engine.weights, engine.copy_bytes
if world.main:
    torch.save(results, out)
distributed.close()
"""


@pytest.mark.parametrize("weights,adapter", [("merged_copy", "lora"), ("auto", "none"), ("lora", "lora")])
def test_a_sharded_policy_samples_as_one_process_from_a_gathered_copy_or_its_shards(tiny_model_dir, tmp_path,
                                                                                  weights, adapter):
    """FSDP2 ranks decode their shares from a gathered copy (the whole weights, the adapter merged as
    one process merges it; refreshed every call: after every weight moved, and with the adapters
    disabled) or through the sharded module ("lora"): the same tokens, log-probs and hidden states
    as one process sampling the whole batch."""
    script = tmp_path / "gathered_rollout.py"
    script.write_text(GATHERED_ROLLOUT)
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(one), weights, adapter], cwd=ROOT,
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    torchrun([str(tiny_model_dir), str(two), weights, adapter], script=str(script))
    single, sharded = torch.load(one), torch.load(two)
    assert sharded["weights"] == ("sharded" if weights == "lora" else "gathered")
    whole_model = sum(p.numel() * 4 for p in load_file(tiny_model_dir / "model.safetensors").values())
    assert sharded["copy_bytes"] == (0 if weights == "lora" else whole_model)
    for call in range(3):
        assert torch.equal(sharded[call]["tokens"], single[call]["tokens"])
        assert torch.allclose(sharded[call]["logprobs"], single[call]["logprobs"], atol=1e-5)
        assert torch.allclose(sharded[call]["hidden"], single[call]["hidden"], atol=1e-5)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_with_a_rendezvous_equal_one_process(tiny_model_dir, sft_data, tmp_path):
    """`--nnodes 2` with a c10d rendezvous: two launchers, one rank each (two "nodes" on this machine,
    sharing the filesystem as nodes share output_dir), train what one process trains."""
    one, two = tmp_path / "one", tmp_path / "two"
    sft.run(sft.SFTConfig(model=str(tiny_model_dir), data=str(sft_data), output_dir=str(one), max_steps=2, **SFT))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_id=two-nodes",
                "-m", "rlhf_fast.cli", "sft", *flags(model=tiny_model_dir, data=sft_data, output_dir=two,
                                                     max_steps=2, **SFT)]
    nodes = [subprocess.Popen(launcher, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-2000:] for _, err in outputs]
    assert metric(two, "sft/loss") == pytest.approx(metric(one, "sft/loss"), rel=1e-5)
    assert_same_tensors(load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors"))


def test_reward_model_on_two_ranks_equals_one_process(tiny_model_dir, tmp_path):
    prefs = write_jsonl(tmp_path / "prefs.jsonl",
                        [{"prompt": f"q{i}:", "chosen": " apple pie", "rejected": f" dog {i}", "rating": "better"}
                         for i in range(14)])
    settings = dict(lora_r=4, learning_rate=1e-2, batch_size=4, micro_batch_size=2, max_steps=3, max_length=16,
                    eval_fraction=0.25, device="cpu")
    one, two = tmp_path / "one", tmp_path / "two"
    rm.run(rm.RMConfig(model=str(tiny_model_dir), data=str(prefs), output_dir=str(one), **settings))
    torchrun(["rm", *flags(model=tiny_model_dir, data=prefs, output_dir=two, **settings)])
    for key in ("rm/loss", "rm/accuracy", "rm/eval_accuracy", "rm/eval_reward_gap"):
        assert metric(two, key) == pytest.approx(metric(one, key), rel=1e-5, abs=1e-6), key
    for name in ("head.safetensors", "adapter/reward/adapter_model.safetensors"):
        assert_same_tensors(load_file(one / "reward" / name), load_file(two / "reward" / name))


@pytest.mark.parametrize("lora_r,fsdp", [(4, False), (0, True)])
def test_dpo_on_two_ranks_equals_one_process(tiny_model_dir, tmp_path, lora_r, fsdp):
    """fsdp with full fine-tuning: the policy and its frozen reference copy both sharded."""
    prefs = write_jsonl(tmp_path / "prefs.jsonl",
                        [{"prompt": f"q{i}:", "chosen": " apple pie", "rejected": f" dog {i}", "margin": i % 3 / 2}
                         for i in range(14)])
    settings = dict(lora_r=lora_r, learning_rate=1e-2 if lora_r else 1e-3, batch_size=4, micro_batch_size=2,
                    max_steps=3, max_length=16, eval_fraction=0.25, device="cpu")
    one, two = tmp_path / "one", tmp_path / "two"
    dpo.run(dpo.DPOConfig(model=str(tiny_model_dir), data=str(prefs), output_dir=str(one), **settings))
    torchrun(["dpo", *flags(model=tiny_model_dir, data=prefs, output_dir=two, fsdp=str(fsdp).lower(), **settings)])
    for key in ("dpo/loss", "dpo/rewards/margins", "dpo/grad_norm", "dpo/eval_loss", "dpo/eval_rewards/accuracies"):
        assert metric(two, key) == pytest.approx(metric(one, key), rel=1e-5, abs=1e-6), key
    assert_same_tensors(load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors"))


def test_rejection_sampling_on_two_ranks_samples_every_prompt_once(tiny_model_dir, reward_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say {w}:"} for w in
                                                       ("apple", "pear", "plum", "fig", "kiwi")])
    out = tmp_path / "rs"
    torchrun(["rs", *flags(model=tiny_model_dir, reward_model=reward_dir, prompts=prompts, output_dir=out,
                           samples_per_prompt=3, max_new_tokens=4, lora_r=4, batch_size=2, micro_batch_size=1,
                           max_steps=1, max_length=24, device="cpu")])
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == [f"Say {w}:" for w in ("apple", "pear", "plum", "fig", "kiwi")]
    assert all(len(s["responses"]) == len(s["rewards"]) == 3 for s in samples)
    best = [json.loads(line) for line in (out / "best.jsonl").read_text().splitlines()]
    assert [b["reward"] for b in best] == [max(s["rewards"][i] for i, t in enumerate(s["responses"]) if t.strip())
                                           for s in samples if any(t.strip() for t in s["responses"])]
    assert (out / "sft" / "model" / "model.safetensors").exists()


FUNCTIONS = """
def length_reward(prompts, completions, **fields):
    return [float(len(c)) for c in completions]

def tool_critic(prompts, responses, critique_requests, principles):
    return [f"critique of {r!r} by {p}" for r, p in zip(responses, principles)]

def tagging_reviser(prompts, responses, critiques, revision_requests, principles):
    return [f"{r} [{p}]" for r, p in zip(responses, principles)]
"""


def test_label_rest_and_cai_run_on_two_ranks(tiny_model_dir, tmp_path):
    """The labeller (deterministic: the same preferences as one process), ReST's grow and improve
    steps and CAI's critique-revise loop, each under torchrun: every prompt sampled once, in order,
    files written once by rank 0, the fine-tuned model saved."""
    (tmp_path / "rank_functions.py").write_text(FUNCTIONS)
    candidates = write_jsonl(tmp_path / "candidates.jsonl", [
        {"prompt": "fox 1:", "responses": [" the lazy dog", " a reward model", " numbers 3 4"]},
        {"prompt": "dog 2:", "responses": [" policy gradient", " write a reply"]},
        {"prompt": "cat 3:", "responses": [" the quick fox", " numbers"]}])
    judge = dict(candidates=candidates, judge=tiny_model_dir, verdict_a=" 1", verdict_b=" 2", device="cpu",
                 template="the quick {prompt} first: {response_a} second: {response_b} so the better is")
    label.run(label.LabelConfig(**{k: str(v) for k, v in judge.items()}, output=str(tmp_path / "one.jsonl")))
    torchrun(["label", *flags(**judge, output=tmp_path / "two.jsonl")])
    one, two = (read_jsonl(tmp_path / f"{n}.jsonl") for n in ("one", "two"))
    assert [(r["chosen"], r["rejected"]) for r in two] == [(r["chosen"], r["rejected"]) for r in one]
    assert [r["ai_preference"] for r in two] == pytest.approx([r["ai_preference"] for r in one], rel=1e-6)

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}:"} for i in range(5)])
    common = dict(model=tiny_model_dir, prompts=prompts, max_new_tokens=5, max_length=32, lora_r=4, max_steps=1,
                  batch_size=2, micro_batch_size=1, device="cpu")
    torchrun(["rest", *flags(**common, output_dir=tmp_path / "rest", reward_functions="rank_functions:length_reward",
                             samples_per_prompt=3, thresholds="[0.0]")], python_path=tmp_path)
    grown = read_jsonl(tmp_path / "rest" / "grow-1" / "samples.jsonl")
    assert [g["prompt"] for g in grown] == [f"q{i}:" for i in range(5)]
    assert all(g["rewards"] == [float(len(r)) for r in g["responses"]] for g in grown)
    assert len(read_jsonl(tmp_path / "rest" / "steps.jsonl")) == 1

    constitution = tmp_path / "constitution.yaml"
    constitution.write_text("principles:\n  - name: tools\n    critique_request: Name the tools.\n"
                            "    revision_request: Remove them.\n")
    torchrun(["cai", *flags(**common, output_dir=tmp_path / "cai", constitution=constitution, revision_rounds=1,
                            samples_per_prompt=1, critic_function="rank_functions:tool_critic",
                            reviser_function="rank_functions:tagging_reviser")], python_path=tmp_path)
    chains = read_jsonl(tmp_path / "cai" / "revisions.jsonl")
    assert [c["prompt"] for c in chains] == [f"q{i}:" for i in range(5)]
    assert all(c["response"] == f"{c['initial']} [tools]" for c in chains)
    assert (tmp_path / "cai" / "sft" / "model" / "model.safetensors").exists()


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reward")
    prefs = write_jsonl(tmp / "prefs.jsonl", [{"prompt": f"q{i}:", "chosen": " apple", "rejected": " dog"}
                                              for i in range(8)])
    return rm.run(rm.RMConfig(model=str(tiny_model_dir), data=str(prefs), output_dir=str(tmp / "rm"), lora_r=4,
                              max_steps=1, batch_size=4, micro_batch_size=4, max_length=16, device="cpu"))


@pytest.mark.parametrize("estimator,fsdp,lora_r", [("gae", False, 4), ("grpo", False, 4), ("gae", True, 4),
                                                   ("grpo", True, 0)])
def test_ppo_on_two_ranks_equals_one_process(tiny_model_dir, reward_dir, tmp_path, estimator, fsdp, lora_r):
    """fsdp with LoRA: the frozen base sharded and sampled from; with full fine-tuning (lora_r 0) the
    policy's weights, gradients and AdamW state and the frozen reference copy are sharded."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say {w}:"} for w in
                                                       ("apple", "pear", "plum", "fig", "kiwi", "lime")])
    settings = dict(lora_r=lora_r, learning_rate=1e-2 if lora_r else 1e-3, iterations=2, batch_size=8,
                    mini_batch_size=4, micro_batch_size=2, max_new_tokens=5, max_length=24, ppo_epochs=2, device="cpu",
                    advantage_estimator=estimator, samples_per_prompt=2, normalize_scores=True,
                    advantage_backend="torch")
    one, two = tmp_path / "one", tmp_path / "two"
    ppo.run(ppo.PPOConfig(model=str(tiny_model_dir), reward_model=str(reward_dir), prompts=str(prompts),
                          output_dir=str(one), **settings))
    torchrun(["ppo", *flags(model=tiny_model_dir, reward_model=reward_dir, prompts=prompts, output_dir=two,
                            fsdp=str(fsdp).lower(), **settings)])
    assert metric(two, "ppo/response_length") == metric(one, "ppo/response_length")  # the same samples
    for key in ("reward/score_mean", "ppo/kl", "ppo/policy_loss", "ppo/grad_norm"):
        assert metric(two, key) == pytest.approx(metric(one, key), rel=1e-4, abs=1e-6), key
    weights = "policy/adapter/policy/adapter_model.safetensors" if lora_r else "policy/model/model.safetensors"
    assert_same_tensors(load_file(one / weights), load_file(two / weights))
    if estimator == "gae":
        assert metric(two, "value/loss") == pytest.approx(metric(one, "value/loss"), rel=1e-4)
        assert_same_tensors(load_file(one / "policy" / "value_head.safetensors"),
                            load_file(two / "policy" / "value_head.safetensors"))


# --- kill and resume --------------------------------------------------------------------------

@pytest.mark.parametrize("sharded", [False, True], ids=["data-parallel", "fsdp"])
def test_two_ranks_killed_and_resumed_equal_the_uninterrupted_run(tiny_model_dir, sft_data, tmp_path, sharded):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # data parallel: LoRA with dropout (each rank's RNG state matters); fsdp: full fine-tuning, so the
    # trainable weights and optimiser state are sharded (torch.distributed.checkpoint)
    settings = ({**SFT, "lora_r": 0, "learning_rate": 1e-3, "fsdp": "true"} if sharded else
                {**SFT, "lora_dropout": 0.1})
    settings.update(max_steps=4, save_every=2)
    torchrun(["sft", *flags(model=tiny_model_dir, data=sft_data, output_dir=straight, **settings)])
    script = tmp_path / "kill_after_checkpoint.py"
    script.write_text(KILL_AFTER_CHECKPOINT.format(step=2))
    process = torchrun(["sft", *flags(model=tiny_model_dir, data=sft_data, output_dir=killed, **settings)],
                       script=str(script), check=False)
    assert process.returncode != 0 and f"exitcode  : -{int(signal.SIGKILL)}" in process.stderr, process.stderr[-2000:]
    assert (killed / "checkpoints" / "step-000002").is_dir() and not (killed / "model").exists()
    assert (killed / "checkpoints" / "step-000002" / "sharded").is_dir() == sharded
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(killed / "checkpoints", elsewhere / "checkpoints")
    torchrun(["sft", *flags(model=tiny_model_dir, data=sft_data, output_dir=killed, resume="true", **settings)])
    assert metric(killed, "sft/loss") == pytest.approx(metric(straight, "sft/loss"), rel=1e-6)
    assert_same_tensors(load_file(straight / "model" / "model.safetensors"),
                        load_file(killed / "model" / "model.safetensors"), atol=1e-6)

    # the same checkpoint on one process: another world size is an error that says so
    with pytest.raises(CheckpointError, match="world_size: checkpoint 2, now unset"):
        sft.run(sft.SFTConfig(model=str(tiny_model_dir), data=str(sft_data), output_dir=str(elsewhere),
                              resume=True, **{**settings, "fsdp": sharded}))
