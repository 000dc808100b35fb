"""rlhf_fast.data: each JSONL format round-trips, each bad line names its file:line, tokenisation and padding."""
import json
import math
import re
from itertools import combinations

import pytest
import torch

from rlhf_fast import data
from rlhf_fast.data import DataError


def write_jsonl(path, records) -> str:
    """One line per record: a dict is dumped as JSON, a str is written verbatim (for bad lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


GOOD_SFT = {"prompt": "say hi", "response": "hi"}
GOOD_PAIR = {"prompt": "p", "chosen": "good", "rejected": "bad"}
GOOD_PROMPT = {"prompt": "tell me a joke"}


# --- formats round-trip ------------------------------------------------------------------------

def test_sft_prompt_response_round_trips_with_blank_lines_skipped(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [GOOD_SFT, "", "   ", {"prompt": "", "response": "x", "id": 7}])
    assert data.load_sft(path) == [
        data.SFTExample("say hi", "hi", f"{path}:1"),
        data.SFTExample("", "x", f"{path}:4"),
    ]


def test_sft_messages_use_the_chat_template(tmp_path, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again?"},
                {"role": "assistant", "content": "hello again"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    [example] = data.load_sft(path, tokenizer)
    expected = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert example.prompt == expected
    assert example.prompt.endswith("<|assistant|> ")  # the tiny template's generation prompt
    assert example.response == "hello again"


def test_sft_messages_without_a_template_use_the_plain_join(tmp_path, tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    plain = "user: hi\nassistant: "
    assert data.load_sft(path)[0].prompt == plain
    no_template = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    no_template.chat_template = None
    assert data.load_sft(path, no_template)[0].prompt == plain


def test_pairs_with_margins_and_ratings(tmp_path):
    path = write_jsonl(tmp_path / "pref.jsonl", [
        GOOD_PAIR,
        {**GOOD_PAIR, "margin": 2.5},
        {**GOOD_PAIR, "rating": "significantly better"},
        {**GOOD_PAIR, "rating": "Negligibly better / unsure"},
    ])
    pairs = data.load_preferences(path)
    assert [(p.prompt, p.chosen, p.rejected, p.weight) for p in pairs] == [("p", "good", "bad", 1.0)] * 4
    assert [p.margin for p in pairs] == [0.0, 2.5, 1.0, 0.0]
    assert [p.source for p in pairs] == [f"{path}:{i}" for i in range(1, 5)]


@pytest.mark.parametrize("margins, expected", [
    (data.LLAMA2_MARGINS_SMALL, [1.0, 2 / 3, 1 / 3, 0.0]),  # Llama 2, Table 28
    (data.LLAMA2_MARGINS_LARGE, [3.0, 2.0, 1.0, 0.0]),
])
def test_rating_labels_map_to_both_margin_sets(tmp_path, margins, expected):
    labels = ["significantly better", "better", "slightly better", "negligibly better"]
    path = write_jsonl(tmp_path / "pref.jsonl", [{**GOOD_PAIR, "rating": r} for r in labels])
    assert [p.margin for p in data.load_preferences(path, margins)] == pytest.approx(expected, abs=0)


def test_ranking_of_four_expands_to_six_weighted_pairs_better_first(tmp_path):
    ranked = ["best", "second", "third", "worst"]
    path = write_jsonl(tmp_path / "rank.jsonl", [{"prompt": "q", "responses": ranked}, GOOD_PAIR])
    pairs = data.load_preferences(path)
    ranking, plain = pairs[:6], pairs[6:]
    assert [(p.chosen, p.rejected) for p in ranking] == [(ranked[i], ranked[j]) for i, j in combinations(range(4), 2)]
    assert math.isclose(sum(p.weight for p in ranking), 1.0)
    assert all(p.weight == 1 / 6 and p.margin == 0.0 and p.source == f"{path}:1" for p in ranking)
    assert [p.weight for p in plain] == [1.0]


def test_prompts_with_tags(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [GOOD_PROMPT, {"prompt": "how to pick a lock", "tags": "safety"},
                                                    {"prompt": "x", "tags": ["safety", "red-team"]}])
    assert data.load_prompts(path) == [
        data.PromptRecord("tell me a joke", (), f"{path}:1"),
        data.PromptRecord("how to pick a lock", ("safety",), f"{path}:2"),
        data.PromptRecord("x", ("safety", "red-team"), f"{path}:3"),
    ]


# --- every bad line is an error naming file:line -----------------------------------------------

BAD_CASES = [
    # (loader, good record, bad line, words the message must contain)
    ("sft", GOOD_SFT, '{"prompt": "a", "response": ', "malformed JSON"),
    ("sft", GOOD_SFT, '["prompt", "response"]', "expected a JSON object"),
    ("sft", GOOD_SFT, {"prompt": "a"}, "missing field 'response'"),
    ("sft", GOOD_SFT, {"prompt": 3, "response": "b"}, "'prompt' must be a string"),
    ("sft", GOOD_SFT, {"prompt": "a", "response": "  "}, "'response' is empty"),
    ("sft", GOOD_SFT, {"messages": [{"role": "user", "content": "hi"}]}, "at least 2 messages"),
    ("sft", GOOD_SFT, {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]},
     "must be the assistant's"),
    ("sft", GOOD_SFT, {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
     "missing field 'content'"),
    ("sft", GOOD_SFT, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     "is empty"),
    ("sft", GOOD_SFT, {"prompt": "a", "response": "b", "messages": []}, "cannot both be given"),
    ("preferences", GOOD_PAIR, {"prompt": "p", "chosen": "good"}, "missing field 'rejected'"),
    ("preferences", GOOD_PAIR, {"prompt": "p", "chosen": "", "rejected": "bad"}, "'chosen' is empty"),
    ("preferences", GOOD_PAIR, {**GOOD_PAIR, "rejected": "good"}, "same text"),
    ("preferences", GOOD_PAIR, {**GOOD_PAIR, "rating": "much better"}, "unknown rating 'much better'"),
    ("preferences", GOOD_PAIR, {**GOOD_PAIR, "margin": "1"}, "'margin' must be a finite number"),
    ("preferences", GOOD_PAIR, {**GOOD_PAIR, "margin": -1}, "'margin' must be a finite number >= 0"),
    ("preferences", GOOD_PAIR, {**GOOD_PAIR, "margin": 1, "rating": "better"}, "cannot both be given"),
    ("preferences", GOOD_PAIR, {"prompt": "p", "responses": ["only one"]}, "at least 2 responses"),
    ("preferences", GOOD_PAIR, {"prompt": "p", "responses": ["a", "b", "a"]}, "duplicate responses"),
    ("preferences", GOOD_PAIR, {"prompt": "p", "responses": ["a", 2]}, "responses[1]"),
    ("preferences", GOOD_PAIR, {"prompt": "p", "responses": ["a", "b"], "margin": 1}, "pairwise records"),
    ("prompts", GOOD_PROMPT, {"tags": ["x"]}, "missing field 'prompt'"),
    ("prompts", GOOD_PROMPT, {"prompt": "x", "tags": [1]}, "'tags' must be a string or an array of strings"),
]


@pytest.mark.parametrize("loader, good, bad, words", BAD_CASES, ids=[c[3] for c in BAD_CASES])
def test_a_bad_line_in_the_middle_is_an_error_naming_its_line(tmp_path, loader, good, bad, words):
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", good, bad, good])
    with pytest.raises(DataError) as info:
        getattr(data, f"load_{loader}")(path)
    message = str(info.value)
    assert message.startswith(f"{path}:4: "), message
    assert words in message


def test_malformed_json_carries_the_parsers_message(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_SFT, "{'prompt': 'single quotes'}"])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: malformed JSON (Expecting property name")):
        data.load_sft(path)


def test_unknown_rating_lists_the_known_labels(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{**GOOD_PAIR, "rating": "meh"}])
    with pytest.raises(DataError) as info:
        data.load_preferences(path)
    for label in data.LLAMA2_MARGINS_SMALL:
        assert repr(label) in str(info.value)


@pytest.mark.parametrize("loader", ["sft", "preferences", "prompts"])
@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_file_is_an_error(tmp_path, loader, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(f"{path}:1: empty file")):
        getattr(data, f"load_{loader}")(path)


# --- tokenisation and padding ------------------------------------------------------------------

def test_encode_pair_without_truncation(tokenizer):
    prompt_ids = tokenizer("write a short reply", add_special_tokens=True)["input_ids"]
    response_ids = tokenizer("that is helpful", add_special_tokens=False)["input_ids"]
    encoded = data.encode_pair(tokenizer, "write a short reply", "that is helpful", 256)
    assert encoded.input_ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert encoded.response_start == len(prompt_ids)
    assert not encoded.truncated
    no_eos = data.encode_pair(tokenizer, "write a short reply", "that is helpful", 256, add_eos=False)
    assert no_eos.input_ids == prompt_ids + response_ids


def test_encode_pair_truncates_the_response_from_the_right_and_counts_it(tokenizer):
    prompt_ids = tokenizer("write a short reply", add_special_tokens=True)["input_ids"]
    response_ids = tokenizer("the quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]
    max_length = len(prompt_ids) + 3
    report = data.TruncationReport(max_length)
    cut = report.add(data.encode_pair(tokenizer, "write a short reply",
                                      "the quick brown fox jumps over the lazy dog", max_length))
    report.add(data.encode_pair(tokenizer, "hi", "a", max_length))
    assert cut.input_ids == prompt_ids + response_ids[:3]  # no eos: the text did not end there
    assert cut.response_start == len(prompt_ids) and cut.truncated
    # exactly full (response + eos fills max_length) is not a truncation
    exact = data.encode_pair(tokenizer, "write a short reply", "x", len(prompt_ids) + 2)
    assert not exact.truncated and len(exact.input_ids) == len(prompt_ids) + 2
    assert str(report) == f"1 of 2 responses truncated to max_length={max_length}"


def test_encode_pair_with_no_room_for_the_response_names_the_source(tokenizer):
    prompt_len = len(tokenizer("write a short reply")["input_ids"])
    with pytest.raises(DataError, match=r"^data\.jsonl:12: the prompt is \d+ tokens.*max_length="):
        data.encode_pair(tokenizer, "write a short reply", "ok", prompt_len, source="data.jsonl:12")


def test_encode_pair_does_not_double_a_bos_written_by_the_template(tokenizer):
    bos = tokenizer.bos_token
    encoded = data.encode_pair(tokenizer, bos + "hi", "ok", 64)
    assert encoded.input_ids.count(tokenizer.bos_token_id) == 1


def test_encode_prompt_adds_bos_once_for_a_tokenizer_that_adds_it(tokenizer):
    from tokenizers.processors import TemplateProcessing

    with_bos = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    with_bos._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    plain = tokenizer("hi", add_special_tokens=False)["input_ids"]
    assert data.encode_prompt(with_bos, "hi") == [tokenizer.bos_token_id] + plain
    assert data.encode_prompt(with_bos, "<s>hi") == [tokenizer.bos_token_id] + plain
    assert data.encode_pair(with_bos, "hi", "ok", 64).input_ids[:len(plain) + 1] == [tokenizer.bos_token_id] + plain


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_batch(side):
    sequences = [[5, 6, 7], [8], [], [1, 2, 3, 4]]
    input_ids, mask = data.pad_batch(sequences, pad_id=0, side=side)
    assert input_ids.dtype == mask.dtype == torch.long and input_ids.shape == mask.shape == (4, 4)
    if side == "right":
        expected = [[5, 6, 7, 0], [8, 0, 0, 0], [0, 0, 0, 0], [1, 2, 3, 4]]
        expected_mask = [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
    else:
        expected = [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 0], [1, 2, 3, 4]]
        expected_mask = [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]]
    assert input_ids.tolist() == expected and mask.tolist() == expected_mask


def test_pad_batch_rejects_an_unknown_side():
    with pytest.raises(ValueError, match="side"):
        data.pad_batch([[1]], 0, side="middle")
