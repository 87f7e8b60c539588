#!/usr/bin/env python3
"""The transformers + PyTorch side of scripts/bench.sh: RobertaForMaskedLM trained with
torch.optim.AdamW (HF Trainer groups, clip_grad_norm_ 1.0) on batches from
DataCollatorForLanguageModeling (15%, 80/10/10), fp32, then forward-only evaluation with labels.
The same shapes, batch, masking and optimizer settings as masklm's examples/bench.rs.

Prints `HF_BENCH train_tps=... eval_tps=... rss_mb=... params=... matmul_gflops=...`.
"""

import argparse
import resource
import time

import torch
from transformers import (DataCollatorForLanguageModeling, ModernBertConfig, ModernBertForMaskedLM,
                          RobertaConfig, RobertaForMaskedLM)


class Vocab:
    """The minimal tokenizer interface DataCollatorForLanguageModeling uses."""

    def __init__(self, size):
        self.size = size
        self.mask_token = "<mask>"
        self.mask_token_id = 4
        self.pad_token_id = 1
        self._pad_token = "<pad>"
        self.padding_side = "right"

    def __len__(self):
        return self.size

    def get_special_tokens_mask(self, ids, already_has_special_tokens=True):
        return [1 if i < 5 else 0 for i in ids]

    def convert_tokens_to_ids(self, token):
        return self.mask_token_id

    @property
    def pad_token(self):
        return self._pad_token


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(threads, device):
    torch.set_num_threads(threads)
    size = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    n = 20
    start = time.perf_counter()
    for _ in range(n):
        a @ b
    sync(device)
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e9


def main():
    p = argparse.ArgumentParser()
    for name, default in [("hidden", 256), ("layers", 4), ("heads", 4), ("ffn", 1024), ("vocab", 8192),
                          ("seq", 128), ("batch", 16), ("steps", 20), ("threads", 2), ("warmup", 3)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (scripts/gpu-check.sh)")
    p.add_argument("--model-type", default="roberta", choices=["roberta", "modernbert"])
    p.add_argument("--window", type=int, default=128, help="ModernBERT local_attention")
    p.add_argument("--global-every", type=int, default=3, help="ModernBERT global_attn_every_n_layers")
    p.add_argument("--precision", default="f32", choices=["f32", "bf16", "f16"],
                   help="bf16/f16: torch.autocast (+ GradScaler for f16)")
    a = p.parse_args()
    device = torch.device(a.device)
    half = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}[a.precision]
    autocast = lambda: torch.autocast(device.type, dtype=half, enabled=half is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=a.precision == "f16")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.model_type == "modernbert":
        # The same shape as examples/bench.rs's, with the batches' special ids (0, 1, 2).
        config = ModernBertConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                                  num_attention_heads=a.heads, intermediate_size=a.ffn,
                                  max_position_embeddings=max(a.seq, 512), local_attention=a.window,
                                  global_attn_every_n_layers=a.global_every, pad_token_id=1,
                                  bos_token_id=0, cls_token_id=0, sep_token_id=2, eos_token_id=2)
        model = ModernBertForMaskedLM(config).to(device)
    else:
        config = RobertaConfig(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                               num_attention_heads=a.heads, intermediate_size=a.ffn,
                               max_position_embeddings=a.seq + 2, type_vocab_size=1, layer_norm_eps=1e-5)
        model = RobertaForMaskedLM(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    collator = DataCollatorForLanguageModeling(Vocab(a.vocab), mlm_probability=0.15)
    generator = torch.Generator().manual_seed(1)

    def batch():
        ids = torch.randint(5, a.vocab, (a.batch, a.seq), generator=generator)
        ids[:, 0], ids[:, -1] = 0, 2
        # The collator's own masking (torch_mask_tokens); blocks are full, so no padding.
        inputs, labels = collator.torch_mask_tokens(ids, special_tokens_mask=ids < 5)
        return {"input_ids": inputs.to(device), "labels": labels.to(device)}

    warmup = a.warmup
    model.train()
    for step in range(warmup + a.steps):
        if step == warmup:
            start = time.perf_counter()
        b = batch()
        optimizer.zero_grad()
        with autocast():
            loss = model(input_ids=b["input_ids"], labels=b["labels"]).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        loss.item()
    train_tps = a.steps * a.batch * a.seq / (time.perf_counter() - start)

    model.eval()
    with torch.no_grad(), autocast():
        for step in range(warmup + a.steps):
            if step == warmup:
                start = time.perf_counter()
            b = batch()
            out = model(input_ids=b["input_ids"], labels=b["labels"])
            out.loss.item()
            out.logits.argmax(-1).cpu()
    eval_tps = a.steps * a.batch * a.seq / (time.perf_counter() - start)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"HF_BENCH train_tps={train_tps:.1f} eval_tps={eval_tps:.1f} rss_mb={rss_mb:.0f} "
          f"params={params} matmul_gflops={matmul_gflops(a.threads, device):.1f}")


if __name__ == "__main__":
    main()
