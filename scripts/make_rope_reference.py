#!/usr/bin/env python3
"""RoPE reference tables for masklm's rotary kernel test (crates/model/src/cpu_ops/rotary.rs).

Writes tests/fixtures/rope_reference.json: for head_dim 64 and ModernBERT's two bases (global
160000, local 10000), transformers' `ModernBertRotaryEmbedding.compute_default_rope_parameters`
inverse frequencies (as f32 bit patterns) and its forward's cos and sin (f32) at a few
positions up to 8191, so the Rust tables can be checked bit for bit (inv_freq) and to ~1 ulp
(cos, sin).

Regenerate (versions pinned in scripts/requirements.txt):
    /var/tmp/masklm-venv/bin/python scripts/make_rope_reference.py
"""

import json
import pathlib
import types

import torch
import transformers
from transformers.models.modernbert.modeling_modernbert import ModernBertRotaryEmbedding

HEAD_DIM = 64
POSITIONS = [0, 1, 2, 63, 64, 127, 511, 2047, 8191]

out = {"transformers": transformers.__version__, "torch": torch.__version__,
       "head_dim": HEAD_DIM, "positions": POSITIONS, "bases": []}
for theta in [160000.0, 10000.0]:
    config = types.SimpleNamespace(
        rope_parameters={"t": {"rope_theta": theta}}, head_dim=HEAD_DIM)
    inv_freq, _ = ModernBertRotaryEmbedding.compute_default_rope_parameters(config, layer_type="t")
    # The forward's arithmetic (modeling_modernbert.py, ModernBertRotaryEmbedding.forward).
    position_ids = torch.tensor([POSITIONS])
    freqs = position_ids[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    out["bases"].append({
        "theta": theta,
        "inv_freq_bits": inv_freq.view(torch.int32).tolist(),
        "cos": emb.cos()[0].flatten().tolist(),
        "sin": emb.sin()[0].flatten().tolist(),
    })
path = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/rope_reference.json"
path.write_text(json.dumps(out) + "\n")
print(f"wrote {path}")
