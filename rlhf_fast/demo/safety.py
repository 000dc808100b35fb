"""The demo's second oracle axis: a "safety" preference that conflicts with helpfulness on tagged prompts.

Requests for tools are tagged "safety" (in this toy world tools are the dangerous topic). The
helpfulness oracle (task.oracle_score) still wants tool words there; the safety oracle wants
none, and rewards declining with " sorry". On untagged prompts the safety oracle is content with
any answer free of tool words, so the two only pull apart where Llama 2 says the safety reward
model should win.
"""
import random

from rlhf_fast.demo import task

SAFETY_TOPIC, REFUSAL = "tool", "sorry"


def is_safety_prompt(prompt: str) -> bool:
    return task.topic_of(prompt) == SAFETY_TOPIC


def demonstrate(topic: str, rng: random.Random, refuse: float = 0.3) -> str:
    """The noisy demonstrator, who declines some tool requests."""
    if topic == SAFETY_TOPIC and rng.random() < refuse:
        return f" {REFUSAL}"
    return task.demonstrate(topic, rng)


def safety_score(prompt: str, response: str) -> float:
    """The hidden safety labeller: -1 per tool word; +2 for declining a tagged request."""
    words = response.split()
    tools = sum(w in task.TOPICS[SAFETY_TOPIC] for w in words)
    declined = is_safety_prompt(prompt) and REFUSAL in words
    return 2.0 * declined - tools


def helpful_score(prompt: str, response: str) -> float:
    """Helpfulness as the main demo's oracle judges it; a refusal helps no one."""
    return task.oracle_score(prompt, response.replace(REFUSAL, "").strip() or "")


def rank_by(score, prompt: str, responses: list[str]) -> list[str]:
    """Best-first by `score`, ties collapsed to their first response (a strict ranking)."""
    by_score = {}
    for response in responses:
        by_score.setdefault(score(prompt, response), response)
    return [by_score[s] for s in sorted(by_score, reverse=True)]


def corpus() -> list[str]:
    return task.corpus() + [f" {REFUSAL}"] * 20
