"""What the sampling alternatives (hir, cai) share beside candidates.py: drawing text samples from
a loaded model through the rollout engine, and the Python functions that stand in for a person or
a model (HIR's feedback, CAI's critic, reviser and judge), called by name ('module:function') with
keyword arguments and checked: one value per input, of the right kind, or a one-line error naming
the function and the first prompt.
"""
import math
import string

import torch

from rlhf_fast import data, distributed
from rlhf_fast.config import ConfigError
from rlhf_fast.errors import UserError
from rlhf_fast.rewards import load_reward_function
from rlhf_fast.rollout import SamplingConfig, sample_with


class FeedbackFunctionError(UserError, ValueError):
    """A feedback, critic, reviser or judge function that raised or returned the wrong values."""


def load_function(name: str, role: str):
    """The callable named 'module:function'; ConfigError naming the role otherwise (rewards' loader)."""
    return load_reward_function(name, role)


def call_function(role: str, name: str, function, prompts: list[str], kind: str, **inputs) -> list:
    """function(prompts=prompts, **inputs) -> one value per prompt: a non-blank string (kind "text")
    or a finite number (kind "number"). Anything else is a FeedbackFunctionError naming the function
    and the first prompt it concerns."""
    first = f"(first prompt {prompts[0]!r})" if prompts else ""
    try:
        values = list(function(prompts=prompts, **inputs))
    except Exception as e:  # noqa: BLE001 - reported with the function's name and the batch
        raise FeedbackFunctionError(f"{role} {name} raised {type(e).__name__}: {e} {first}") from e
    if len(values) != len(prompts):
        raise FeedbackFunctionError(f"{role} {name} returned {len(values)} values for {len(prompts)} inputs {first}")
    for prompt, value in zip(prompts, values):
        if kind == "text" and (not isinstance(value, str) or not value.strip()):
            raise FeedbackFunctionError(f"{role} {name} returned {value!r} for prompt {prompt!r}; expected "
                                        "non-blank text")
        if kind == "number" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                 or not math.isfinite(value)):
            raise FeedbackFunctionError(f"{role} {name} returned {value!r} for prompt {prompt!r}; expected a "
                                        "finite number")
    return values


def check_template(template: str, key: str, needed: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """A str.format template holding every placeholder of `needed` (and maybe some of `optional`),
    no other; ConfigError naming `key` otherwise."""
    try:
        found = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ConfigError(f"{key}: not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
    missing = [n for n in needed if n not in found]
    unknown = sorted(found - set(needed) - set(optional))
    if missing or unknown:
        raise ConfigError(f"{key}: {template!r} must contain {', '.join('{' + n + '}' for n in needed)}"
                          + (f"; missing {', '.join('{' + n + '}' for n in missing)}" if missing else "")
                          + (f"; unknown {', '.join('{' + n + '}' for n in unknown)}" if unknown else ""))


@torch.no_grad()
def sample_texts(model, tokenizer, prompts: list[str], sampling: SamplingConfig, *, num_samples: int,
                 prompts_per_batch: int) -> list[list[str]]:
    """`num_samples` decoded responses per prompt text from a loaded model, through the rollout
    engine (prompts encoded by data.encode_prompt, as every stage encodes them). Under torchrun
    each rank samples its share of the prompts and every rank returns them all, in order."""
    prompts = prompts[distributed.share(len(prompts))]
    texts = []
    for first in range(0, len(prompts), prompts_per_batch):
        chunk = prompts[first:first + prompts_per_batch]
        rollout = sample_with(model, tokenizer, [data.encode_prompt(tokenizer, p) for p in chunk], sampling,
                              num_samples=num_samples)
        decoded = tokenizer.batch_decode(rollout.responses(), skip_special_tokens=True)
        texts += [decoded[i * num_samples:(i + 1) * num_samples] for i in range(len(chunk))]
    return [text for part in distributed.gather_objects(texts) for text in part]


def write_jsonl_atomic(path, records) -> None:
    """data.write_jsonl to a temporary name, then renamed: a killed write never leaves a file that
    a resumed run would take as complete. Under torchrun rank 0 writes (every rank holds the records)."""
    def write():
        tmp = path.with_name(f".{path.name}.tmp")
        data.write_jsonl(tmp, records)
        tmp.replace(path)
    distributed.on_main(write)
