"""The one step loop every training stage runs: resume, step, log, checkpoint."""
import time
from pathlib import Path

from tqdm import tqdm

from rlhf_fast.memory import peak_memory_gb
from rlhf_fast.metrics import MetricsLogger
from rlhf_fast.training import runstate


def run_steps(config, name: str, step_fn, *, num_steps: int, modules: dict, optimizer, scheduler, device,
              stage_state=None, load_stage_state=None) -> MetricsLogger:
    """Run step_fn(step) -> metrics for steps [start, num_steps) and return the MetricsLogger.

    step_fn does one optimiser step of its stage (SFT: accumulate and step; PPO: a rollout and its
    PPO epochs). The loop resumes from the latest checkpoint when config.resume, adds the learning
    rate, the step's wall time (and tokens per second, from a "perf/tokens" count) and the peak
    memory to the metrics, logs every config.log_every
    steps and the last, and checkpoints every config.save_every steps. stage_state() -> dict and
    load_stage_state(dict) carry a stage's own state (its generator, a KL coefficient) through
    checkpoints.
    """
    output = Path(config.output_dir)
    start = 0
    if config.resume:
        start, saved = runstate.resume(output / "checkpoints", modules, optimizer, scheduler)
        if start and load_stage_state is not None:
            load_stage_state(saved)
    logger = MetricsLogger(output)
    for step in tqdm(range(start, num_steps), desc=name, initial=start, total=num_steps):
        begin = time.perf_counter()
        metrics = step_fn(step)
        elapsed = time.perf_counter() - begin
        metrics["perf/step_s"] = elapsed
        if "perf/tokens" in metrics:
            metrics["perf/tokens_per_s"] = metrics.pop("perf/tokens") / elapsed
        if (step + 1) % config.log_every == 0 or step + 1 == num_steps:
            logger.log(step + 1, {**metrics, f"{name}/lr": scheduler.get_last_lr()[0],
                                  "mem/peak_gb": peak_memory_gb(device)})
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < num_steps:
            runstate.save(output / "checkpoints", step + 1, modules, optimizer, scheduler,
                          stage_state=None if stage_state is None else stage_state())
    return logger
