"""The steps both demos take: a tiny base model built from scratch, SFT on a demonstrator's
responses, and K samples per prompt from a saved model ranked by a labeller into the rankings
JSONL that `rlhf-fast rm` reads."""
import random
from pathlib import Path

from rlhf_fast.data import encode_prompt, write_jsonl
from rlhf_fast.demo import task
from rlhf_fast.models.loading import load_causal_lm, load_tokenizer
from rlhf_fast.rollout import sample
from rlhf_fast.stages import sft
from rlhf_fast.tiny import build_tiny_model_dir


def begin_demo(output: Path, corpus: list[str], seed: int) -> tuple[random.Random, Path, dict]:
    """(the demo's data generator, its base model, the keys every stage shares): the base is a
    2-layer, 64-wide Llama-shaped model and its tokenizer built from `corpus`, saved as an HF directory."""
    output.mkdir(parents=True, exist_ok=True)
    base = build_tiny_model_dir(output / "base", corpus, vocab_size=600, hidden_size=64, num_layers=2,
                                num_heads=4, num_kv_heads=2, intermediate_size=128, seed=seed)
    return random.Random(seed), base, {"seed": seed, "device": "auto", "log_every": 10}


# the PPO-family keys that make the demo print the same figures whether or not the optional native
# CPU ops are built (their GAE rounds differently from the torch path's in the last bits)
PINNED = {"advantage_backend": "torch"}


def sft_on_demonstrations(output: Path, base: Path, demonstrate, n: int, rng: random.Random, common: dict) -> Path:
    """SFT (full fine-tuning) on n demonstrations `demonstrate(topic, rng)` of fresh prompts."""
    records = []
    for _ in range(n):
        prompt, topic = task.make_prompt(rng)
        records.append({"prompt": prompt, "response": demonstrate(topic, rng)})
    data = write_jsonl(output / "sft.jsonl", records)
    return sft.run(sft.SFTConfig(model=str(base), data=str(data), output_dir=str(output / "sft"), lora_r=0,
                                 learning_rate=2e-3, warmup_steps=10, batch_size=32, micro_batch_size=32,
                                 max_length=48, epochs=3, **common))


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
