"""DPO and its variants: every loss against its formula and against TRL 0.29.1, the one-forward pair
batch, the reference at step 0, learning, SimPO without a reference, precomputed reference
log-probs, and resume."""
import json
import math
import shutil
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from rlhf_fast import data
from rlhf_fast.errors import ConfigError, DataError
from rlhf_fast.models.adapters import add_lora
from rlhf_fast.models.loading import load_causal_lm, load_tokenizer
from rlhf_fast.models.roles import ActorCritic
from rlhf_fast.preference_losses import LOSS_TYPES, preference_loss, preference_metrics
from rlhf_fast.stages import dpo

from helpers import assert_rel_close

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: a second thread only contends


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def logged(output_dir, key):
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def random_logps(B, seed=0):
    """Summed log-probs of B pairs (policy and reference, chosen and rejected) and response lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (2, B), generator=g)
    logps = -torch.rand(4, B, generator=g, dtype=torch.float64) * 3 * torch.cat([lengths, lengths]) - 0.1
    pc, pr, rc, rr = logps
    return pc, pr, rc, rr, lengths[0], lengths[1]


def formula(loss_type, pc, pr, rc, rr, lc, lr, beta, eps, gamma, m):
    """The papers' losses written out per pair, in fp64."""
    out = []
    for i in range(len(pc)):
        ratio = (pc[i] - rc[i]) - (pr[i] - rr[i])
        if loss_type == "ipo":
            h = (pc[i] - rc[i]) / lc[i] - (pr[i] - rr[i]) / lr[i]
            out.append((h - m[i] / beta - 1 / (2 * beta)) ** 2)
            continue
        if loss_type == "simpo":
            z = beta * (pc[i] / lc[i] - pr[i] / lr[i]) - gamma - m[i]
        else:
            z = beta * ratio - m[i]
        z = float(z)
        log_sig = lambda x: -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))  # noqa: E731
        if loss_type in ("sigmoid", "simpo"):
            out.append(-(1 - eps) * log_sig(z) - eps * log_sig(-z))
        elif loss_type == "robust":
            out.append((-(1 - eps) * log_sig(z) + eps * log_sig(-z)) / (1 - 2 * eps))
        else:  # hinge
            out.append(max(0.0, 1 - z))
    return torch.tensor([float(v) for v in out], dtype=torch.float64)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("with_margin", [False, True])
def test_every_loss_matches_its_formula(loss_type, with_margin):
    pc, pr, rc, rr, lc, lr = random_logps(7)
    eps = 0.1 if loss_type in ("sigmoid", "robust", "simpo") else 0.0
    m = torch.rand(7, dtype=torch.float64) if with_margin else torch.zeros(7, dtype=torch.float64)
    losses, chosen, rejected = preference_loss(pc, pr, rc, rr, lc, lr, loss_type=loss_type, beta=0.3,
                                               label_smoothing=eps, simpo_gamma=0.7,
                                               margin=m if with_margin else None)
    assert losses.dtype == torch.float32 and losses.shape == (7,)
    assert_rel_close(losses, formula(loss_type, pc, pr, rc, rr, lc, lr, 0.3, eps, 0.7, m), 1e-6, loss_type)
    if loss_type == "simpo":
        assert_rel_close(chosen, 0.3 * pc / lc, 1e-6, "simpo rewards")
    else:
        assert_rel_close(chosen, 0.3 * (pc - rc), 1e-6, "rewards/chosen")
        assert_rel_close(rejected, 0.3 * (pr - rr), 1e-6, "rewards/rejected")


def test_per_pair_label_smoothing_is_the_soft_label_cross_entropy():
    pc, pr, rc, rr, lc, lr = random_logps(5)
    p = torch.tensor([0.5, 0.6, 0.8, 0.95, 1.0])
    losses, _, _ = preference_loss(pc, pr, rc, rr, lc, lr, beta=0.5, label_smoothing=1 - p)
    z = 0.5 * ((pc - rc) - (pr - rr))
    assert_rel_close(losses, -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z)), 1e-6)


def test_simpo_ignores_the_reference():
    pc, pr, rc, rr, lc, lr = random_logps(6)
    a = preference_loss(pc, pr, rc, rr, lc, lr, loss_type="simpo", beta=2.0)
    b = preference_loss(pc, pr, rc * 3 - 1, rr + 5, lc, lr, loss_type="simpo", beta=2.0)
    c = preference_loss(pc, pr, None, None, lc, lr, loss_type="simpo", beta=2.0)
    assert all(torch.equal(x, y) and torch.equal(x, w) for x, y, w in zip(a, b, c))
    with pytest.raises(ValueError, match="reference"):
        preference_loss(pc, pr, None, None, lc, lr, loss_type="sigmoid")


# --- TRL 0.29.1 as the outside reference --------------------------------------------------------

def trl_dpo(loss_type, beta, eps, pc, pr, rc, rr, lc, lr):
    """TRL DPOTrainer._compute_loss on a stand-in model whose logits give exactly these summed
    log-probs (each response's total spread evenly over its tokens, vocabulary of 2, label 0), with
    precomputed reference log-probs: (loss, TRL's logged metrics)."""
    from trl import DPOTrainer

    B, T = len(pc), int(max(lc.max(), lr.max())) + 1
    lengths = torch.cat([lc, lr])
    per_token = torch.cat([pc, pr]) / lengths                                   # [2B], each < 0
    other = torch.log(torch.expm1(-per_token))                                  # log_softmax at 0 = per_token
    logits = torch.zeros(2 * B, T, 2, dtype=torch.float64)
    logits[:, :, 1] = other[:, None]
    completion = (torch.arange(T)[None, :] >= 1) & (torch.arange(T)[None, :] <= lengths[:, None])
    inputs = {"input_ids": torch.zeros(2 * B, T, dtype=torch.long),
              "attention_mask": torch.ones(2 * B, T, dtype=torch.long), "completion_mask": completion.long(),
              "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    stub = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator, ld_alpha=None,
                           precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                           loss_weights=[1.0], beta=beta, label_smoothing=eps, use_weighting=False,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0,
                           _truncate_inputs=lambda *t: t)
    model = lambda **kwargs: SimpleNamespace(logits=logits)  # noqa: E731
    loss = DPOTrainer._compute_loss(stub, model, inputs, False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2)])
def test_dpo_losses_and_metrics_match_trl(loss_type, eps):
    pytest.importorskip("trl")
    pc, pr, rc, rr, lc, lr = random_logps(9, seed=3)
    losses, chosen, rejected = preference_loss(pc, pr, rc, rr, lc, lr, loss_type=loss_type, beta=0.2,
                                               label_smoothing=eps)
    trl_loss, trl_metrics = trl_dpo(loss_type, 0.2, eps, pc, pr, rc, rr, lc, lr)
    assert abs(losses.double().mean().item() - trl_loss.item()) <= 1e-6 * max(1.0, abs(trl_loss.item()))
    ours = preference_metrics(chosen, rejected, pc, pr)
    for key, value in ours.items():
        assert abs(value - trl_metrics[key]) <= 1e-5 * max(1.0, abs(value)), (key, value, trl_metrics[key])


@pytest.mark.parametrize("loss_type,eps", [("simpo", 0.0), ("simpo", 0.15), ("sigmoid", 0.15)])
def test_simpo_and_conservative_dpo_match_trl_cpo(loss_type, eps):
    """CPOTrainer.cpo_loss reads log-probs straight: SimPO on length-averaged log-probs, and (given the
    log-ratios as its log-probs) its label-smoothed sigmoid is conservative DPO."""
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    pc, pr, rc, rr, lc, lr = random_logps(9, seed=4)
    stub = SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=1.5, simpo_gamma=0.4, label_smoothing=eps,
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    if loss_type == "simpo":
        expected, exp_chosen, _ = CPOTrainer.cpo_loss(stub, pc / lc, pr / lr)
    else:
        expected, _, _ = CPOTrainer.cpo_loss(stub, pc - rc, pr - rr)
    losses, chosen, _ = preference_loss(pc, pr, rc, rr, lc, lr, loss_type=loss_type, beta=1.5, label_smoothing=eps,
                                        simpo_gamma=0.4)
    assert_rel_close(losses, expected, 1e-6, loss_type)
    if loss_type == "simpo":
        assert_rel_close(chosen, exp_chosen, 1e-6, "simpo rewards")


# --- the stage on the tiny model ----------------------------------------------------------------

def pair_records(n=12):
    return [{"prompt": f"q{i}:", "chosen": f" good answer {i % 5}", "rejected": f" bad reply number {i % 3}"}
            for i in range(n)]


def encoded_pairs(tiny_model_dir, n=6):
    tokenizer = load_tokenizer(tiny_model_dir)
    pairs = [data.PreferencePair(r["prompt"] * (1 + i % 3), r["chosen"], r["rejected"], 0.0, 1.0, "t")
             for i, r in enumerate(pair_records(n))]
    return dpo.encode_pairs(pairs, tokenizer, 32, split="test"), tokenizer


def test_chosen_and_rejected_in_one_forward_equal_separate_forwards_and_hf_logits(tiny_model_dir):
    pairs, tokenizer = encoded_pairs(tiny_model_dir)
    model = add_lora(load_causal_lm(tiny_model_dir, device=DEVICE, dtype="fp32"), "policy", r=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        joint, lengths = dpo.response_logprob_sums(model, *dpo.collate_pairs(pairs, pad, DEVICE))
        separate = []
        for side in ("chosen", "rejected"):
            rows = [getattr(p, side) for p in pairs]
            ids, mask = data.pad_batch([r.input_ids for r in rows], pad)
            starts = torch.tensor([r.response_start for r in rows], device=DEVICE)
            separate.append(dpo.response_logprob_sums(model, ids.to(DEVICE), mask.to(DEVICE), starts)[0])
    assert_rel_close(joint, torch.cat(separate), 1e-5, "one forward vs two")
    # against the HF model's own logits, in fp64, sequence by sequence
    expected, counts = [], []
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row.input_ids], device=DEVICE)
            logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
            expected.append(sum(logp[t - 1, row.input_ids[t]].item()
                                for t in range(row.response_start, len(row.input_ids))))
            counts.append(len(row.input_ids) - row.response_start)
    assert_rel_close(joint, torch.tensor(expected), 1e-5, "vs HF logits")
    assert lengths.tolist() == counts


@pytest.mark.parametrize("lora_r", [4, 0])
def test_step_zero_reference_is_the_policy_rewards_zero_loss_ln2(tiny_model_dir, tmp_path, lora_r):
    """LoRA: the reference is the same trunk with adapters off; full fine-tuning: a frozen copy.
    Either way the first step's policy equals it: rewards 0, accuracy 0, sigmoid loss ln 2."""
    prefs = write_jsonl(tmp_path / "prefs.jsonl", pair_records(8))
    out = tmp_path / "dpo"
    dpo.run(dpo.DPOConfig(model=str(tiny_model_dir), data=str(prefs), output_dir=str(out), lora_r=lora_r,
                          batch_size=4, micro_batch_size=2, max_steps=1, max_length=32))
    assert logged(out, "dpo/rewards/chosen") == [0.0] and logged(out, "dpo/rewards/margins") == [0.0]
    assert logged(out, "dpo/rewards/accuracies") == [0.0]
    assert abs(logged(out, "dpo/loss")[0] - math.log(2)) < 1e-6
    assert logged(out, "dpo/logps/chosen")[0] < 0
    assert (out / "model" / "config.json").exists()


def test_a_few_dpo_steps_on_separable_pairs_raise_reward_accuracy(tiny_model_dir, tmp_path):
    records = [{"prompt": f"q{i}:", "chosen": f" good answer {i % 5}", "rejected": f" bad reply {i % 5}"}
               for i in range(40)]
    prefs = write_jsonl(tmp_path / "prefs.jsonl", records)
    out = tmp_path / "dpo"
    dpo.run(dpo.DPOConfig(model=str(tiny_model_dir), data=str(prefs), output_dir=str(out), lora_r=8,
                          learning_rate=1e-2, lr_schedule="constant", beta=0.5, batch_size=8, micro_batch_size=8,
                          max_steps=6, max_length=32, eval_fraction=0.25))
    accuracies, margins = logged(out, "dpo/rewards/accuracies"), logged(out, "dpo/rewards/margins")
    assert accuracies[0] == 0.0 and accuracies[-1] == 1.0, accuracies
    assert margins[-1] > margins[0] + 0.5, margins
    assert logged(out, "dpo/loss")[-1] < 0.5 * math.log(2)
    assert logged(out, "dpo/eval_rewards/accuracies")[-1] > 0.9


def test_simpo_runs_without_any_reference(tiny_model_dir, tmp_path, monkeypatch):
    """No reference forward and no frozen copy: SimPO's first-step rewards are beta x the mean
    per-token log-prob, not 0."""
    def no_reference(*args, **kwargs):
        raise AssertionError("SimPO must not compute reference log-probs")

    monkeypatch.setattr(dpo.Reference, "logprobs", no_reference)
    monkeypatch.setattr(ActorCritic, "full_finetune", no_reference)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", pair_records(4))
    out = tmp_path / "simpo"
    dpo.run(dpo.DPOConfig(model=str(tiny_model_dir), data=str(prefs), output_dir=str(out), loss_type="simpo",
                          beta=2.0, lora_r=0, batch_size=4, micro_batch_size=4, max_steps=1, max_length=32))
    assert logged(out, "dpo/rewards/chosen")[0] < 0


def test_precomputed_reference_logprobs_equal_on_the_fly_ones(tiny_model_dir):
    pairs, tokenizer = encoded_pairs(tiny_model_dir, n=7)
    model = add_lora(load_causal_lm(tiny_model_dir, device=DEVICE, dtype="fp32"), "policy", r=4, alpha=8)
    reference = dpo.Reference(ActorCritic(model, None))
    reference.precompute("training", pairs, tokenizer.pad_token_id, 3, DEVICE)
    for name, p in model.named_parameters():  # the policy moves; the reference must not
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    indices = [6, 0, 3, 4]
    batch = dpo.collate_pairs([pairs[i] for i in indices], tokenizer.pad_token_id, DEVICE)
    on_the_fly = dpo.Reference(ActorCritic(model, None))("training", indices, *batch)
    assert_rel_close(reference("training", indices, *batch), on_the_fly, 1e-6, "precomputed vs on the fly")


def test_full_finetuning_with_precomputed_reference_trains_like_the_frozen_copy(tiny_model_dir, tmp_path):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", pair_records(8))
    common = dict(model=str(tiny_model_dir), data=str(prefs), lora_r=0, learning_rate=1e-3, batch_size=4,
                  micro_batch_size=2, max_steps=2, max_length=32, loss_type="ipo")
    dpo.run(dpo.DPOConfig(output_dir=str(tmp_path / "copy"), **common))
    dpo.run(dpo.DPOConfig(output_dir=str(tmp_path / "table"), precompute_ref_logprobs=True, **common))
    for key in ("dpo/loss", "dpo/rewards/margins"):
        a, b = logged(tmp_path / "copy", key), logged(tmp_path / "table", key)
        assert all(abs(x - y) <= 1e-5 * max(1.0, abs(x)) for x, y in zip(a, b)), (key, a, b)


def test_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", pair_records(10))
    common = dict(model=str(tiny_model_dir), data=str(prefs), lora_r=4, lora_dropout=0.1, learning_rate=1e-2,
                  batch_size=4, micro_batch_size=2, max_steps=4, max_length=32, save_every=2, use_margin=True)
    straight = tmp_path / "straight"
    dpo.run(dpo.DPOConfig(output_dir=str(straight), **common))
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    torch.manual_seed(1234)  # a new process starts from other RNG states
    dpo.run(dpo.DPOConfig(output_dir=str(resumed), resume=True, **common))
    a = load_file(straight / "model" / "model.safetensors")
    b = load_file(resumed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("dpo/loss", "dpo/rewards/margins"):
        assert logged(straight, key)[2:] == logged(resumed, key), key


def test_bad_config_is_one_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="label_smoothing applies to"):
        dpo.DPOConfig(model=str(tiny_model_dir), data="x.jsonl", loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="label_smoothing: must be < 0.5"):
        dpo.DPOConfig(model=str(tiny_model_dir), data="x.jsonl", loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ConfigError, match="loss_type: must be one of"):
        dpo.DPOConfig(model=str(tiny_model_dir), data="x.jsonl", loss_type="kto")
    with pytest.raises(ConfigError, match="data: required"):
        dpo.DPOConfig(model=str(tiny_model_dir))
    with pytest.raises(ConfigError, match="soft_labels applies to"):
        dpo.DPOConfig(model=str(tiny_model_dir), data="x.jsonl", loss_type="robust", soft_labels=True)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": " a", "rejected": " b", "ai_preference": 0.3}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'ai_preference' must be a number in \[0.5, 1\]"):
        dpo.run(dpo.DPOConfig(model=str(tiny_model_dir), data=str(bad), output_dir=str(tmp_path / "o"),
                              soft_labels=True))
