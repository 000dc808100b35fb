"""rollout.weights.AdapterView against peft itself: with adapters off, one named adapter, the active
ones, or adapters disabled, its hidden states are peft's bit for bit; it declines dropout it does not
model; and it enters no state dict."""
import torch

from helpers import randomize_lora

from rlhf_fast.models.adapters import active_adapter, adapters_disabled, add_lora
from rlhf_fast.models.loading import load_causal_lm
from rlhf_fast.models.roles import ActorCritic
from rlhf_fast.models.trunk import last_hidden
from rlhf_fast.rollout.weights import adapter_view


def two_adapters(model_dir, dropout=0.0):
    """fp32 tiny model with a "policy" and a "reward" adapter, A and B random (a fresh B is 0)."""
    model = add_lora(load_causal_lm(model_dir, device="cpu", dtype="fp32"), "policy", r=4, alpha=8, dropout=dropout)
    model = add_lora(model, "reward", r=4, alpha=8, dropout=dropout)
    model.set_adapter("policy")
    return randomize_lora(model, seed=0)


def batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 60, (3, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    return ids, mask


@torch.no_grad()
def test_adapter_view_is_peft_bit_for_bit(tiny_model_dir):
    model = two_adapters(tiny_model_dir).eval()
    ids, mask = batch()
    view = adapter_view(model)
    policy = last_hidden(model, ids, mask)
    assert not torch.equal(policy, last_hidden(view.module([], training=False), ids, mask))
    assert torch.equal(last_hidden(view.module(training=False), ids, mask), policy)
    with adapters_disabled(model):
        base = last_hidden(model, ids, mask)
        assert torch.equal(last_hidden(view.module(training=False), ids, mask), base)  # disabled: none
    assert torch.equal(last_hidden(view.module([], training=False), ids, mask), base)
    with active_adapter(model, "reward"):
        reward = last_hidden(model, ids, mask)
    assert torch.equal(last_hidden(view.module(["reward"], training=False), ids, mask), reward)
    assert adapter_view(model) is view  # kept for the model


@torch.no_grad()
def test_actor_critic_runs_the_view_without_autograd_only(tiny_model_dir):
    model = two_adapters(tiny_model_dir).train()
    ids, mask = batch()
    actor = ActorCritic(model, None)
    keys = set(actor.state_dict())
    with torch.enable_grad():
        trained, _ = actor(ids, mask, mask[:, 1:])
    scored, _ = actor(ids, mask, mask[:, 1:])
    assert torch.equal(scored.hidden, trained.hidden.detach())
    with actor.as_reference() as reference:
        ref = last_hidden(reference, ids, mask)
    with adapters_disabled(model):
        assert torch.equal(ref, last_hidden(model, ids, mask))
    assert set(actor.state_dict()) == keys  # the view is no submodule


def test_adapter_view_declines_dropout_in_training(tiny_model_dir):
    model = two_adapters(tiny_model_dir, dropout=0.1)
    view = adapter_view(model)
    assert view.module(training=True) is None
    assert view.module(training=False) is not None  # dropout is off in eval mode
