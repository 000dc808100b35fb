"""The one step loop every training stage runs: resume, step, log, watch, checkpoint, final save."""
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from rlhf_fast import distributed
from rlhf_fast.errors import CheckpointError
from rlhf_fast.memory import peak_memory_gb
from rlhf_fast.metrics import MetricsLogger
from rlhf_fast.models import sharding
from rlhf_fast.training import rundir, runstate


class CollapseWatch:
    """Warns, loudly and once per streak, when training has stopped learning: a gradient norm of 0,
    or an entropy at log(vocab) (a uniform policy), for `steps` logged steps in a row."""

    def __init__(self, steps: int, vocab_size: int | None):
        self.steps, self.log_vocab = steps, math.log(vocab_size) if vocab_size else None
        self.streak = 0

    def signs(self, metrics: dict) -> list[str]:
        found = [f"{k} = 0" for k, v in metrics.items() if k.endswith("/grad_norm") and v == 0.0]
        if self.log_vocab is not None:
            found += [f"{k} = {v:.4f} = log(vocab)" for k, v in metrics.items()
                      if k.endswith("/entropy") and isinstance(v, float) and abs(v - self.log_vocab) < 1e-3]
        return found

    def update(self, step: int, metrics: dict) -> None:
        signs = self.signs(metrics)
        self.streak = self.streak + 1 if signs else 0
        if self.streak == self.steps:
            print(f"WARNING: training looks collapsed at step {step}: {', '.join(signs)} for {self.steps} "
                  "logged steps in a row (a dead model learns nothing more; lower learning_rate?)")


def progress(steps, name: str, start: int, total: int):
    """tqdm's bar on a terminal; in a log file (stdout not a terminal) a plain line every tenth of
    the run instead of carriage-return frames."""
    if sys.stderr.isatty():
        yield from tqdm(steps, desc=name, initial=start, total=total)
        return
    every = max(1, total // 10)
    begin = time.perf_counter()
    for done, step in enumerate(steps, start=1):
        yield step
        if (step + 1) % every == 0 or step + 1 == total:
            print(f"{name}: step {step + 1}/{total}, {(time.perf_counter() - begin) / done:.2f} s/step", flush=True)


def run_steps(config, name: str, step_fn, *, num_steps: int, modules: dict, stepper, device,
              stage_state=None, load_stage_state=None, vocab_size: int | None = None) -> MetricsLogger:
    """Run step_fn(step) -> metrics for steps [start, num_steps) and return the MetricsLogger.

    step_fn does one step of its stage, calling `stepper` (a training.optim.OptimizerStep) for each
    optimiser step it takes (SFT: accumulate then one; PPO: one per minibatch). The loop resumes
    from the newest readable checkpoint when config.resume (settings checked, stage state restored
    through load_stage_state(dict)), adds the learning rate, skipped steps, the step's wall time
    (and tokens per second, from a "perf/tokens" count) and the peak memory to the metrics, logs
    every config.log_every steps and the last, watches for a collapse, and checkpoints every
    config.save_every steps, keeping config.keep_last. Under torchrun every rank runs the loop
    (step_fn returns metrics already summed over ranks); rank 0 alone shows progress and writes.
    """
    output = Path(config.output_dir)
    start = 0
    if config.resume:
        resumed = runstate.resume(output / "checkpoints", modules, stepper.optimizer, stepper.scheduler,
                                  settings=config.run_settings(), num_steps=num_steps,
                                  settings_before=config.settings_before_options())
        if resumed is None:
            print(f"{name}: nothing to resume in {output / 'checkpoints'} (no checkpoint); starting at step 0")
        else:
            start, saved = resumed
            if load_stage_state is not None:
                load_stage_state(saved)
    main = distributed.current().main
    logger = MetricsLogger(output, resumed_at=start, write=main)
    watch = CollapseWatch(config.collapse_steps, vocab_size)
    steps = range(start, num_steps)
    for step in progress(steps, name, start, num_steps) if main else steps:
        begin = time.perf_counter()
        metrics = step_fn(step)
        elapsed = time.perf_counter() - begin
        metrics["perf/step_s"] = elapsed
        if "perf/tokens" in metrics:
            metrics["perf/tokens_per_s"] = metrics.pop("perf/tokens") / elapsed
        if (step + 1) % config.log_every == 0 or step + 1 == num_steps:
            logger.log(step + 1, {**metrics, f"{name}/lr": stepper.scheduler.get_last_lr()[0],
                                  "train/skipped_steps": stepper.skipped, "mem/peak_gb": peak_memory_gb(device)})
            if main:
                watch.update(step + 1, metrics)
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < num_steps:
            _checkpoint(config, step + 1, modules, stepper, stage_state)
            # run.json follows the checkpoints
            distributed.on_main(lambda: rundir.mark(output, name, step=step + 1, finished=False))
    return logger


def _checkpoint(config, step: int, modules: dict, stepper, stage_state) -> Path:
    return runstate.save(Path(config.output_dir) / "checkpoints", step, modules, stepper.optimizer,
                         stepper.scheduler, settings=config.run_settings(),
                         stage_state=None if stage_state is None else stage_state(), keep_last=config.keep_last)


def save_final(config, name: str, save_fn, *, num_steps: int, modules: dict, stepper, stage_state=None,
               sharded=None):
    """save_fn() -> path of the final model; then the run is marked finished. Under torchrun rank 0
    writes it and every rank returns its path. `sharded`: the model save_fn writes, when it may be
    sharded (FSDP2): its whole state dict is gathered to rank 0 first, and save_fn(state) gets it.

    If it fails (a full disk), the trained state is written as a checkpoint of the final step
    where possible, and the error says where it is and how to finish: nothing trained is lost
    that can still be written.
    """
    output = Path(config.output_dir)
    try:
        state = None if sharded is None else sharding.full_state_dict(sharded)  # every rank: a collective
        path = distributed.on_main(save_fn if state is None else lambda: save_fn(state))
    except (OSError, RuntimeError) as error:
        try:
            kept = _checkpoint(config, num_steps, modules, stepper, stage_state)
        except Exception as second:  # noqa: BLE001 - the first error is the one to report
            raise CheckpointError(f"{name}: saving the final model failed ({error}), and so did saving the "
                                  f"training state ({second}): nothing could be written to {output}") from error
        raise CheckpointError(f"{name}: saving the final model failed ({error}); the trained state is in {kept}: "
                              "free space and rerun the same command with --resume true to write the model") from error
    distributed.on_main(lambda: rundir.mark(output, name, step=num_steps, finished=True))
    return path
