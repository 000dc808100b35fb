"""The demo's synthetic world: prompts that ask for words of a topic, a noisy demonstrator, and a
hidden "human" oracle whose preferences have reasons a reward model can learn.

The oracle likes distinct on-topic words, dislikes off-topic words and repeats, and dislikes
lists longer than six words. Demonstrations rarely exceed six words, so a reward model trained on
rankings of SFT samples sees little of that last rule: a policy that over-optimises the reward
model by growing its lists would show as a gap between the reward model's score and the oracle's.
The oracle labels rankings and evaluates; PPO never sees it (only the reward model learnt from its
rankings), while GRPO may take it as a verifiable reward function (`oracle_reward`).
"""
import random

TOPICS = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"],
    "animal": ["cat", "dog", "horse", "mouse", "tiger", "zebra", "otter", "camel"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
    "tool": ["hammer", "saw", "drill", "wrench", "chisel", "file", "spade", "rake"],
}
TEMPLATES = ["list {topic} words:", "name some {topic}:", "{topic} please:", "give me {topic}:"]
TRAIN_IDS, HELD_OUT_IDS = range(0, 80), range(80, 100)
MAX_GOOD_LENGTH = 6
ALL_WORDS = [w for words in TOPICS.values() for w in words]


def make_prompt(rng: random.Random, held_out: bool = False) -> tuple[str, str]:
    """(prompt text, topic): a request number, a template and a topic. Held-out prompts carry
    numbers that no stage trains on, so every held-out prompt text is new to every model."""
    number = rng.choice(HELD_OUT_IDS if held_out else TRAIN_IDS)
    topic = rng.choice(list(TOPICS))
    return f"#{number} " + rng.choice(TEMPLATES).format(topic=topic), topic


def topic_of(prompt: str) -> str:
    for topic in TOPICS:
        if topic in prompt:
            return topic
    raise ValueError(f"demo prompt {prompt!r} names no topic")


def demonstrate(topic: str, rng: random.Random, on_topic: float = 0.6) -> str:
    """A noisy human demonstration: 3-6 words, each on-topic with probability `on_topic`."""
    words = [rng.choice(TOPICS[topic]) if rng.random() < on_topic else rng.choice(ALL_WORDS)
             for _ in range(rng.randint(3, MAX_GOOD_LENGTH))]
    return " " + " ".join(words)


def oracle_score(prompt: str, response: str) -> float:
    """The hidden labeller's utility of a response."""
    topic_words = set(TOPICS[topic_of(prompt)])
    words = response.split()
    distinct_on = len({w for w in words if w in topic_words})
    off_topic = sum(w not in topic_words for w in words)
    repeats = len(words) - len(set(words))
    too_long = max(0, len(words) - MAX_GOOD_LENGTH)
    return distinct_on - off_topic - 0.5 * repeats - 0.5 * too_long


def oracle_reward(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """The oracle as a verifiable reward function (`rlhf_fast.demo.task:oracle_reward`), with TRL
    GRPOTrainer's interface: what GRPO optimises directly in the demo, where PPO only sees a reward
    model trained on the oracle's rankings."""
    return [oracle_score(p, c) for p, c in zip(prompts, completions)]


def rank(prompt: str, responses: list[str]) -> list[str]:
    """Best-first ranking by the oracle; responses with a tied score keep only the first of them,
    since a labeller's ranking must be strict."""
    by_score = {}
    for response in responses:
        by_score.setdefault(oracle_score(prompt, response), response)
    return [by_score[s] for s in sorted(by_score, reverse=True)]


def corpus() -> list[str]:
    """Text the demo tokenizer is trained on: every prompt and word, so each is a token or two."""
    lines = [f"#{n} " + t.format(topic=topic) for n in range(100) for t in TEMPLATES for topic in TOPICS]
    lines += [" " + " ".join(words) for words in TOPICS.values()] * 20
    return lines
