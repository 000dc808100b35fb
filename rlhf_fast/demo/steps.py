"""The demo's labellers' raw material: K samples per prompt from a saved model, and rankings of them
written as the rankings JSONL that `rlhf-fast rm` reads. Both demos use it."""
from pathlib import Path

from rlhf_fast.data import encode_prompt, write_jsonl
from rlhf_fast.models.loading import load_causal_lm, load_tokenizer
from rlhf_fast.rollout import sample


def decode_responses(tokenizer, rollout) -> list[str]:
    return tokenizer.batch_decode(rollout.responses(), skip_special_tokens=True)


def sample_candidates(model_dir: Path, prompts: list[str], k: int) -> list[tuple[str, list[str]]]:
    """K samples per prompt from a saved model: [(prompt, responses)]."""
    tokenizer = load_tokenizer(model_dir, padding_side="left")
    model = load_causal_lm(model_dir)
    candidates = []
    for first in range(0, len(prompts), 16):
        chunk = prompts[first:first + 16]
        rollout = sample(model, tokenizer, [encode_prompt(tokenizer, p) for p in chunk],
                         max_new_tokens=12, num_samples=k)
        responses = [r if r.startswith(" ") else " " + r for r in decode_responses(tokenizer, rollout)]
        candidates += [(p, responses[i * k:(i + 1) * k]) for i, p in enumerate(chunk)]
    return candidates


def write_rankings(path: Path, candidates, rank) -> Path:
    """The labellers' rankings (best first, ties collapsed) of each prompt's non-empty candidates."""
    records = []
    for prompt, responses in candidates:
        ranking = rank(prompt, [r for r in responses if r.strip()])
        if len(ranking) >= 2:
            records.append({"prompt": prompt, "responses": ranking})
    return write_jsonl(path, records)
