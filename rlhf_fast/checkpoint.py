"""Atomic, exactly-resumable checkpoints: safetensors for tensors, JSON for the rest, never pickle.

A checkpoint is a directory written under a hidden temporary name beside its final path and
renamed into place only once every file is on disk, so a killed run leaves either the previous
checkpoint or the new one at that path, never half of one. Training state (optimizer, scheduler,
the torch / CUDA / python / numpy RNGs, step) is saved so that a resumed run takes the same steps,
bit for bit on the same machine, as one that was never interrupted.

Layout written by `save_training_state` (tensors in .safetensors, everything else in .json):
    trainer_state.json                         {"format": 1, "step": 42, "extra": {...}}
    optimizer.safetensors / optimizer.json     state tensors as "state.{param_index}.{name}";
                                               param_groups and non-tensor state in JSON
    scheduler.json (+ .safetensors if any)     scheduler.state_dict()
    rng.safetensors / rng.json                 "torch.cpu", "torch.cuda.{i}" / python, numpy
"""
import json
import os
import re
import shutil
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rlhf_fast.errors import CheckpointError

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"step-(\d+)")


# ---------------------------------------------------------------------------------------------
# Atomic directories

@contextmanager
def atomic_directory(final_path):
    """Yield a fresh temp directory beside `final_path`; on success move it to `final_path`.

    On a clean exit every file is fsynced, an existing `final_path` is renamed away, the temp
    directory renamed into place, and the old one removed. On an exception the temp directory is
    removed and `final_path` is untouched. A kill part-way can leave a hidden `.<name>.tmp-*`
    (or, between the two renames, `.<name>.old-*`) directory beside it; `latest_checkpoint`
    ignores those and they can be deleted.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace(tmp, final, final.parent / f".{final.name}.old-{tag}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(new: Path, final: Path, old: Path) -> None:
    if not final.exists():
        os.rename(new, final)
    else:
        os.rename(final, old)  # same filesystem: atomic, and the previous checkpoint stays whole
        try:
            os.rename(new, final)
        except BaseException:
            os.rename(old, final)
            raise
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(directory))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory (Windows) persist renames anyway
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints(run_dir) -> list[Path]:
    """The `step-NNNNNN` directories under run_dir, newest (highest step) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if p.is_dir() and (m := STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(steps, reverse=True)]


def latest_checkpoint(run_dir) -> Path | None:
    """The `step-NNNNNN` directory under run_dir with the highest step, or None if there is none."""
    found = checkpoints(run_dir)
    return found[0] if found else None


def remove_stale_temporaries(directory) -> list[Path]:
    """Delete the hidden `.<name>.tmp-*` / `.<name>.old-*` directories that a killed save left in
    `directory`; returns what was removed."""
    directory = Path(directory)
    stale = [p for p in directory.glob(".*.tmp-*") if p.is_dir()] + \
            [p for p in directory.glob(".*.old-*") if p.is_dir()] if directory.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def checkpoint_dir(run_dir, step: int) -> Path:
    """Where the checkpoint of `step` lives: <run_dir>/step-000042."""
    return Path(run_dir) / f"step-{step:06d}"


# ---------------------------------------------------------------------------------------------
# Tensors

def non_finite(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """{name: count of NaN/inf values} for every floating-point tensor that has any."""
    counts = {}
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor.detach())).sum())
            if bad:
                counts[name] = bad
    return counts


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise CheckpointError naming `where` and the first tensors when any value is NaN or inf:
    non-finite weights are never saved and never loaded."""
    bad = non_finite(tensors)
    if bad:
        names = ", ".join(f"{name} ({count})" for name, count in list(bad.items())[:3])
        raise CheckpointError(f"{where}: {sum(bad.values())} non-finite weight values in {len(bad)} tensor(s), "
                              f"e.g. {names}; refusing to use them")


def save_tensors(path, tensors: dict[str, torch.Tensor]) -> None:
    """Write named tensors to a safetensors file (copied to CPU; shared storage is cloned apart).
    Non-finite floating-point values are refused (CheckpointError)."""
    check_finite(tensors, os.fspath(path))
    out, seen = {}, set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen and tensor.numel():  # safetensors refuses tensors that share memory
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    save_file(out, os.fspath(path), metadata={"format": "pt"})


def load_tensors(path, device="cpu") -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file (no pickle involved) onto `device`; a missing,
    truncated or corrupt file is a CheckpointError naming it."""
    try:
        with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


# ---------------------------------------------------------------------------------------------
# State dicts as JSON + safetensors
#
# A state dict is walked once: each tensor goes to the safetensors file under its dotted path
# ("state.0.exp_avg") and is replaced in the JSON by {"__tensor__": path}. Tuples and dicts with
# non-string keys (the optimizer's int param ids) are tagged so they come back as they were.

def _encode(obj, tensors: dict, path: str):
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}" if path else k) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, f"{path}.key"), _encode(v, tensors, f"{path}.{k}")]
                              for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint {type(obj).__name__} at {path!r}: only tensors, numbers, "
                    "strings, None, lists, tuples and dicts are stored (never pickle)")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_state_dict(directory, name: str, state: dict) -> None:
    """Write a state dict as <name>.json plus, when it holds tensors, <name>.safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors, "")
    if tensors:
        save_tensors(Path(directory) / f"{name}.safetensors", tensors)
    _write_json(Path(directory) / f"{name}.json", encoded)


def load_state_dict(directory, name: str) -> dict:
    """Inverse of save_state_dict; tensors come back on the CPU."""
    directory = Path(directory)
    tensor_file = directory / f"{name}.safetensors"
    tensors = load_tensors(tensor_file) if tensor_file.exists() else {}
    return _decode(_read_json(directory / f"{name}.json"), tensors)


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


# ---------------------------------------------------------------------------------------------
# RNG states

def rng_state() -> tuple[dict, dict]:
    """(tensors, JSON) of every RNG a training step may draw from."""
    tensors = {"torch.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch.cuda.{i}"] = state
    import random
    version, internal, gauss = random.getstate()
    states = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np
    except ImportError:
        return tensors, states
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    states["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return tensors, states


def set_rng_state(tensors: dict, states: dict) -> None:
    torch.set_rng_state(tensors["torch.cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and not torch.cuda.is_available():
        warnings.warn("the checkpoint holds CUDA RNG states but CUDA is unavailable: they are not "
                      "restored, so a resumed run on this machine will not match an uninterrupted one")
    elif cuda:
        if len(cuda) != torch.cuda.device_count():
            warnings.warn(f"the checkpoint holds {len(cuda)} CUDA RNG states for "
                          f"{torch.cuda.device_count()} devices: restoring the first ones only")
        for i, state in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
    import random
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        import numpy as np
        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------
# Training state

def save_training_state(directory, *, optimizer=None, scheduler=None, step: int, extra: dict | None = None) -> None:
    """Write optimizer, scheduler and RNG states, step and `extra` (plain JSON) into `directory`.

    Call it inside `atomic_directory` so a kill cannot leave a partial state; model weights are
    saved beside it by the caller (e.g. with `save_tensors`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if optimizer is not None:
        save_state_dict(directory, "optimizer", optimizer.state_dict())
    if scheduler is not None:
        save_state_dict(directory, "scheduler", scheduler.state_dict())
    rng_tensors, rng_json = rng_state()
    save_tensors(directory / "rng.safetensors", rng_tensors)
    _write_json(directory / "rng.json", rng_json)
    try:
        _write_json(directory / "trainer_state.json",
                    {"format": FORMAT_VERSION, "step": int(step), "extra": extra or {}})
    except TypeError as e:
        raise TypeError(f"extra must be plain JSON (numbers, strings, lists, dicts): {e}") from None


def read_training_state(directory) -> dict:
    """Everything save_training_state wrote, read into memory and applied nowhere: {"step",
    "extra", "optimizer", "scheduler", "rng"} (None for what was not saved). A missing or corrupt
    file is a CheckpointError naming it, before any state has been touched."""
    directory = Path(directory)
    trainer_state = _read_json(directory / "trainer_state.json")
    found = trainer_state.get("format") if isinstance(trainer_state, dict) else trainer_state
    if found != FORMAT_VERSION:
        raise CheckpointError(f"{directory / 'trainer_state.json'}: checkpoint format {found!r}, "
                              f"this version reads format {FORMAT_VERSION}")
    state = {"step": trainer_state["step"], "extra": trainer_state["extra"]}
    for name in ("optimizer", "scheduler"):
        state[name] = load_state_dict(directory, name) if (directory / f"{name}.json").exists() else None
    state["rng"] = (load_tensors(directory / "rng.safetensors"), _read_json(directory / "rng.json"))
    return state


def apply_training_state(state: dict, *, optimizer=None, scheduler=None, restore_rng: bool = True) -> None:
    """Load a read_training_state() result into the optimizer, scheduler and RNGs."""
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        if target is None:
            continue
        if state[name] is None:
            raise CheckpointError(f"no {name} state was saved in this checkpoint")
        target.load_state_dict(state[name])
    if restore_rng:
        set_rng_state(*state["rng"])


def load_training_state(directory, *, optimizer=None, scheduler=None, restore_rng: bool = True) -> dict:
    """Restore what save_training_state wrote; returns {"step": int, "extra": dict}.

    The optimizer's state tensors are moved to its parameters' device and dtype by torch's own
    `load_state_dict`. Nothing is unpickled: tensors come from safetensors, the rest from JSON.
    """
    state = read_training_state(directory)
    apply_training_state(state, optimizer=optimizer, scheduler=scheduler, restore_rng=restore_rng)
    return {"step": state["step"], "extra": state["extra"]}
