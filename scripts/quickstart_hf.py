"""The quickstart's recipe in transformers + PyTorch, to check that masklm learns as fast as the
reference (BENCHMARKS.md, "Quickstart recipe"). Trains `RobertaForMaskedLM` of the quickstart's
shape on data/go/definitions.txt with `DataCollatorForLanguageModeling` (token-level masking),
AdamW with the Trainer's decay groups, warmup + linear decay and clipping at 1.0, then saves the
model (a Hugging Face folder) and its held-out lines, so that both sides can be evaluated by the
same command:

    python scripts/quickstart_hf.py --steps 450 --out runs/qs-hf
    masklm eval --model runs/qs-hf --input runs/qs-hf/heldout.txt --packing line \\
        --max-seq-length 64 --batch-size 64

Needs the 4,096-token tokenizer scripts/quickstart.sh trains (runs/quickstart-tokenizer).
"""
import argparse
import math
import time

import numpy as np
import torch
from transformers import (DataCollatorForLanguageModeling, PreTrainedTokenizerFast,
                          RobertaConfig, RobertaForMaskedLM)

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=450)
p.add_argument("--packing", choices=["line", "full"], default="line")
p.add_argument("--seq", type=int, default=64)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--lr", type=float, default=4e-3)
p.add_argument("--warmup", type=int, default=100)
p.add_argument("--mask", type=float, default=0.2)
p.add_argument("--tokenizer", default="runs/quickstart-tokenizer/tokenizer.json")
p.add_argument("--corpus", default="data/go/definitions.txt")
p.add_argument("--out", default="runs/qs-hf")
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()
torch.manual_seed(0)
torch.set_num_threads(args.threads)

tok = PreTrainedTokenizerFast(tokenizer_file=args.tokenizer, bos_token="<s>", eos_token="</s>",
                              unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
lines = open(args.corpus, encoding="utf-8").read().splitlines()
order = np.random.default_rng(0).permutation(len(lines))
n_val = len(lines) // 50
val_lines = [lines[i] for i in order[:n_val]]
train_lines = [lines[i] for i in order[n_val:]]


def examples(texts):
    enc = tok(texts, add_special_tokens=True)["input_ids"]
    if args.packing == "line":  # run_mlm --line_by_line: <s> doc </s>, truncated
        return [e[:args.seq - 1] + [e[-1]] if len(e) > args.seq else e for e in enc]
    flat = [t for e in enc for t in e]  # run_mlm group_texts
    return [flat[i:i + args.seq] for i in range(0, len(flat) - args.seq + 1, args.seq)]


train, val = examples(train_lines), examples(val_lines)[:256]
config = RobertaConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=512, max_position_embeddings=130,
                       layer_norm_eps=1e-5, type_vocab_size=1, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id)
model = RobertaForMaskedLM(config)
collator = DataCollatorForLanguageModeling(tok, mlm_probability=args.mask)
no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n  # Trainer.get_decay_parameter_names
optimizer = torch.optim.AdamW(
    [{"params": [p for n, p in model.named_parameters() if not no_decay(n)], "weight_decay": 0.01},
     {"params": [p for n, p in model.named_parameters() if no_decay(n)], "weight_decay": 0.0}],
    lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
schedule = torch.optim.lr_scheduler.LambdaLR(
    optimizer, lambda s: s / args.warmup if s < args.warmup
    else max(0.0, (args.steps - s) / (args.steps - args.warmup)))


def evaluate():
    model.eval()
    torch.manual_seed(1234)
    total = count = correct = 0
    with torch.no_grad():
        for i in range(0, len(val), args.batch):
            b = collator([{"input_ids": x} for x in val[i:i + args.batch]])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            m = b["labels"] != -100
            logp = torch.log_softmax(logits[m], -1)
            y = b["labels"][m]
            total -= logp.gather(1, y[:, None]).sum().item()
            count += m.sum().item()
            correct += (logp.argmax(-1) == y).sum().item()
    model.train()
    return math.exp(total / count), correct / count


shuffled, pos, start = np.random.default_rng(1).permutation(len(train)), 0, time.time()
for step in range(1, args.steps + 1):
    if pos + args.batch > len(shuffled):
        shuffled, pos = np.random.default_rng(step).permutation(len(train)), 0
    batch = collator([{"input_ids": train[j]} for j in shuffled[pos:pos + args.batch]])
    pos += args.batch
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()
    if step % 150 == 0 or step == args.steps:
        ppl, acc = evaluate()
        print(f"step {step} loss {loss.item():.3f} perplexity {ppl:.1f} accuracy {acc:.3f} "
              f"({time.time() - start:.0f} s)", flush=True)
model.save_pretrained(args.out)
tok.save_pretrained(args.out)
with open(f"{args.out}/heldout.txt", "w", encoding="utf-8") as f:
    f.write("\n".join(val_lines) + "\n")
