"""Loads a task's data from the JSON-lines file beside these YAMLs: no download, no dataset cache."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_jsonl(data_file: str, **metadata) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (HERE / data_file).read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({'test': datasets.Dataset.from_list(rows)})
