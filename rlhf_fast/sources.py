"""Where records come from: JSONL files, and every source the Hugging Face `datasets` library loads.

`read_rows(source, fields, what)` turns a source into (location, row) pairs, a row being a dict of
the format's field names; rlhf_fast.data parses and checks the rows, naming the location on error.

    source                                          read by                       location
    any other file (x.jsonl, x.txt, ...)            read_jsonl below              "x.jsonl:12" (line, 1-based)
    x.parquet / x.arrow / x.json / x.csv            load_dataset(<kind>, data_files=x)   "x.parquet row 11"
    a Dataset.save_to_disk directory                load_from_disk                "dir row 11"
    a DatasetDict.save_to_disk directory            load_from_disk, [split]       "dir[train] row 11"
    owner/name, owner/name:config or hub:<name>     load_dataset(name, split=)    "hub:owner/name[train] row 11"

Rows of a `datasets` source are numbered from 0, as `dataset[11]` reads them. A name is taken for the
Hub only when no such local path exists (or when it is written hub:<name>), it has the owner/name
shape, and it does not end in a data-file suffix. `datasets` is imported only for those sources.

Each config key X that names a source (data, prompts, ptx_data, ...) has two companions:
`X_columns`, a {field: column} mapping that reads a field of the format from a differently named
column ({prompt: question, chosen: good}; an unmapped field is read from its own name; a field
mapped to null is not read at all, for a source with a column the format should not see), and
`X_split`, the split of a hub dataset or of a saved DatasetDict (default: train, or a DatasetDict's
only split). A null cell counts as an absent field: parquet and arrow cannot leave a cell out.
"""
import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from rlhf_fast.config import option
from rlhf_fast.errors import ConfigError, DataError

# file suffix -> the `datasets` builder that reads it; any other file is read as JSONL
DATASET_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".csv": "csv"}
_HUB_NAME = re.compile(r"(?P<repo>(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*)(?::(?P<config>[\w.-]+))?")
_DATA_FILE_SUFFIXES = (".jsonl", ".txt", *DATASET_SUFFIXES)


@dataclass(frozen=True)
class Source:
    """A source of records and how to read it: `path` as in the table above, `columns` the
    {field: column} renames, `split` for hub datasets and saved DatasetDicts, `key` the config key
    it was given in (named by errors about columns and splits). str(source) is the path."""
    path: str
    columns: Mapping[str, str | None] = field(default_factory=dict)
    split: str = ""
    key: str = ""

    def __str__(self) -> str:
        return self.path

    def option(self, suffix: str) -> str:
        """The config key of a companion option: "data_columns", or plain "columns" without a key."""
        return f"{self.key}_{suffix}" if self.key else suffix


def source_of(config, key: str) -> Source:
    """config.<key> with its companions <key>_columns and <key>_split where the config declares them."""
    return Source(os.fspath(getattr(config, key)), getattr(config, f"{key}_columns", None) or {},
                  getattr(config, f"{key}_split", "") or "", key)


def columns_option(key: str, fields: tuple[str, ...]):
    """The `<key>_columns` config field of the source key `key`, whose format reads `fields`."""
    return option({}, f"{key}: {{field: column}} for a source whose columns have other names, e.g. "
                      f"{{{fields[0]}: question}} (null: ignore that field's column); fields: "
                      f"{', '.join(fields)} (docs/data.md)")


def split_option(key: str):
    """The `<key>_split` config field of the source key `key`."""
    return option("", f"{key}: the split of a hub dataset or saved DatasetDict (empty: train, or its only split)")


def as_source(source) -> Source:
    return source if isinstance(source, Source) else Source(os.fspath(source))


def columns_note(source) -> str:
    """" (data_columns read prompt from 'question')" for a source with renames, else ""; data.py adds
    it to the errors about a row, which name fields by the format's names."""
    source = as_source(source)
    if not source.columns:
        return ""
    renames = ", ".join(f"{f} from {c!r}" if c else f"no {f}" for f, c in source.columns.items())
    return f" ({source.option('columns')} read {renames})"


# ---------------------------------------------------------------------------------------------
# Rows

def read_rows(source, fields: tuple[str, ...], what: str) -> Iterator[tuple[str, dict]]:
    """(location, row) for every record of `source`, its columns renamed to the format's `fields`
    (`what` names the format in errors). A column mapping naming a field the format does not read
    is a ConfigError; one naming a column the source lacks is a DataError listing its columns."""
    source = as_source(source)
    _check_mapping(source, fields, what)
    kind = resolve(source)
    if kind == "jsonl":
        yield from _renamed_jsonl(source)
        return
    dataset, where = _load_dataset(source, kind)
    columns = list(dataset.column_names)
    missing = [c for c in source.columns.values() if c and c not in columns]
    if missing:
        raise DataError(f"{where}: no column {missing[0]!r} ({source.option('columns')}); "
                        f"its columns: {columns}")
    if len(dataset) == 0:
        raise DataError(f"{where}: no rows")
    for index, row in enumerate(dataset):
        yield f"{where} row {index}", _rename({k: v for k, v in row.items() if v is not None}, source.columns)


def _check_mapping(source: Source, fields: tuple[str, ...], what: str) -> None:
    name = source.option("columns")
    if not isinstance(source.columns, Mapping):
        raise ConfigError(f"{name}: expected a mapping of field: column, got {source.columns!r}")
    for f, column in source.columns.items():
        if f not in fields:
            raise ConfigError(f"{name}: unknown field {f!r}; the {what} format reads {list(fields)}")
        if column is not None and (not isinstance(column, str) or not column):
            raise ConfigError(f"{name}: the column for {f!r} must be a name, or null to read no {f!r}; "
                              f"got {column!r}")


def _rename(row: dict, columns: Mapping[str, str | None]) -> dict:
    """The row with each mapped field read from its column (a field mapped to None is left out); a
    source column that has a mapped field's own name is dropped (the mapping says where that field is)."""
    if not columns:
        return row
    renamed = {k: v for k, v in row.items() if k not in columns and k not in columns.values()}
    renamed.update({f: row[c] for f, c in columns.items() if c is not None and c in row})
    return renamed


def _renamed_jsonl(source: Source) -> Iterator[tuple[str, dict]]:
    """read_jsonl's lines, renamed; a mapped column that no line holds is an error listing the
    keys the lines hold (JSONL has no schema to check it against up front)."""
    seen = set()
    for location, record in read_jsonl(source.path):
        seen.update(record)
        yield location, _rename(record, source.columns)
    missing = [c for c in source.columns.values() if c and c not in seen]
    if missing:
        raise DataError(f"{source.path}: no line has the key {missing[0]!r} ({source.option('columns')}); "
                        f"its lines' keys: {sorted(seen)}")


# ---------------------------------------------------------------------------------------------
# Kinds of source

def resolve(source) -> str:
    """"jsonl", a `datasets` builder name ("parquet", "arrow", "json", "csv"), "saved" (a
    save_to_disk directory) or "hub"; a DataError for a path that is none of them."""
    source = as_source(source)
    path = Path(source.path)
    hub = _hub_name(source.path)
    if source.path.startswith("hub:") or (hub and not path.exists()):
        if not hub:
            raise DataError(f"{source.path}: expected hub:owner/name or hub:owner/name:config")
        return "hub"
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "saved"
        raise DataError(f"{source.path}: is a directory but not a saved dataset (no dataset_info.json or "
                        "dataset_dict.json); expected a JSONL, parquet, arrow, json or csv file, a "
                        "Dataset.save_to_disk directory, or a hub dataset name")
    kind = DATASET_SUFFIXES.get(path.suffix.lower())
    if kind and not path.exists():
        raise DataError(f"{source.path}: no such file")
    return kind or "jsonl"


def _hub_name(path: str) -> str | None:
    name = path[len("hub:"):] if path.startswith("hub:") else path
    if path.startswith("hub:"):
        return name if _HUB_NAME.fullmatch(name) else None
    match = _HUB_NAME.fullmatch(name)
    if not match or "/" not in match["repo"] or name.lower().endswith(_DATA_FILE_SUFFIXES):
        return None  # a bare name or a file name is a missing local file, not a hub dataset
    return name


def _load_dataset(source: Source, kind: str):
    """(a datasets.Dataset, the location prefix of its rows)."""
    import datasets

    if kind == "hub":
        name = _hub_name(source.path)
        match = _HUB_NAME.fullmatch(name)
        split = source.split or "train"
        where = f"hub:{name}[{split}]"
        config = {"name": match["config"]} if match["config"] else {}
        try:
            return datasets.load_dataset(match["repo"], **config, split=split), where
        except Exception as e:  # offline, unknown name, unknown split: the library's own words
            local = "" if source.path.startswith("hub:") else "no such file or directory; as a hub dataset, "
            raise DataError(f"{source.path}: {local}{where} cannot be loaded ({_first_line(e)})") from None
    try:
        if kind == "saved":
            loaded = datasets.load_from_disk(source.path)
        else:
            options = _csv_options(source.path, datasets) if kind == "csv" else {}
            loaded = datasets.load_dataset(kind, data_files=source.path, split="train", **options)
    except Exception as e:  # a corrupt or unparsable file: the library's own words
        raise DataError(f"{source.path}: cannot be read as {'a saved dataset' if kind == 'saved' else kind} "
                        f"({_first_line(e)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(source, loaded), f"{source.path}[{_split_name(source, loaded)}]"
    if source.split:
        what = "saved Dataset directory" if kind == "saved" else f"{kind} file"
        raise ConfigError(f"{source.option('split')}: {source.split!r} given, but {source.path} is a {what}, "
                          "which has no splits; splits apply to hub datasets and saved DatasetDicts")
    return loaded, source.path


def _csv_options(path: str, datasets) -> dict:
    """Every CSV cell as text, as written: "42" stays "42" (not 42.0), an empty cell is "" (not
    null), "NA" is "NA"; the column names come from the header row."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"features": features, "keep_default_na": False}


def _split_name(source: Source, splits) -> str:
    if source.split:
        return source.split
    return next(iter(splits)) if len(splits) == 1 else "train"


def _pick_split(source: Source, splits):
    name = _split_name(source, splits)
    if name not in splits:
        hint = "" if source.split else f"; choose one with {source.option('split')}"
        raise DataError(f"{source.path}: no split {name!r}; its splits: {list(splits)}{hint}")
    return splits[name]


def _first_line(error: Exception) -> str:
    """The library's own words: the first line of the error it was raised from, innermost first."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# JSONL

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
                raise DataError(f"{source}: expected a JSON object, got {json_type(record)}")
            found = True
            yield source, record
    if not found:
        raise DataError(f"{path}:1: empty file; expected one JSON object per line")


def json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
