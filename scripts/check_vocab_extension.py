#!/usr/bin/env python3
"""Checks a `masklm vocab extend` folder in transformers, against the model it extended:

- AutoTokenizer tokenizes every added word (after a space, and inside a sentence) as the one
  token vocab_extension.json names, and every other text as the original tokenizer did
  whenever it holds no added word;
- AutoModelForMaskedLM loads it; the old embedding rows and LM-head bias entries are
  bit-identical to the original's, and each new row is the mean of the original rows of its
  pieces (float32, 1e-6).

    python scripts/check_vocab_extension.py ORIGINAL_DIR EXTENDED_DIR

Prints one line per check and `VOCAB_CHECK passed=N failed=M`; exits 1 on any failure.
"""

import json
import pathlib
import sys

import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer


def main() -> int:
    original, extended = sys.argv[1], sys.argv[2]
    report = json.loads((pathlib.Path(extended) / "vocab_extension.json").read_text())
    old_tok, new_tok = AutoTokenizer.from_pretrained(original), AutoTokenizer.from_pretrained(extended)
    old_model = AutoModelForMaskedLM.from_pretrained(original).eval()
    new_model = AutoModelForMaskedLM.from_pretrained(extended).eval()
    passed = failed = 0

    def check(ok: bool, what: str) -> None:
        nonlocal passed, failed
        passed += ok
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {what}")

    words = [t for t in report["added"] if t["word"]]
    check(len(words) > 0, f"{len(words)} words added")
    for t in words:
        ids = new_tok(" " + t["word"], add_special_tokens=False)["input_ids"]
        check(ids == [t["id"]], f"{t['word']!r} -> {ids} (expected [{t['id']}])")
        sentence = f"The {t['word']} of the cell."
        ids = new_tok(sentence)["input_ids"]
        check(t["id"] in ids, f"{sentence!r} -> {ids}")
    # Every special token keeps its id (ModernBERT's specials sit after the BPE vocabulary).
    for name in ["mask_token", "pad_token", "cls_token", "sep_token", "bos_token", "eos_token", "unk_token"]:
        token = getattr(old_tok, name, None)
        if token is not None:
            old_id, new_id = old_tok.convert_tokens_to_ids(token), new_tok.convert_tokens_to_ids(token)
            check(old_id == new_id, f"{name} {token!r} keeps id {old_id} (now {new_id})")
    masked = f"The {old_tok.mask_token} of the cell."
    check(new_tok(masked)["input_ids"] == old_tok(masked)["input_ids"], f"{masked!r} encodes as before")
    plain = "Any process that activates or increases the frequency of cell division."
    if not any(t["word"] in plain.split() for t in words):
        check(new_tok(plain)["input_ids"] == old_tok(plain)["input_ids"], "text without new words unchanged")

    old_emb = old_model.get_input_embeddings().weight.detach()
    new_emb = new_model.get_input_embeddings().weight.detach()
    # The decoder (RoBERTa's lm_head.decoder, ModernBERT's decoder), whatever the family.
    old_out, new_out = old_model.get_output_embeddings(), new_model.get_output_embeddings()
    old_bias, new_bias = old_out.bias.detach(), new_out.bias.detach()
    v = old_emb.shape[0]
    check(new_emb.shape[0] == report["new_vocab_size"], f"embedding rows {new_emb.shape[0]}")
    check(torch.equal(new_emb[:v], old_emb), "old embedding rows bit-identical")
    check(torch.equal(new_bias[:v], old_bias), "old LM-head bias bit-identical")
    # The decoder is tied: the output projection is the (grown) embedding matrix.
    check(new_out.weight.data_ptr() == new_emb.data_ptr() or
          torch.equal(new_out.weight, new_emb), "decoder tied to embeddings")

    def expand(pieces):
        return torch.tensor(pieces, dtype=torch.long)

    worst = 0.0
    for t in report["added"]:
        mean = old_emb[expand(t["pieces"])].mean(0)
        worst = max(worst, (new_emb[t["id"]] - mean).abs().max().item())
        worst = max(worst, abs(new_bias[t["id"]].item() - old_bias[expand(t["pieces"])].mean().item()))
    check(worst <= 1e-6, f"new rows are the mean of their pieces' rows (max diff {worst:.1e})")
    print(f"VOCAB_CHECK passed={passed} failed={failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
