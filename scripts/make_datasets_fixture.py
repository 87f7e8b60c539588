#!/usr/bin/env python3
"""Writes tests/fixtures/datasets/: folders written by Hugging Face `datasets` itself, offline.

- saved/:      Dataset.save_to_disk (one shard)
- saved-dict/: DatasetDict.save_to_disk, train in 2 shards, validation in 1
- load-cache/: the folder load_dataset("json", ...) leaves in its cache (dataset_info.json,
               json-train-0000N-of-00002.arrow, json-test.arrow), copied out of the cache
- arrow/:      single .arrow files as pyarrow writes them: lz4-compressed file format (feather's
               default), zstd-compressed stream, a dictionary-encoded text column
- expected.json: for each folder and split, the `text` column as `datasets` reads it back
               (load_from_disk / load_dataset from that cache), row by row

Run with the reference venv (scripts/requirements.txt pins datasets 5.2.0):
    python scripts/make_datasets_fixture.py
"""
import glob
import json
import os
import shutil
import tempfile

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import datasets  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "datasets")

TEXTS = [
    "The mitochondrion is the powerhouse of the cell.",
    "Ünïcødé — “quotes”, naïve café, 東京, emoji 🧬.",
    None,
    "",
    "   ",
    "line one\nline two of the same record",
    "Catalysis of the reaction: ATP + H2O = ADP + phosphate.",
    "x" * 3000,
    "last record",
]


def main():
    datasets.disable_progress_bars()
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    expected = {}
    rows = {"text": TEXTS, "id": list(range(len(TEXTS)))}

    saved = datasets.Dataset.from_dict(rows)
    saved.save_to_disk(os.path.join(OUT, "saved"))
    expected["saved"] = datasets.load_from_disk(os.path.join(OUT, "saved"))["text"]

    held_out = datasets.Dataset.from_dict({"text": ["held out text", "another one"], "id": [0, 1]})
    pair = datasets.DatasetDict({"train": saved, "validation": held_out})
    pair.save_to_disk(os.path.join(OUT, "saved-dict"), num_shards={"train": 2, "validation": 1})
    back = datasets.load_from_disk(os.path.join(OUT, "saved-dict"))
    expected["saved-dict/train"] = back["train"]["text"]
    expected["saved-dict/validation"] = back["validation"]["text"]

    with tempfile.TemporaryDirectory() as work:
        files = []
        for half in (TEXTS[:5], TEXTS[5:]):
            path = os.path.join(work, f"part{len(files)}.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                for t in half:
                    f.write(json.dumps({"text": t, "id": 1}) + "\n")
            files.append(path)
        cache = os.path.join(work, "cache")
        data_files = {"train": files, "test": files[1]}
        loaded = datasets.load_dataset("json", data_files=data_files, cache_dir=cache, num_proc=2)
        (folder,) = {os.path.dirname(p) for p in glob.glob(f"{cache}/json/*/*/*/*.arrow")}
        shutil.copytree(folder, os.path.join(OUT, "load-cache"))
        expected["load-cache/train"] = loaded["train"]["text"]
        expected["load-cache/test"] = loaded["test"]["text"]
    import pyarrow as pa
    import pyarrow.ipc as ipc

    os.makedirs(os.path.join(OUT, "arrow"))
    table = pa.table({"text": pa.array(TEXTS, pa.string()), "id": list(range(len(TEXTS)))})
    variants = {
        "lz4-file.arrow": (ipc.new_file, table, "lz4"),
        "zstd-stream.arrow": (ipc.new_stream, table, "zstd"),
        "dictionary.arrow": (
            ipc.new_stream,
            table.set_column(0, "text", table.column("text").dictionary_encode()),
            None,
        ),
    }
    for name, (writer, data, codec) in variants.items():
        path = os.path.join(OUT, "arrow", name)
        with writer(path, data.schema, options=ipc.IpcWriteOptions(compression=codec)) as w:
            w.write_table(data, max_chunksize=4)
        expected[f"arrow/{name}"] = datasets.Dataset.from_file(path)["text"] if codec != "lz4" else (
            ipc.open_file(path).read_all().column("text").to_pylist()
        )
    expected = {k: list(v) for k, v in expected.items()}
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False, indent=1)
        f.write("\n")
    for root, _, names in sorted(os.walk(OUT)):
        for name in sorted(names):
            print(os.path.relpath(os.path.join(root, name), OUT))


if __name__ == "__main__":
    main()
