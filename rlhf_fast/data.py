"""JSONL training records, their tokenisation, and batch padding.

Every loader reads one JSON object per line (blank lines are skipped) and either returns every
record or raises `DataError` on the first bad line, with a message that starts with "path:line: "
and says what was expected. Nothing is dropped silently. Keys a format does not use are ignored,
so a file may carry ids or metadata beside the fields below.

Formats (one line each):
    SFT          {"prompt": "...", "response": "..."}
                 {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    preferences  {"prompt": "...", "chosen": "...", "rejected": "..."}  + optional "margin" or "rating"
    rankings     {"prompt": "...", "responses": ["best", ..., "worst"]}
    prompts      {"prompt": "..."}  + optional "tags": ["safety", ...] or "safety"
"""
import json
import math
import os
from dataclasses import dataclass, field
from itertools import combinations
from types import MappingProxyType
from typing import Iterator, Mapping

import torch

from rlhf_fast.errors import DataError


# Llama 2 (Touvron et al. 2023), Table 28: the margin m(r) added to the binary ranking loss,
# -log(sigmoid(r_chosen - r_rejected - m(r))), for each preference rating; two variants.
LLAMA2_MARGINS_SMALL = MappingProxyType({
    "significantly better": 1.0, "better": 2 / 3, "slightly better": 1 / 3, "negligibly better": 0.0})
LLAMA2_MARGINS_LARGE = MappingProxyType({
    "significantly better": 3.0, "better": 2.0, "slightly better": 1.0, "negligibly better": 0.0})
# The paper's label is "negligibly better / unsure"; accept it spelt out as well as its short form.
_RATING_ALIASES = {"negligibly better / unsure": "negligibly better",
                   "negligibly better/unsure": "negligibly better"}


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str
    source: str  # "path:line"


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    margin: float  # the reward gap the loss asks for (Llama 2); 0 for plain pairs and rankings
    weight: float  # 1 for pairs; 1/C(k,2) for pairs expanded from a ranking of k responses
    source: str


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    tags: tuple[str, ...]
    source: str
    fields: dict = field(default_factory=dict)  # the line's other keys (e.g. a reference answer for a reward function)


# ---------------------------------------------------------------------------------------------
# Reading and field checks

def write_jsonl(path, records):
    """One JSON object per line: the format every loader here reads."""
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def read_jsonl(path) -> Iterator[tuple[str, dict]]:
    """Yield ("path:line", object) for every non-blank line; DataError on a line that is not an object."""
    path = os.fspath(path)
    found = False
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory; expected a JSONL file") from None
    with f:
        for number, raw in enumerate(f, start=1):
            source = f"{path}:{number}"
            if number == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
                raise DataError(f"{source}: the file is UTF-16 (it starts with a UTF-16 byte-order mark); "
                                "save it as UTF-8")
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{source}: not valid UTF-8 ({e})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{source}: malformed JSON ({e.msg} at column {e.colno}); "
                                "expected one JSON object per line") from None
            if not isinstance(record, dict):
                raise DataError(f"{source}: expected a JSON object, got {_json_type(record)}")
            found = True
            yield source, record
    if not found:
        raise DataError(f"{path}:1: empty file; expected one JSON object per line")


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _text(record: dict, key: str, source: str, *, allow_empty: bool = False) -> str:
    """record[key] as a string; an error if missing, not a string, or (unless allowed) blank."""
    if key not in record:
        raise DataError(f"{source}: missing field {key!r}; found fields {sorted(record)}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{source}: field {key!r} must be a string, got {_json_type(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"{source}: field {key!r} is empty; expected non-blank text")
    return value


def _reject_both(record: dict, keys: tuple[str, str], source: str) -> None:
    if all(k in record for k in keys):
        raise DataError(f"{source}: fields {keys[0]!r} and {keys[1]!r} cannot both be given")


# ---------------------------------------------------------------------------------------------
# SFT

def load_sft(path, tokenizer=None) -> list[SFTExample]:
    """Supervised fine-tuning examples from `{"prompt", "response"}` or `{"messages"}` lines.

    For `messages` the last message must be the assistant's: it is the response, and the earlier
    messages (earlier assistant turns included) become the prompt through the tokenizer's chat
    template with add_generation_prompt=True. Without a tokenizer, or one without a chat template,
    the prompt is the plain join "role: content\\n" per message followed by "assistant: ".
    """
    examples = []
    for source, record in read_jsonl(path):
        _reject_both(record, ("messages", "prompt"), source)
        if "messages" in record:
            messages = _messages(record, source)
            prompt = render_chat_prompt(messages[:-1], tokenizer)
            response = messages[-1]["content"]
        else:
            prompt = _text(record, "prompt", source, allow_empty=True)
            response = _text(record, "response", source)
        examples.append(SFTExample(prompt, response, source))
    return examples


def _messages(record: dict, source: str) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{source}: field 'messages' must be an array of at least 2 messages "
                        "(the conversation, then the assistant's reply)")
    for i, message in enumerate(messages):
        where = f"{source}: messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where} must be an object with 'role' and 'content', got {_json_type(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"{where}: missing field {key!r}; expected {{'role': ..., 'content': ...}}")
            if not isinstance(message[key], str):
                raise DataError(f"{where}: field {key!r} must be a string, got {_json_type(message[key])}")
    last = messages[-1]
    if last["role"] != "assistant":
        raise DataError(f"{source}: the last message must be the assistant's reply, got role {last['role']!r}")
    if not last["content"].strip():
        raise DataError(f"{source}: the last (assistant) message is empty; expected the response text")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render_chat_prompt(messages: list[dict], tokenizer=None) -> str:
    """The text that precedes the assistant's reply to `messages`.

    The tokenizer's chat template (add_generation_prompt=True) when it has one; otherwise a plain
    "role: content" line per message and a closing "assistant: ", so that files with `messages`
    still load for base models without a template.
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


# ---------------------------------------------------------------------------------------------
# Preferences and rankings

def load_preferences(path, margins: Mapping[str, float] = LLAMA2_MARGINS_SMALL) -> list[PreferencePair]:
    """Preference pairs from pairwise and ranking lines (both may appear in one file).

    Pairwise `{"prompt", "chosen", "rejected"}` gives one pair of weight 1, with margin 0, the
    number in "margin", or `margins[rating]` for a Llama 2 "rating" label. A ranking
    `{"prompt", "responses": [best, ..., worst]}` of k responses gives all C(k,2) (better, worse)
    pairs, each of weight 1/C(k,2), so each ranked prompt counts once in a weighted mean
    (InstructGPT, Ouyang et al. 2022), with margin 0.
    """
    pairs = []
    for source, record in read_jsonl(path):
        _reject_both(record, ("responses", "chosen"), source)
        prompt = _text(record, "prompt", source, allow_empty=True)
        if "responses" in record:
            pairs.extend(_ranking_pairs(prompt, record, source))
            continue
        chosen = _text(record, "chosen", source)
        rejected = _text(record, "rejected", source)
        if chosen == rejected:
            raise DataError(f"{source}: 'chosen' and 'rejected' are the same text; expected two different responses")
        pairs.append(PreferencePair(prompt, chosen, rejected, _margin(record, margins, source), 1.0, source))
    return pairs


def _margin(record: dict, margins: Mapping[str, float], source: str) -> float:
    _reject_both(record, ("margin", "rating"), source)
    if "margin" in record:
        value = record["margin"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise DataError(f"{source}: field 'margin' must be a finite number >= 0, got {value!r}")
        return float(value)
    if "rating" in record:
        label = record["rating"]
        key = " ".join(label.lower().split()) if isinstance(label, str) else None
        key = _RATING_ALIASES.get(key, key)
        if key not in margins:
            raise DataError(f"{source}: unknown rating {label!r}; expected one of {sorted(margins)}")
        return float(margins[key])
    return 0.0


def _ranking_pairs(prompt: str, record: dict, source: str) -> list[PreferencePair]:
    for key in ("margin", "rating"):
        if key in record:
            raise DataError(f"{source}: field {key!r} applies to pairwise records, not to a 'responses' ranking")
    responses = record["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(f"{source}: field 'responses' must be an array of at least 2 responses, best first")
    for i, response in enumerate(responses):
        if not isinstance(response, str) or not response.strip():
            raise DataError(f"{source}: responses[{i}] must be non-blank text, got {response!r}")
    if len(set(responses)) < len(responses):
        raise DataError(f"{source}: field 'responses' holds duplicate responses; expected distinct ranked responses")
    weight = 1.0 / math.comb(len(responses), 2)
    return [PreferencePair(prompt, responses[i], responses[j], 0.0, weight, source)
            for i, j in combinations(range(len(responses)), 2)]


# ---------------------------------------------------------------------------------------------
# Prompts

def load_prompts(path) -> list[PromptRecord]:
    """Prompts for generation (PPO, rejection sampling); "tags" is a string or a list of strings; the
    line's other keys are kept in `fields` (reward functions receive them)."""
    records = []
    for source, record in read_jsonl(path):
        prompt = _text(record, "prompt", source)
        tags = record.get("tags", [])
        if isinstance(tags, str):
            tags = [tags]
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise DataError(f"{source}: field 'tags' must be a string or an array of strings, got {tags!r}")
        others = {k: v for k, v in record.items() if k not in ("prompt", "tags")}
        records.append(PromptRecord(prompt, tuple(tags), source, others))
    return records


# ---------------------------------------------------------------------------------------------
# Tokenisation and batching

@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    response_start: int  # index of the first response token in input_ids (= prompt length)
    truncated: bool  # the response (and its eos) was cut to fit max_length


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt token ids as encode_pair makes them: with the tokenizer's special tokens (e.g. bos)
    unless the text already begins with the bos token, as chat templates often write it.

    Generation (PPO, rejection sampling) should encode prompts with this too, so the policy sees
    the same prompt tokens at rollout as the reward model and SFT saw in training.
    """
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and prompt.startswith(bos))
    return tokenizer(prompt, add_special_tokens=add_special)["input_ids"]


def encode_pair(tokenizer, prompt: str, response: str, max_length: int, *, add_eos: bool = True,
                source: str = "<input>") -> Encoded:
    """Prompt tokens, then response tokens (+ eos), cut from the right of the response to max_length.

    Prompt and response are tokenised separately, so the response starts on a token boundary and
    `response_start` is exact; the prompt is encoded by `encode_prompt`. A truncated response
    loses its eos: the model is not taught to stop where the text was cut. A prompt that leaves no
    room for one response token raises DataError naming `source`.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("add_eos=True but the tokenizer has no eos_token")
        response_ids = response_ids + [tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    if room < 1:
        raise DataError(f"{source}: the prompt is {len(prompt_ids)} tokens, leaving no room for a response "
                        f"within max_length={max_length}; shorten the prompt or raise max_length")
    return Encoded(prompt_ids + response_ids[:room], len(prompt_ids), len(response_ids) > room)


@dataclass
class TruncationReport:
    """Counts truncated responses so a stage can say how many it cut: `print(report)`."""
    max_length: int
    total: int = 0
    truncated: int = 0

    def add(self, encoded: Encoded) -> Encoded:
        self.total += 1
        self.truncated += encoded.truncated
        return encoded

    def __str__(self) -> str:
        return f"{self.truncated} of {self.total} responses truncated to max_length={self.max_length}"


def pad_batch(sequences: list[list[int]], pad_id: int, *, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to the longest: (input_ids, attention_mask), both int64 [B, T].

    side="right" for training (positions line up from the start); side="left" for generation
    (every prompt ends at the last column, where new tokens are appended).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not sequences:
        raise ValueError("pad_batch needs at least one sequence")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        if n == 0:
            continue
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        input_ids[row, cols] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, cols] = 1
    return input_ids, attention_mask
