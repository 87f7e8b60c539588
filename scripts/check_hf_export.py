#!/usr/bin/env python3
"""Checks a `masklm export` folder in transformers: AutoModelForMaskedLM and
pipeline("fill-mask") load it, and their predictions equal `masklm fill-mask --json` on the same
sentences: the same top-k token ids, scores within 1e-4.

    python scripts/check_hf_export.py --masklm target/release/masklm --export DIR \\
        --checkpoint runs/NAME/checkpoints/step-N [--top-k 5] [SENTENCE ...]

Prints one line per sentence and `EXPORT_CHECK passed=N failed=M`; exits 1 on any failure.
"""

import argparse
import json
import subprocess
import sys

DEFAULT_SENTENCES = [
    "The patient was <mask> with pneumonia.",
    "Catalysis of the reaction: ATP + H2O = ADP + <mask>.",
    "Any process that activates or increases the <mask> of cell division.",
    "The <mask> of a protein into the nucleus.",
    "Two masks: <mask> and <mask>.",
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--masklm", required=True, help="the masklm binary")
    parser.add_argument("--export", required=True, help="folder written by masklm export")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint that was exported")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("sentences", nargs="*")
    args = parser.parse_args()
    sentences = args.sentences or DEFAULT_SENTENCES

    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    model = AutoModelForMaskedLM.from_pretrained(args.export)
    tokenizer = AutoTokenizer.from_pretrained(args.export)
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, top_k=args.top_k)

    ours = subprocess.run(
        [args.masklm, "fill-mask", "--model", args.checkpoint, "--json", "--top-k", str(args.top_k), *sentences],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip().splitlines()
    passed = failed = 0
    for sentence, line in zip(sentences, ours):
        theirs = fill(sentence)
        mine = json.loads(line)
        # One mask: a flat list; several: a list per mask. Normalise to lists of lists.
        if theirs and isinstance(theirs[0], dict):
            theirs, mine = [theirs], [mine]
        ok = len(theirs) == len(mine)
        worst = 0.0
        for t_list, m_list in zip(theirs, mine):
            ok &= [t["token"] for t in t_list] == [m["token"] for m in m_list]
            for t, m in zip(t_list, m_list):
                worst = max(worst, abs(t["score"] - m["score"]))
                ok &= t["token_str"] == m["token_str"] and t["sequence"] == m["sequence"]
        ok &= worst <= 1e-4
        passed += ok
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} max score diff {worst:.2e}  {sentence}")
        if not ok:
            print(f"  transformers: {json.dumps(theirs)[:600]}")
            print(f"  masklm:       {json.dumps(mine)[:600]}")
    if len(ours) != len(sentences):
        print(f"FAIL masklm printed {len(ours)} results for {len(sentences)} sentences")
        failed += 1
    print(f"EXPORT_CHECK passed={passed} failed={failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
