"""Data parallelism on torch.distributed: which process this is, its share of a global batch, and
the few collectives the stages need (gradients and metrics summed, rollout rows gathered, one rank
writing files while the others wait for its verdict).

Launched by torchrun (WORLD_SIZE, RANK, LOCAL_RANK in the environment), `init` starts the process
group with NCCL on GPUs and gloo on CPUs. Launched plainly, the world is one process and every
function here is the identity, so a stage reads the same either way.

Global-batch semantics: `batch_size` counts examples over all ranks. Every rank reads the whole
dataset and draws the same batch (the same seed); each takes a contiguous share of it, cut into the
same micro-batches one process would make, and scales its loss by the whole batch's normaliser, so
the gradients summed over ranks are one process's gradients.
"""
import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.tensor


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, plots and writes files."""
        return self.rank == 0


def launched() -> bool:
    """Started by torchrun (or another launcher that sets torch.distributed's environment)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(device: str = "auto") -> "World":
    """Start the process group when launched by torchrun (idempotent); returns the world.

    NCCL when this rank runs on a GPU, gloo otherwise; each GPU rank binds cuda:LOCAL_RANK.
    """
    if not launched() or dist.is_initialized():
        return current()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    on_gpu = device != "cpu" and torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(local_rank)
    # an hour: rank 0 alone writes checkpoints and final models (an 8B merged model takes minutes)
    # while the others wait in a collective; NCCL's default of ten would call that a hang
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=datetime.timedelta(minutes=60))
    return current()


def current() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def close() -> None:
    """Destroy the process group, after collecting the objects that still hold it (FSDP2's device
    mesh in a module graph's reference cycles): left to the interpreter's exit, a gloo group's
    destructor met its worker threads still joinable and aborted the process ('terminate called
    without an active exception', seen under load after a finished FSDP2 run)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where collective buffers live: the rank's GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- shares of a batch ---

def share(count: int, world: World | None = None) -> slice:
    """This rank's contiguous share of `count` items; shares differ by at most one item."""
    world = world or current()
    base, extra = divmod(count, world.size)
    start = world.rank * base + min(world.rank, extra)
    return slice(start, start + base + (world.rank < extra))


def micro_batches(batch: list, micro_batch_size: int, world: World | None = None):
    """This rank's micro-batches of a global batch: its contiguous share cut into micro-batches.

    With len(batch) divisible by micro_batch_size x ranks (the configs check it) these are exactly
    the micro-batches one process would make, spread over the ranks.
    """
    mine = batch[share(len(batch), world)]
    for first in range(0, len(mine), micro_batch_size):
        yield mine[first:first + micro_batch_size]


# --- collectives (identity in one process) ---

def sum_across(*values: float) -> tuple[float, ...]:
    """Each value summed over ranks (in float64)."""
    if current().size == 1:
        return values
    totals = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(totals)
    return tuple(totals.tolist())


def sum_dict_across(values: dict[str, float]) -> dict[str, float]:
    """Each named value summed over ranks (every rank has the same names)."""
    keys = sorted(values)
    return dict(zip(keys, sum_across(*(values[k] for k in keys))))


def max_across(value: int) -> int:
    if current().size == 1:
        return value
    total = torch.tensor([value], dtype=torch.long, device=_comm_device())
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return int(total.item())


def all_across(flag: bool) -> bool:
    """True when `flag` is true on every rank."""
    if current().size == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.long, device=_comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def reduce_gradients(params) -> None:
    """Sum every parameter's gradient over ranks, in one flat buffer per dtype (a rank that had no
    data for a parameter adds zeros). Sharded (FSDP2) gradients arrive reduce-scattered as means
    and are made sums."""
    world = current()
    if world.size == 1:
        return
    for p in params:
        if p.grad is not None and _is_sharded(p.grad):
            p.grad.mul_(world.size)
    params = [p for p in params if p.requires_grad and not _is_sharded(p)]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    device = _comm_device()
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads]).to(device)
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _is_sharded(p: torch.Tensor) -> bool:
    return isinstance(p, torch.distributed.tensor.DTensor)


def sharded_grad_norm(params) -> torch.Tensor | None:
    """The global L2 norm of the gradients of params of which some are sharded (FSDP2 DTensors):
    a shard's squares are summed over the ranks, a whole gradient's counted once. None when no
    gradient is sharded (torch's own norm applies)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(_is_sharded(g) for g in grads):
        return None
    device = _comm_device()
    sharded = torch.zeros((), dtype=torch.float64, device=device)
    whole = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        if _is_sharded(g):
            sharded += g.to_local().double().pow(2).sum().to(device)
        else:
            whole += g.double().pow(2).sum().to(device)
    dist.all_reduce(sharded)
    return (sharded + whole).sqrt()


def gather_rows(tensor: torch.Tensor, pad_value=0) -> torch.Tensor:
    """Every rank's rows, in rank order, as one tensor: [b, ...] per rank (the same b on every
    rank) -> [ranks x b, ...]. A last dimension that differs across ranks is right-padded with
    `pad_value` to the longest."""
    world = current()
    if world.size == 1:
        return tensor
    if tensor.dim() > 1:
        width = max_across(tensor.shape[-1])
        tensor = torch.nn.functional.pad(tensor, (0, width - tensor.shape[-1]), value=pad_value)
    local = tensor.to(_comm_device()).contiguous()
    rows = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(rows, local)
    return torch.cat(rows).to(tensor.device)


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order."""
    if current().size == 1:
        return [obj]
    out = [None] * current().size
    dist.all_gather_object(out, obj)
    return out


def on_main(fn):
    """Run fn() on rank 0 only and return its result on every rank; an exception raised there is
    raised on every rank, so no rank waits forever on one that failed (a refused output directory,
    a full disk)."""
    world = current()
    if world.size == 1:
        return fn()
    outcome = [None]
    if world.main:
        try:
            outcome[0] = ("ok", fn())
        except Exception as error:  # noqa: BLE001 - handed to every rank, raised there
            outcome[0] = ("error", error)
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def barrier() -> None:
    if current().size > 1:
        dist.barrier()
