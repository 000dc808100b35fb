"""Training records, their tokenisation, and batch padding.

Every loader reads a source (rlhf_fast.sources: a JSONL file, one JSON object per line, blank
lines skipped; or a parquet / arrow / json / csv file, a saved dataset directory or a hub dataset,
through the `datasets` library) and either returns every record or raises `DataError` on the first
bad one, with a message that starts with its location ("path:line: " for JSONL, "path row N: " for
a `datasets` source) and says what was expected. Nothing is dropped silently. Keys a format does
not use are ignored, so a source may carry ids or metadata beside the fields below; a
`Source.columns` mapping reads a field from a differently named column (docs/data.md).

Formats (one record each):
    SFT          {"prompt": "...", "response": "..."}
                 {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    preferences  {"prompt": "...", "chosen": "...", "rejected": "..."}  + optional "margin" or "rating"
                 {"chosen": [messages], "rejected": [messages]}  + optional "prompt": [messages] (TRL's
                 conversational pairs: both end in the assistant's reply, after the same conversation)
    rankings     {"prompt": "...", "responses": ["best", ..., "worst"]}
    prompts      {"prompt": "..."}  + optional "tags": ["safety", ...] or "safety"
"""
import json
import math
from dataclasses import dataclass, field
from itertools import combinations
from types import MappingProxyType
from typing import Callable, Mapping

import torch

from rlhf_fast import sources
from rlhf_fast.errors import DataError
# the stages' imports: the source of a config key, its companion options, JSONL lines
from rlhf_fast.sources import Source, columns_option, json_type, read_jsonl, source_of, split_option  # noqa: F401


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
    source: str  # where it came from: "path:line" (JSONL) or "path row N" (rlhf_fast.sources)


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


def read_rows(source, fields: tuple[str, ...], what: str):
    """(location, row) for each record of `source` (a path or a Source), its columns renamed to the
    format's `fields`: rlhf_fast.sources.read_rows, for stages that read a format of their own."""
    return sources.read_rows(source, fields, what)


def _parse_rows(source, fields: tuple[str, ...], what: str, parse: Callable[[dict, str], list]) -> list:
    """parse(row, location) -> [items] over every row of `source`, concatenated. An error about a
    row of a source whose columns were renamed says which columns were read for which fields."""
    items = []
    for location, record in sources.read_rows(source, fields, what):
        try:
            items.extend(parse(record, location))
        except DataError as e:
            note = sources.columns_note(source)
            if not note:
                raise
            raise DataError(f"{e}{note}") from None
    return items


def _text(record: dict, key: str, source: str, *, allow_empty: bool = False) -> str:
    """record[key] as a string; an error if missing, not a string, or (unless allowed) blank."""
    if key not in record:
        raise DataError(f"{source}: missing field {key!r}; found fields {sorted(record)}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{source}: field {key!r} must be a string, got {json_type(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"{source}: field {key!r} is empty; expected non-blank text")
    return value


def _reject_both(record: dict, keys: tuple[str, str], source: str) -> None:
    if all(k in record for k in keys):
        raise DataError(f"{source}: fields {keys[0]!r} and {keys[1]!r} cannot both be given")


# ---------------------------------------------------------------------------------------------
# SFT

SFT_FIELDS = ("prompt", "response", "messages")


def load_sft(source, tokenizer=None) -> list[SFTExample]:
    """Supervised fine-tuning examples from `{"prompt", "response"}` or `{"messages"}` records of
    `source` (a path or a Source).

    For `messages` the last message must be the assistant's: it is the response, and the earlier
    messages (earlier assistant turns included) become the prompt through the tokenizer's chat
    template with add_generation_prompt=True. Without a tokenizer, or one without a chat template,
    the prompt is the plain join "role: content\\n" per message followed by "assistant: ".
    """
    return _parse_rows(source, SFT_FIELDS, "SFT", lambda record, location: [_sft_example(record, location, tokenizer)])


def _sft_example(record: dict, source: str, tokenizer) -> SFTExample:
    _reject_both(record, ("messages", "prompt"), source)
    if "messages" in record:
        messages = _messages(record["messages"], "messages", source, at_least=2,
                             what="the conversation, then the assistant's reply")
        prompt = render_chat_prompt(messages[:-1], tokenizer)
        response = messages[-1]["content"]
    else:
        prompt = _text(record, "prompt", source, allow_empty=True)
        response = _text(record, "response", source)
    return SFTExample(prompt, response, source)


def _messages(messages, key: str, source: str, *, at_least: int, what: str, reply: bool = True) -> list[dict]:
    """record[key], a list of {"role", "content"} messages (other keys dropped); with `reply`, the
    last must be the assistant's non-blank reply."""
    if not isinstance(messages, list) or len(messages) < at_least:
        plural = "s" if at_least > 1 else ""
        raise DataError(f"{source}: field {key!r} must be an array of at least {at_least} message{plural} ({what})")
    for i, message in enumerate(messages):
        where = f"{source}: {key}[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where} must be an object with 'role' and 'content', got {json_type(message)}")
        for field_ in ("role", "content"):
            if field_ not in message:
                raise DataError(f"{where}: missing field {field_!r}; expected {{'role': ..., 'content': ...}}")
            if not isinstance(message[field_], str):
                raise DataError(f"{where}: field {field_!r} must be a string, got {json_type(message[field_])}")
    if reply:
        of = "" if key == "messages" else f" of {key!r}"
        last = messages[-1]
        if last["role"] != "assistant":
            raise DataError(f"{source}: the last message{of} must be the assistant's reply, got role {last['role']!r}")
        if not last["content"].strip():
            raise DataError(f"{source}: the last (assistant) message{of} is empty; expected the response text")
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

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected", "margin", "rating", "responses", "ai_preference")


def load_preferences(source, margins: Mapping[str, float] = LLAMA2_MARGINS_SMALL, *,
                     tokenizer=None) -> list[PreferencePair]:
    """Preference pairs from pairwise and ranking records of `source` (both may appear in one file).

    Pairwise `{"prompt", "chosen", "rejected"}` gives one pair of weight 1, with margin 0, the
    number in "margin", or `margins[rating]` for a Llama 2 "rating" label. A ranking
    `{"prompt", "responses": [best, ..., worst]}` of k responses gives all C(k,2) (better, worse)
    pairs, each of weight 1/C(k,2), so each ranked prompt counts once in a weighted mean
    (InstructGPT, Ouyang et al. 2022), with margin 0. TRL's conversational pairs (chosen and
    rejected as message lists) are rendered as SFT's `messages` are, with `tokenizer`.
    """
    return _parse_rows(source, PREFERENCE_FIELDS, "preference",
                       lambda record, location: _preference_pairs(record, location, margins, tokenizer))


def _preference_pairs(record: dict, source: str, margins: Mapping[str, float], tokenizer) -> list[PreferencePair]:
    _reject_both(record, ("responses", "chosen"), source)
    if isinstance(record.get("chosen"), list) or isinstance(record.get("rejected"), list):
        prompt, chosen, rejected = _conversational_pair(record, source, tokenizer)
    else:
        prompt = _text(record, "prompt", source, allow_empty=True)
        if "responses" in record:
            return _ranking_pairs(prompt, record, source)
        chosen = _text(record, "chosen", source)
        rejected = _text(record, "rejected", source)
    if chosen == rejected:
        raise DataError(f"{source}: 'chosen' and 'rejected' are the same text; expected two different responses")
    return [PreferencePair(prompt, chosen, rejected, _margin(record, margins, source), 1.0, source)]


def _conversational_pair(record: dict, source: str, tokenizer) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of TRL's conversational format: "chosen" and "rejected" are message
    lists ending in the assistant's reply after the same earlier messages, and "prompt", when given,
    the messages before those (TRL's explicit prompt; without it the prompt is implicit)."""
    what = "ending in the assistant's reply"
    chosen = _messages(record.get("chosen"), "chosen", source, at_least=1, what=what)
    rejected = _messages(record.get("rejected"), "rejected", source, at_least=1, what=what)
    if chosen[:-1] != rejected[:-1]:
        raise DataError(f"{source}: 'chosen' and 'rejected' must hold the same messages before their last "
                        "(assistant) message")
    context = chosen[:-1]
    if "prompt" in record:
        context = _messages(record["prompt"], "prompt", source, at_least=1, reply=False,
                            what="the conversation before the replies") + context
    if not context:
        raise DataError(f"{source}: no conversation before the replies; give 'prompt' as messages, or 'chosen' "
                        "and 'rejected' as whole conversations")
    return render_chat_prompt(context, tokenizer), chosen[-1]["content"], rejected[-1]["content"]


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

PROMPT_FIELDS = ("prompt", "tags")


def load_prompts(source) -> list[PromptRecord]:
    """Prompts for generation (PPO, rejection sampling); "tags" is a string or a list of strings; the
    record's other keys are kept in `fields` (reward functions receive them)."""
    return _parse_rows(source, PROMPT_FIELDS, "prompt", lambda record, location: [_prompt_record(record, location)])


def _prompt_record(record: dict, source: str) -> PromptRecord:
    prompt = _text(record, "prompt", source)
    tags = record.get("tags", [])
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise DataError(f"{source}: field 'tags' must be a string or an array of strings, got {tags!r}")
    others = {k: v for k, v in record.items() if k not in ("prompt", "tags")}
    return PromptRecord(prompt, tuple(tags), source, others)


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
