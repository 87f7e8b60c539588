#!/usr/bin/env python3
"""The transformers/datasets side of the prepare benchmark: what run_mlm.py does to a corpus.

load_dataset("text") -> map(tokenize, batched) with the fast tokenizer -> map(group_texts)
into blocks of --max-seq-length, exactly as transformers' examples/pytorch/language-modeling/
run_mlm.py (non line-by-line). Prints one line: `HF_PREPARE seconds=... mb=... rss_mb=...`.

    python scripts/bench_prepare_hf.py --tokenizer DIR --max-seq-length 512 FILE...
"""

import argparse
import os
import resource
import tempfile
import time
from itertools import chain


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()

    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with tempfile.TemporaryDirectory() as cache:
        raw = datasets.load_dataset("text", data_files={"train": args.files}, cache_dir=cache)

        def tokenize_function(examples):
            return tokenizer(examples["text"], return_special_tokens_mask=True)

        tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"])
        block_size = args.max_seq_length

        def group_texts(examples):
            concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
            total_length = len(concatenated[list(examples.keys())[0]])
            total_length = (total_length // block_size) * block_size
            return {
                k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
                for k, t in concatenated.items()
            }

        grouped = tokenized.map(group_texts, batched=True)
        blocks = len(grouped["train"])
    seconds = time.perf_counter() - start
    mb = sum(os.path.getsize(f) for f in args.files) / 1e6
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"HF_PREPARE seconds={seconds:.2f} mb={mb:.1f} rss_mb={rss_mb:.0f} blocks={blocks}")


if __name__ == "__main__":
    main()
