"""Test harness: where each backend's tensors live, Triton through its interpreter without CUDA, the
`gpu` marker, uncompiled rollout steps outside it, a small chunk budget for the fused LM-head ops, and
a tiny saved model."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton reads this when a kernel is decorated, so it must be set before kernels are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import device_for  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _uncompiled_rollout_steps(request, monkeypatch):
    """On CUDA the rollout engine captures its decode step (torch.compile + CUDA graphs: tens of
    seconds of compilation for each new shape or sampling setting, in every xdist worker). Outside
    `gpu`-marked tests, which test the capture itself, the step runs uncompiled; the captured path's
    logic (padded rows, bucketed cache, static step inputs) still runs. A test that patches
    compile_step itself overrides this."""
    if HAS_CUDA and request.node.get_closest_marker("gpu") is None:
        from rlhf_fast.rollout import engine

        monkeypatch.setattr(engine, "compile_step", lambda step: step)


@pytest.fixture
def device(request):
    """The device this test's tensors belong on: that of its `backend` parameter (helpers.device_for:
    CUDA where there is one, the CPU for "native" or without CUDA); a test without a `backend`
    parameter (a model test, say) gets CUDA where there is one, else the CPU."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend", "auto") if callspec else "auto"
    return device_for(backend)


@pytest.fixture
def small_chunks(monkeypatch):
    """A 50 kB logits budget per chunk on every device, so the fused LM-head ops walk several
    chunks (4 to 250 rows) with a ragged last one."""
    from rlhf_fast.kernels import _lm_head

    monkeypatch.setattr(_lm_head, "CPU_CHUNK_BYTES", 50_000)
    monkeypatch.setattr(_lm_head, "CUDA_CHUNK_BYTES", 50_000)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama-shaped model and its tokenizer, saved with save_pretrained like a user's model."""
    from rlhf_fast.tiny import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def one_torch_thread():
    """One torch thread for tiny-model runs: on a busy 2-core machine a second thread only contends
    (test_rest.py took 65 s with two threads at load 6, 8 s with one). Opt in with
    pytestmark = pytest.mark.usefixtures("one_torch_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
