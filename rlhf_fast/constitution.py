"""A constitution (Bai et al. 2022): the principles Constitutional AI critiques, revises and judges by.

File format (YAML):
    critique_template: "..."   # optional; placeholders {prompt} {response} {critique_request}
    revision_template: "..."   # optional; placeholders {prompt} {response} {critique} {revision_request}
                               #   (and optionally {critique_request})
    principles:                # at least one
      - name: harmful          # optional (default principle-<i>), unique
        critique_request: "Identify specific ways in which the assistant's last response is harmful ..."
        revision_request: "Please rewrite the assistant response to remove any harmful content ..."
        preference: "Which of these responses is less harmful? ..."   # optional: RL-CAI's judge criterion
The templates are what a model critic and reviser read; Python critics and revisers get the
requests themselves. Every mistake (no principles, a blank request, a template without its
placeholders, an unknown key) is one ConfigError naming the file and the entry.
"""
import random
from dataclasses import dataclass
from pathlib import Path

from rlhf_fast.config import read_yaml
from rlhf_fast.errors import ConfigError
from rlhf_fast.feedback import check_template

DEFAULT_CRITIQUE_TEMPLATE = ("Human: {prompt}\n\nAssistant: {response}\n\nCritique request: {critique_request}\n\n"
                             "Critique:")
DEFAULT_REVISION_TEMPLATE = ("Human: {prompt}\n\nAssistant: {response}\n\nCritique request: {critique_request}\n\n"
                             "Critique: {critique}\n\nRevision request: {revision_request}\n\nRevision:")
CRITIQUE_FIELDS = ("prompt", "response", "critique_request")
REVISION_FIELDS = ("prompt", "response", "critique", "revision_request")
PRINCIPLE_KEYS = ("name", "critique_request", "revision_request", "preference")


@dataclass(frozen=True)
class Principle:
    name: str
    critique_request: str
    revision_request: str
    preference: str = ""  # RL-CAI: the question a judge answers when comparing two responses


@dataclass(frozen=True)
class Constitution:
    principles: tuple[Principle, ...]
    critique_template: str = DEFAULT_CRITIQUE_TEMPLATE
    revision_template: str = DEFAULT_REVISION_TEMPLATE
    source: str = "<constitution>"

    def draw(self, rng: random.Random) -> Principle:
        """One principle, uniformly (Bai et al. draw one per critique-revision step)."""
        return self.principles[rng.randrange(len(self.principles))]

    def critique_prompt(self, prompt: str, response: str, principle: Principle) -> str:
        return self.critique_template.format(prompt=prompt, response=response,
                                             critique_request=principle.critique_request)

    def revision_prompt(self, prompt: str, response: str, critique: str, principle: Principle) -> str:
        return self.revision_template.format(prompt=prompt, response=response, critique=critique,
                                             critique_request=principle.critique_request,
                                             revision_request=principle.revision_request)

    def judged(self) -> tuple[Principle, ...]:
        """The principles with a `preference` question (RL-CAI's criteria); ConfigError if none."""
        found = tuple(p for p in self.principles if p.preference)
        if not found:
            raise ConfigError(f"{self.source}: no principle has a 'preference' question; RL-CAI's judge needs "
                              "at least one")
        return found


def parse_constitution(mapping: dict, source: str = "<constitution>") -> Constitution:
    """A Constitution from a mapping (read from YAML), checked."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: expected a mapping with 'principles'")
    unknown = sorted(set(mapping) - {"principles", "critique_template", "revision_template"})
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; expected principles, critique_template, "
                          "revision_template")
    raw = mapping.get("principles")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: the constitution has no principles; give a list 'principles' of "
                          "{critique_request, revision_request} entries")
    principles, names = [], set()
    for i, entry in enumerate(raw):
        where = f"{source}: principles[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with critique_request and revision_request")
        extra = sorted(set(entry) - set(PRINCIPLE_KEYS))
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {extra}; expected {list(PRINCIPLE_KEYS)}")
        for key in PRINCIPLE_KEYS:
            value = entry.get(key, "")
            if not isinstance(value, str):
                raise ConfigError(f"{where}: {key} must be text, got {value!r}")
        for key in ("critique_request", "revision_request"):
            if not entry.get(key, "").strip():
                raise ConfigError(f"{where}: {key} is missing or blank")
        name = entry.get("name") or f"principle-{i + 1}"
        if name in names:
            raise ConfigError(f"{where}: the name {name!r} is used twice")
        names.add(name)
        principles.append(Principle(name, entry["critique_request"], entry["revision_request"],
                                    entry.get("preference", "")))
    critique = mapping.get("critique_template", DEFAULT_CRITIQUE_TEMPLATE)
    revision = mapping.get("revision_template", DEFAULT_REVISION_TEMPLATE)
    for key, template in (("critique_template", critique), ("revision_template", revision)):
        if not isinstance(template, str):
            raise ConfigError(f"{source}: {key} must be text, got {template!r}")
    check_template(critique, f"{source}: critique_template", CRITIQUE_FIELDS)
    check_template(revision, f"{source}: revision_template", REVISION_FIELDS, optional=("critique_request",))
    return Constitution(tuple(principles), critique, revision, source)


def load_constitution(path) -> Constitution:
    """The constitution in a YAML file (format in this module's docstring)."""
    if not Path(path).is_file():
        raise ConfigError(f"constitution {path}: no such file")
    return parse_constitution(read_yaml(path), str(path))
