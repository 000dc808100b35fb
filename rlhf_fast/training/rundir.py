"""A run's output directory: refused when it already holds a run (unless resume or overwrite),
cleared on overwrite, tidied of killed saves, and marked finished only once the final model is written.

<output_dir>/run.json records the stage, whether the run finished, and its last step. A finished
run is never resumed; a directory with someone else's files in it is never cleared.
"""
import json
import shutil
from pathlib import Path

from rlhf_fast import checkpoint, distributed
from rlhf_fast.errors import CheckpointError

RUN_FILE = "run.json"
# what marks a directory as holding a run of ours
RUN_MARKERS = (RUN_FILE, "metrics.jsonl", "checkpoints")


def _describe(output: Path) -> str:
    try:
        run = json.loads((output / RUN_FILE).read_text())
        return f"a {run.get('stage')} run, {'finished' if run.get('finished') else 'unfinished'} at step {run.get('step')}"
    except (OSError, ValueError):
        return "an earlier run"


def prepare(config, stage: str) -> Path:
    """Make config.output_dir ready for `stage` before anything loads; returns it.

    A directory holding a run is an error unless config.resume (then a finished run is an error:
    there is nothing to resume) or config.overwrite (then it is removed first). Under torchrun,
    rank 0 does this after the config is checked against the world, and every rank gets its verdict.
    """
    if hasattr(config, "check_world"):
        config.check_world(distributed.current())
    return distributed.on_main(lambda: _prepare(config, stage))


def _prepare(config, stage: str) -> Path:
    output = Path(config.output_dir)
    holds_run = any((output / marker).exists() for marker in RUN_MARKERS)
    claim(output, config, holds_run, lambda: _describe(output))
    if holds_run and config.resume and _read(output).get("finished"):
        raise CheckpointError(f"{output} holds {_describe(output)}: there is nothing to resume (use --overwrite "
                              "true to train again, or another output_dir)")
    output.mkdir(parents=True, exist_ok=True)
    for directory in (output, output / "checkpoints"):
        for stale in checkpoint.remove_stale_temporaries(directory):
            print(f"{stage}: removed {stale}, left by a save that was killed")
    mark(output, stage, step=0, finished=False, keep_step=True)
    return output


def claim(output: Path, config, holds_run: bool, what) -> None:
    """Refuse an output directory that holds a run (what() says which) unless config.resume; with
    config.overwrite, clear it first. Then make it exist."""
    if config.overwrite and config.resume:
        raise CheckpointError("resume and overwrite cannot both be true")
    if holds_run and config.overwrite:
        shutil.rmtree(output)
    elif holds_run and not config.resume:
        raise CheckpointError(f"{output} already holds {what()}; pass --resume true to continue it or "
                              "--overwrite true to replace it")
    output.mkdir(parents=True, exist_ok=True)


def _read(output: Path) -> dict:
    try:
        return json.loads((output / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}


def mark(output: Path, stage: str, *, step: int, finished: bool, keep_step: bool = False) -> None:
    """Record the run's state in <output>/run.json (written whole, then renamed)."""
    run = {"stage": stage, "finished": finished,
           "step": _read(output).get("step", step) if keep_step else step}
    tmp = output / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(run) + "\n")
    tmp.replace(output / RUN_FILE)
