"""rlhf_fast.sources: parquet, arrow, json, csv files, saved datasets and hub names load to the same
records as the equivalent JSONL (read by the JSONL reader, an independent path); column renames,
splits, and errors that name the source and the row."""
import csv
import dataclasses
import json
import re

import pytest

from rlhf_fast import data, sources
from rlhf_fast.errors import ConfigError, DataError

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(autouse=True)
def dataset_cache(tmp_path, monkeypatch):
    """`datasets` writes its arrow cache under the test's tmp_path, not the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# --- writing the same records as each kind of source --------------------------------------------

def table(records: list[dict]):
    """A pyarrow table with every key of any record as a column; a record without a key has null."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records])


def write_source(kind: str, records: list[dict], directory) -> str:
    """`records` written as a `kind` source under `directory`; returns its path."""
    if kind == "jsonl":
        return data.write_jsonl(str(directory / "x.jsonl"), records)
    path = directory / {"saved": "saved", "saved_dict": "saved_dict"}.get(kind, f"x.{kind}")
    if kind == "parquet":
        pq.write_table(table(records), path)
    elif kind == "arrow":  # the arrow stream format that Dataset.save_to_disk writes
        with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table(records).schema) as writer:
            writer.write_table(table(records))
    elif kind == "json":  # one JSON array, keys left out where a record has none
        path.write_text(json.dumps(records))
    elif kind == "csv":
        keys = list(dict.fromkeys(k for r in records for k in r))
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, keys)
            writer.writeheader()
            writer.writerows(records)
    elif kind == "saved":
        datasets.Dataset(table(records)).save_to_disk(str(path))
    elif kind == "saved_dict":
        other = datasets.Dataset(table(records[:1]))
        datasets.DatasetDict({"train": datasets.Dataset(table(records)), "test": other}).save_to_disk(str(path))
    else:
        raise ValueError(kind)
    return str(path)


def row_location(kind: str, path: str, index: int) -> str:
    return f"{path}[train] row {index}" if kind == "saved_dict" else f"{path} row {index}"


def same_records_as_jsonl(loaded, from_jsonl, kind, path, jsonl_path):
    """Equal field by field; each record's source is its row where the JSONL one is its line."""
    assert len(loaded) == len(from_jsonl) > 0
    for got, want in zip(loaded, from_jsonl):
        line = int(want.source.rsplit(":", 1)[1])
        assert want.source == f"{jsonl_path}:{line}"
        assert got == dataclasses.replace(want, source=row_location(kind, path, line - 1))


SFT = [{"prompt": "say hi", "response": "hi", "id": 1}, {"prompt": "", "response": "x", "id": 2},
       {"prompt": "count", "response": "1 2 3", "id": 3}, {"prompt": "6 x 7?", "response": "42", "id": 4},
       {"prompt": "NA", "response": "None", "id": 5}]
CHATS = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
         {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "again"},
                       {"role": "assistant", "content": "hi"}, {"role": "user", "content": "more"},
                       {"role": "assistant", "content": "no"}]}]
PREFERENCES = [{"prompt": "p", "chosen": "good", "rejected": "bad"},
               {"prompt": "q", "chosen": "yes", "rejected": "no", "margin": 2.5},
               {"prompt": "r", "chosen": "a", "rejected": "b", "rating": "slightly better"},
               {"prompt": "s", "responses": ["best", "middle", "worst"]}]
PROMPTS = [{"prompt": "tell me a joke", "tags": ["safety", "fun"], "answer": "42"},
           {"prompt": "add 2 and 2", "answer": "4"}, {"prompt": "hi", "tags": ["greet"]}]

FORMATS = {  # name: (records, loader, kinds of source that can hold them)
    "sft": (SFT, data.load_sft, ("parquet", "arrow", "json", "csv", "saved", "saved_dict")),
    "messages": (CHATS, data.load_sft, ("parquet", "arrow", "json", "saved")),
    "preferences": (PREFERENCES, data.load_preferences, ("parquet", "arrow", "json", "saved")),
    "prompts": (PROMPTS, data.load_prompts, ("parquet", "arrow", "json", "saved")),
}
CASES = [(name, kind) for name, (_, _, kinds) in FORMATS.items() for kind in kinds]


@pytest.mark.parametrize("name, kind", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_each_source_loads_the_records_of_the_equivalent_jsonl(tmp_path, name, kind):
    records, loader, _ = FORMATS[name]
    if kind == "csv":  # every CSV cell is text, the ids too
        records = [{k: v for k, v in r.items() if k != "id"} for r in records]
    jsonl = write_source("jsonl", records, tmp_path)
    path = write_source(kind, records, tmp_path)
    same_records_as_jsonl(loader(path), loader(jsonl), kind, path, jsonl)


def test_prompt_fields_keep_the_other_columns_and_drop_null_cells(tmp_path):
    path = write_source("parquet", PROMPTS, tmp_path)
    assert [r.fields for r in data.load_prompts(path)] == [{"answer": "42"}, {"answer": "4"}, {}]
    assert [r.tags for r in data.load_prompts(path)] == [("safety", "fun"), (), ("greet",)]


# --- column names ------------------------------------------------------------------------------

RENAMED = {"prompt": "question", "chosen": "good", "rejected": "bad", "margin": "score"}


def renamed(records, mapping):
    """The records with each mapped field's key changed to its column's name."""
    return [{mapping.get(k, k): v for k, v in r.items()} for r in records]


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_columns_read_each_field_from_its_named_column(tmp_path, kind):
    pairs = PREFERENCES[:3]
    expected = data.load_preferences(write_source("jsonl", pairs, tmp_path))
    (tmp_path / "renamed").mkdir()
    path = write_source(kind, renamed(pairs, RENAMED), tmp_path / "renamed")
    loaded = data.load_preferences(data.Source(path, RENAMED, key="data"))
    assert [dataclasses.replace(p, source="") for p in loaded] == [dataclasses.replace(p, source="") for p in expected]


def test_a_source_column_named_like_a_mapped_field_is_not_read(tmp_path):
    """{prompt: question}: the field comes from 'question' even where a 'prompt' column exists too."""
    path = write_source("parquet", [{"prompt": "ignored", "question": "asked", "response": "r"}], tmp_path)
    [example] = data.load_sft(data.Source(path, {"prompt": "question"}))
    assert (example.prompt, example.response) == ("asked", "r")


def test_a_field_mapped_to_null_is_not_read(tmp_path):
    """A dataset with both a prompt and a messages column: {prompt: null} reads the conversations."""
    records = [{"prompt": "the user's first message", **CHATS[0]}]
    path = write_source("parquet", records, tmp_path)
    with pytest.raises(DataError, match="fields 'messages' and 'prompt' cannot both be given"):
        data.load_sft(path)
    [example] = data.load_sft(data.Source(path, {"prompt": None}))
    assert (example.prompt, example.response) == ("user: hi\nassistant: ", "hello")


def test_a_missing_column_is_one_line_listing_the_columns(tmp_path):
    path = write_source("parquet", SFT, tmp_path)
    with pytest.raises(DataError) as info:
        data.load_sft(data.Source(path, {"prompt": "question"}, key="data"))
    assert str(info.value) == f"{path}: no column 'question' (data_columns); its columns: ['prompt', 'response', 'id']"
    assert "\n" not in str(info.value)


def test_a_mapped_key_in_no_jsonl_line_lists_the_keys(tmp_path):
    """JSONL has no schema: a column of an optional field that no line holds is found at the end."""
    path = write_source("jsonl", PREFERENCES[:2], tmp_path)
    with pytest.raises(DataError, match=re.escape(f"{path}: no line has the key 'scroe' (data_columns); "
                                                  "its lines' keys: ['chosen', 'margin', 'prompt', 'rejected']")):
        data.load_preferences(data.Source(path, {"margin": "scroe"}, key="data"))


def test_a_mapping_of_a_field_the_format_does_not_read_is_a_config_error(tmp_path):
    path = write_source("parquet", SFT, tmp_path)
    with pytest.raises(ConfigError, match=re.escape("data_columns: unknown field 'promt'; the SFT format reads "
                                                    "['prompt', 'response', 'messages']")):
        data.load_sft(data.Source(path, {"promt": "question"}, key="data"))


# --- bad rows ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["parquet", "arrow", "json", "saved", "saved_dict"])
def test_a_bad_row_names_the_source_and_the_row_index(tmp_path, kind):
    records = [PREFERENCES[0], PREFERENCES[1], {"prompt": "p", "chosen": "same", "rejected": "same"}]
    path = write_source(kind, records, tmp_path)
    location = row_location(kind, path, 2)
    with pytest.raises(DataError, match="^" + re.escape(f"{location}: 'chosen' and 'rejected' are the same text")):
        data.load_preferences(path)


def test_a_null_cell_is_an_absent_field_and_its_row_is_named(tmp_path):
    path = write_source("parquet", [SFT[0], {"prompt": "no answer", "id": 9}], tmp_path)
    with pytest.raises(DataError, match="^" + re.escape(f"{path} row 1: missing field 'response'")):
        data.load_sft(path)


def test_an_error_about_a_renamed_field_says_which_column_it_read(tmp_path):
    path = write_source("parquet", [{"q": "p", "a": ""}], tmp_path)
    with pytest.raises(DataError) as info:
        data.load_sft(data.Source(path, {"prompt": "q", "response": "a"}, key="ptx_data"))
    assert str(info.value) == (f"{path} row 0: field 'response' is empty; expected non-blank text "
                               "(ptx_data_columns read prompt from 'q', response from 'a')")


def test_a_bad_number_in_a_parquet_row_is_named(tmp_path):
    path = write_source("parquet", [PREFERENCES[1], {**PREFERENCES[1], "margin": float("nan")}], tmp_path)
    with pytest.raises(DataError, match="^" + re.escape(f"{path} row 1: field 'margin' must be a finite number")):
        data.load_preferences(path)


def test_unreadable_and_missing_sources_are_named(tmp_path):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="^" + re.escape(f"{broken}: cannot be read as parquet (")):
        data.load_sft(broken)
    with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path}/none.parquet: no such file")):
        data.load_sft(tmp_path / "none.parquet")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="is a directory but not a saved dataset"):
        data.load_sft(tmp_path / "plain")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match=re.escape("empty.parquet: cannot be read as parquet (ArrowInvalid: ")):
        data.load_prompts(tmp_path / "empty.parquet")  # `datasets` 5.2 cannot read a parquet file of no rows


# --- splits and hub names ----------------------------------------------------------------------

def test_a_saved_dataset_dict_reads_train_or_the_split_asked(tmp_path):
    path = write_source("saved_dict", SFT, tmp_path)
    assert [e.prompt for e in data.load_sft(path)] == [r["prompt"] for r in SFT]
    [example] = data.load_sft(data.Source(path, split="test"))
    assert example.source == f"{path}[test] row 0"
    with pytest.raises(DataError, match=re.escape("no split 'dev'; its splits: ['train', 'test']")):
        data.load_sft(data.Source(path, split="dev"))


def test_a_dataset_dict_without_train_asks_for_a_split(tmp_path):
    path = tmp_path / "dict"
    one = datasets.Dataset(table(SFT))
    datasets.DatasetDict({"a": one, "b": one}).save_to_disk(str(path))
    with pytest.raises(DataError, match=re.escape("no split 'train'; its splits: ['a', 'b']; choose one with "
                                                  "prompts_split")):
        data.load_sft(data.Source(str(path), key="prompts"))


def test_a_split_on_a_file_is_a_config_error(tmp_path):
    path = write_source("parquet", SFT, tmp_path)
    with pytest.raises(ConfigError, match=re.escape("data_split: 'test' given, but")):
        data.load_sft(data.Source(path, split="test", key="data"))


class FakeHub:
    """datasets.load_dataset for names on the Hub (no machine here reaches it): records each call."""

    def __init__(self, records):
        self.calls, self.records, self.load_dataset = [], records, datasets.load_dataset

    def __call__(self, path, *args, **kwargs):
        if path in ("parquet", "arrow", "json", "csv"):
            return self.load_dataset(path, *args, **kwargs)
        self.calls.append((path, args, kwargs))
        return datasets.Dataset(table(self.records))


def test_an_owner_name_that_is_no_local_path_loads_from_the_hub(tmp_path, monkeypatch):
    hub = FakeHub(PROMPTS)
    monkeypatch.setattr(datasets, "load_dataset", hub)
    monkeypatch.chdir(tmp_path)
    records = data.load_prompts("someone/prompts")
    assert hub.calls == [("someone/prompts", (), {"split": "train"})]
    assert [r.source for r in records] == [f"hub:someone/prompts[train] row {i}" for i in range(3)]
    assert [r.prompt for r in records] == [r["prompt"] for r in PROMPTS]
    data.load_prompts(data.Source("openai/gsm8k:main", split="test"))
    assert hub.calls[-1] == ("openai/gsm8k", (), {"name": "main", "split": "test"})
    data.load_prompts("hub:imdb")
    assert hub.calls[-1] == ("imdb", (), {"split": "train"})
    with pytest.raises(DataError, match="no such file"):  # a file name, or an existing path, is never a hub name
        data.load_prompts("someone/prompts.jsonl")
    assert len(hub.calls) == 3
    hub.records = []
    with pytest.raises(DataError, match="^" + re.escape("hub:someone/empty[train]: no rows")):
        data.load_prompts("someone/empty")


def test_a_hub_name_that_cannot_load_says_so_in_one_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/prompts' on the Hub (OfflineModeIsEnabled)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as info:
        data.load_prompts("someone/prompts")
    assert str(info.value) == ("someone/prompts: no such file or directory; as a hub dataset, "
                               "hub:someone/prompts[train] cannot be loaded (ConnectionError: Couldn't reach "
                               "'someone/prompts' on the Hub (OfflineModeIsEnabled))")


def test_resolve_tells_the_kinds_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert [sources.resolve(p) for p in ("a.jsonl", "a.txt", "owner/name", "owner/name:config", "hub:x")] == \
        ["jsonl", "jsonl", "hub", "hub", "hub"]
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").write_text(json.dumps(SFT[0]) + "\n")
    assert sources.resolve("owner/name") == "jsonl"  # a local path wins over a hub name


# --- TRL's conversational preference pairs -------------------------------------------------------

def test_conversational_pairs_render_the_conversation_as_the_prompt(tmp_path, tokenizer):
    user = [{"role": "user", "content": "hi"}]
    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    explicit = {"prompt": user, "chosen": reply("hello"), "rejected": reply("go away"), "margin": 1.0}
    implicit = {"chosen": user + reply("hello"), "rejected": user + reply("go away"), "margin": 1.0}
    path = write_source("parquet", [explicit, explicit], tmp_path)  # parquet's lists of structs
    jsonl = write_source("jsonl", [implicit], tmp_path)
    rendered = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    expected = data.PreferencePair(rendered, "hello", "go away", 1.0, 1.0, "")
    for pair in data.load_preferences(path, tokenizer=tokenizer) + data.load_preferences(jsonl, tokenizer=tokenizer):
        assert dataclasses.replace(pair, source="") == expected
    assert data.load_preferences(jsonl)[0].prompt == "user: hi\nassistant: "  # no tokenizer: the plain join


def test_conversational_pairs_must_share_the_conversation(tmp_path):
    jsonl = write_source("jsonl", [{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                                    "rejected": [{"role": "user", "content": "b"},
                                                 {"role": "assistant", "content": "y"}]}], tmp_path)
    with pytest.raises(DataError, match=re.escape(f"{jsonl}:1: 'chosen' and 'rejected' must hold the same messages")):
        data.load_preferences(jsonl)


# --- configs and a stage -----------------------------------------------------------------------

def test_columns_and_split_come_from_yaml_and_the_command_line(tmp_path):
    from rlhf_fast.config import load_config, parse_overrides
    from rlhf_fast.stages.ppo import PPOConfig

    path = tmp_path / "ppo.yaml"
    path.write_text("reward_model: /rm\nprompts: someone/prompts\nprompts_columns: {prompt: question}\nprompts_split: test\n")
    config = load_config(PPOConfig, path, parse_overrides(["--ptx_data_columns", "{response: answer}"]))
    assert data.source_of(config, "prompts") == data.Source("someone/prompts", {"prompt": "question"}, "test", "prompts")
    assert data.source_of(config, "ptx_data").columns == {"response": "answer"}


def test_sft_runs_from_a_parquet_file_as_from_its_jsonl(tiny_model_dir, tmp_path):
    from rlhf_fast.stages import sft

    records = [{"prompt": f"fruit {i}:", "response": f" apple {i % 3}"} for i in range(8)]
    parquet = write_source("parquet", renamed(records, {"prompt": "question", "response": "answer"}), tmp_path)
    jsonl = write_source("jsonl", records, tmp_path)
    common = dict(model=str(tiny_model_dir), lora_r=0, learning_rate=1e-3, batch_size=4, micro_batch_size=4,
                  max_steps=2, max_length=32)
    losses = {}
    for name, keys in {"parquet": dict(data=parquet, data_columns={"prompt": "question", "response": "answer"}),
                       "jsonl": dict(data=jsonl)}.items():
        out = tmp_path / name
        model_dir = sft.run(sft.SFTConfig(output_dir=str(out), **common, **keys))
        assert (model_dir / "config.json").exists()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["sft/loss"] for r in rows if "sft/loss" in r]
    assert len(losses["parquet"]) == 2 and losses["parquet"] == losses["jsonl"]
