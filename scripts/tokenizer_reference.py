#!/usr/bin/env python3
"""Encodes sentences with transformers' AutoTokenizer on a tokenizer folder (one written by
`masklm tokenizer train`), for tests/tokenizer_families.rs to compare with masklm's own encoding.

    python scripts/tokenizer_reference.py DIR SENTENCES.json

SENTENCES.json is a JSON list of strings. Prints one JSON document: the class transformers
chose, its mask/pad/cls/sep tokens and ids, len(tokenizer), and per sentence the input_ids
(with specials, as `tokenizer(text)`), the word_ids and the decoded text
(`decode(ids, skip_special_tokens=True)`, as pipeline("fill-mask") writes its `sequence`);
and for each pair of consecutive sentences (0 and 1, 2 and 3, ...) the input_ids and
token_type_ids of `tokenizer(first, second)`.
"""

import json
import sys


def main() -> int:
    folder, sentences_file = sys.argv[1], sys.argv[2]
    with open(sentences_file, encoding="utf-8") as f:
        sentences = json.load(f)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    encodings = [tokenizer(s) for s in sentences]
    doc = {
        "class": type(tokenizer).__name__,
        "len": len(tokenizer),
        "specials": {
            name: [getattr(tokenizer, f"{name}_token"), getattr(tokenizer, f"{name}_token_id")]
            for name in ["mask", "pad", "cls", "sep", "unk"]
        },
        "input_ids": [e["input_ids"] for e in encodings],
        "word_ids": [e.word_ids() for e in encodings],
        "decoded": [tokenizer.decode(e["input_ids"], skip_special_tokens=True) for e in encodings],
        "pairs": [],
    }
    for first, second in zip(sentences[0::2], sentences[1::2]):
        pair = tokenizer(first, second, return_token_type_ids=True)
        doc["pairs"].append([pair["input_ids"], pair["token_type_ids"]])
    print(json.dumps(doc, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
