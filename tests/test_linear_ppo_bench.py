"""bench/linear_ppo.py's CUDA path, run on the CPU: providers one at a time, each checked, timed and
written as soon as it is measured (ours first, torch.compile last), so that scripts/gpu_check.sh's time
limit costs only what was not reached."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is importable from the root

from bench import linear_ppo  # noqa: E402


@pytest.fixture
def uncompiled(monkeypatch):
    """torch.compile's row runs eager (its compile is not what these tests are about); peaks are 0."""
    providers = linear_ppo.providers
    monkeypatch.setattr(linear_ppo, "providers", lambda: {**providers(), "torch.compile": linear_ppo.eager})
    monkeypatch.setattr(linear_ppo, "cuda_peak_mb", lambda run, device: 0.0)


def test_in_turn_writes_each_provider_as_it_is_measured(uncompiled):
    written = []
    rows = linear_ppo.measure("cpu", linear_ppo.SMOKE_SHAPE, sweep=[1], in_turn=True,
                              on_rows=lambda rows: written.append([r["provider"] for r in rows]))
    order = ["ours (linear_ppo_loss)", "token_logprobs alone", "eager", "token_logprobs + eager loss",
             "ours (linear_ppo_loss) @ 1 MiB", "torch.compile"]
    assert written == [order[:i] for i in range(1, len(order) + 1)]
    assert [r["provider"] for r in rows] == order
    alone = next(r["median_ms"] for r in rows if r["provider"] == "token_logprobs alone")
    for r in rows:
        assert r["median_ms"] > 0 and r["vs_token_logprobs"] == round(r["median_ms"] / alone, 3)
    assert rows[0]["vs_token_logprobs"] is not None  # ours' ratio, although measured before its base


def test_in_turn_stops_at_a_provider_that_disagrees_with_ours(uncompiled, monkeypatch):
    def wrong(**inputs):
        return linear_ppo.eager(**inputs) * 1.5

    providers = linear_ppo.providers
    monkeypatch.setattr(linear_ppo, "providers", lambda: {**providers(), "eager": wrong})
    written = []
    with pytest.raises(AssertionError, match="loss: eager"):
        linear_ppo.measure("cpu", linear_ppo.SMOKE_SHAPE, in_turn=True,
                           on_rows=lambda rows: written.append([r["provider"] for r in rows]))
    assert written[-1] == ["ours (linear_ppo_loss)", "token_logprobs alone"]  # what came before it is kept
