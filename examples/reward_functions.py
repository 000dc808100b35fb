"""Python functions the example configs name as 'module:function' (run the commands from the repo root,
so that `examples.reward_functions` imports).

Every function is called as TRL's GRPOTrainer calls reward functions: keyword lists `prompts` and
`completions`, plus every other field of the prompt lines as a list (here `answer`, from
examples/data/questions.jsonl), and returns one value per completion.
"""
import re

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def first_number(text: str) -> str | None:
    match = NUMBER.search(text)
    return match.group(0) if match else None


def exact_match(prompts, completions, answer, **fields):
    """Verifiable reward (grpo.yaml): 1.0 when the completion's first number is the line's `answer`, else 0.0."""
    return [1.0 if first_number(c) == a else 0.0 for c, a in zip(completions, answer)]


def correct_or_wrong(prompts, completions, answer, **fields):
    """HIR's scripted feedback (hir.yaml): the instruction each completion satisfies, the goal
    instruction when it is right and the failure instruction otherwise."""
    return ["Give a correct answer." if first_number(c) == a else "Give a wrong answer."
            for c, a in zip(completions, answer)]
