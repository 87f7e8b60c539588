#!/usr/bin/env python3
"""Reference fixtures for masklm's model tests, made by transformers itself.

For each fixture this builds a small random `RobertaForMaskedLM` offline with a fixed seed,
saves it as a Hugging Face folder (config.json + model.safetensors) under tests/fixtures/NAME/,
and writes tests/fixtures/NAME/reference.safetensors holding, for one right-padded batch:

  input_ids, attention_mask, labels (-100 where not masked)   int64 [batch, seq]
  logits                                                      f32 [batch, seq, vocab]
  loss                                                        f32 [] (HF's MLM loss)
  grad.<HF parameter name>                                     f32, HF layout ([out, in])

Logits and loss come from model.eval() with the eager attention path; gradients are of that
loss, also without dropout. Weights are perturbed away from HF's init (N(0, 0.02), LayerNorm 1/0,
zero biases) so that every numerical detail (LayerNorm eps, GELU form, position offset,
biases) moves the logits well past the tests' tolerances.

It also encodes TOKENIZER_SENTENCES with transformers' AutoTokenizer on the tokenizer that
`masklm tokenizer train` wrote to tests/fixtures/tokenizer-go/ (see TOKENIZER_FIXTURE below),
into tests/fixtures/tokenizer-go/reference.json.

ModernBERT fixtures (tests/fixtures/modernbert-tiny{,-old}/, see make_modernbert_fixtures) are
written last; `--only modernbert` writes just those, leaving the others untouched.

`--only optim` writes just the StableAdamW reference (tests/fixtures/roberta-tiny/
stable_adamw_reference.json and stable_adamw_final.safetensors: torch-optimi's StableAdamW under
transformers' get_wsd_schedule) and tests/fixtures/wsd_schedule_reference.json (get_wsd_schedule's
learning rates for every shape).

Regenerate (versions pinned in scripts/requirements.txt):
    python3 -m venv /var/tmp/masklm-venv
    /var/tmp/masklm-venv/bin/pip install -r scripts/requirements.txt
    /var/tmp/masklm-venv/bin/python scripts/make_reference.py
"""

import json
import os
import pathlib

# Tokenizer training is deterministic only without parallel merges.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import torch
from safetensors.torch import save_file
from transformers import (
    BertConfig,
    BertForMaskedLM,
    RobertaConfig,
    RobertaForMaskedLM,
    XLMRobertaConfig,
    XLMRobertaForMaskedLM,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

# Parameters whose gradients are dumped: the tied embedding/decoder matrix, one attention
# projection, and the LM head's dense layer.
GRAD_PARAMS = [
    "roberta.embeddings.word_embeddings.weight",
    "roberta.encoder.layer.0.attention.self.query.weight",
    "lm_head.dense.weight",
]

FIXTURE_SPECS = {
    "roberta-tiny": dict(
        config=dict(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=130,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
        ),
        lengths=[16, 11, 6],
        seed=0,
    ),
    # Different sizes, class-default type_vocab_size (2) and a larger eps, so that nothing
    # about the first fixture can be hard-coded.
    "roberta-tiny-b": dict(
        config=dict(
            vocab_size=1203,
            hidden_size=48,
            num_hidden_layers=3,
            num_attention_heads=6,
            intermediate_size=80,
            max_position_embeddings=40,
            layer_norm_eps=1e-3,
        ),
        lengths=[20, 9, 14, 3],
        seed=1,
        also_pytorch_bin=True,
    ),
    # XLM-R layout (XLMRobertaForMaskedLM, model_type "xlm-roberta"): the RoBERTa architecture
    # under another class name, as CamemBERT's is.
    "xlmr-tiny": dict(
        family="xlm-roberta",
        config=dict(
            vocab_size=900,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=40,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
        ),
        lengths=[12, 5],
        seed=3,
    ),
    # BERT family: positions from 0, two token types, the cls.predictions head whose
    # activation is hidden_act (gelu_new here, so a RoBERTa-style exact-GELU head would fail),
    # [MASK], and a WordPiece vocabulary (made by make_bert_tokenizer below).
    "bert-tiny": dict(
        family="bert",
        config=dict(
            vocab_size=1100,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=64,
            hidden_act="gelu_new",
        ),
        lengths=[18, 7, 12],
        seed=2,
    ),
}

# Special ids: RoBERTa <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4; BERT WordPiece [PAD]=0 [UNK]=1
# [CLS]=2 [SEP]=3 [MASK]=4.
ROBERTA_IDS = dict(bos=0, pad=1, eos=2, mask=4)
BERT_IDS = dict(bos=2, pad=0, eos=3, mask=4)
FIRST_WORD_ID = 5


def perturb(model: RobertaForMaskedLM, generator: torch.Generator) -> None:
    """Moves every parameter off HF's init so biases and LayerNorm affine terms matter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "LayerNorm" in name or "layer_norm" in name:
                if name.endswith("weight"):
                    param.copy_(1.0 + 0.2 * noise)
                else:
                    param.copy_(0.1 * noise)
            elif "embeddings" in name:
                param.copy_(0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.05 * noise)
            else:
                # Large enough that the FFN input spans GELU's curved region.
                param.copy_(0.15 * noise)


def make_batch(lengths, vocab_size, seq, generator, ids=ROBERTA_IDS):
    batch = len(lengths)
    input_ids = torch.full((batch, seq), ids["pad"], dtype=torch.long)
    attention_mask = torch.zeros((batch, seq), dtype=torch.long)
    labels = torch.full((batch, seq), -100, dtype=torch.long)
    for row, length in enumerate(lengths):
        words = torch.randint(FIRST_WORD_ID, vocab_size, (length - 2,), generator=generator)
        input_ids[row, 0] = ids["bos"]
        input_ids[row, 1 : length - 1] = words
        input_ids[row, length - 1] = ids["eos"]
        attention_mask[row, :length] = 1
        # Mask ~30% of the words (at least one), as the collator would: label = original id.
        chosen = torch.rand(length - 2, generator=generator) < 0.3
        chosen[0] = True
        for i in torch.nonzero(chosen).flatten().tolist():
            labels[row, 1 + i] = input_ids[row, 1 + i]
            input_ids[row, 1 + i] = ids["mask"]
    return input_ids, attention_mask, labels


def make_fixture(name: str, spec: dict) -> None:
    torch.manual_seed(spec["seed"])
    generator = torch.Generator().manual_seed(spec["seed"])
    family = spec.get("family", "roberta")
    bert = family == "bert"
    config_class, model_class = {
        "roberta": (RobertaConfig, RobertaForMaskedLM),
        "xlm-roberta": (XLMRobertaConfig, XLMRobertaForMaskedLM),
        "bert": (BertConfig, BertForMaskedLM),
    }[family]
    config = config_class(**spec["config"])
    config._attn_implementation = "eager"
    model = model_class(config)
    perturb(model, generator)
    model.eval()

    out_dir = FIXTURES / name
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if spec.get("also_pytorch_bin"):
        # The same weights as pytorch_model.bin (torch.save zip), the pre-safetensors format.
        bin_dir = FIXTURES / f"{name}-bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        model.config.to_json_file(bin_dir / "config.json")
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(state, bin_dir / "pytorch_model.bin")

    seq = max(spec["lengths"])
    input_ids, attention_mask, labels = make_batch(
        spec["lengths"], config.vocab_size, seq, generator, BERT_IDS if bert else ROBERTA_IDS
    )
    model.zero_grad()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    # remove_duplicate=False: the tied embedding is reachable under both of its names.
    params = dict(model.named_parameters(remove_duplicate=False))

    tensors = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "logits": out.logits.detach().contiguous(),
        "loss": out.loss.detach().reshape([]),
    }
    for param in GRAD_PARAMS:
        if bert:
            param = param.replace("roberta.", "bert.").replace(
                "lm_head.dense.", "cls.predictions.transform.dense."
            )
        tensors[f"grad.{param}"] = params[param].grad.detach().contiguous()
    save_file(tensors, out_dir / "reference.safetensors")
    print(
        f"{name}: loss {out.loss.item():.6f}, logits {tuple(out.logits.shape)}, "
        f"files {sorted(p.name for p in out_dir.iterdir())}"
    )


# Made by masklm itself, then checked here against transformers:
#   masklm tokenizer train --input tests/fixtures/tokenizer-corpus.txt --vocab-size 1000 \
#       --out tests/fixtures/tokenizer-go
TOKENIZER_FIXTURE = FIXTURES / "tokenizer-go"
TOKENIZER_SENTENCES = [
    "The patient was <mask> with pneumonia.",
    "The patient was<mask> with pneumonia.",
    "<mask> is a protein kinase.",
    "Catalysis of the reaction: ATP + H2O = ADP + phosphate.",
    "  leading and trailing spaces  ",
    "double  spaces and\ttabs",
    "line one\nline two",
    "Numbers: 3.14159, 2,718 and 1e-5 mg/kg.",
    "UPPER lower MiXeD",
    "Café naïve façade résumé",
    "Zürich, São Paulo, Kraków",
    "αβγ δ-subunit of the Na+/K+-ATPase",
    "中文 日本語 한국어",
    "emoji 🧬🦠 in text",
    "hyphen-ated, slash/separated (parenthetical) [brackets] {braces}",
    "The mitochondrial inner membrane <mask> protein complex.",
    "Two masks: <mask> and <mask>.",
    "Literal <s> and </s> and <pad> tokens in text.",
    "'quotes' \"double\" `backticks`",
    "",
]


def make_tokenizer_reference() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_FIXTURE)
    ids = [tokenizer(s)["input_ids"] for s in TOKENIZER_SENTENCES]
    reference = {
        "tokenizer_class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "mask_token_id": tokenizer.mask_token_id,
        "sentences": TOKENIZER_SENTENCES,
        "input_ids": ids,
    }
    (TOKENIZER_FIXTURE / "reference.json").write_text(
        json.dumps(reference, ensure_ascii=False, indent=1) + "\n"
    )
    print(f"tokenizer-go: {type(tokenizer).__name__}, {len(ids)} sentences")


# Five AdamW steps on the roberta-tiny batch, as the HF Trainer sets them up: decay on
# weight matrices and embeddings, none on biases and LayerNorm; linear warmup then linear decay
# (get_linear_schedule_with_warmup); global-norm clipping; dropout 0.
OPTIM = dict(
    lr=2e-3,
    betas=(0.9, 0.98),
    eps=1e-6,
    weight_decay=0.01,
    max_grad_norm=1.0,
    warmup_steps=2,
    total_steps=5,
)


def make_optimizer_reference() -> None:
    from safetensors.torch import load_file, save_file
    from transformers import get_linear_schedule_with_warmup

    name = "roberta-tiny"
    torch.manual_seed(0)
    model = RobertaForMaskedLM.from_pretrained(
        FIXTURES / name,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    model.train()
    batch = load_file(FIXTURES / name / "reference.safetensors")
    # The Trainer's own grouping (it does not use `self`).
    from transformers import Trainer

    decay_names = Trainer.get_decay_parameter_names(None, model)
    decay = [p for n, p in model.named_parameters() if n in decay_names]
    no_decay = [p for n, p in model.named_parameters() if n not in decay_names]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": OPTIM["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=OPTIM["lr"],
        betas=OPTIM["betas"],
        eps=OPTIM["eps"],
    )
    scheduler = get_linear_schedule_with_warmup(
        optimizer, OPTIM["warmup_steps"], OPTIM["total_steps"]
    )
    losses, norms, lrs = [], [], []
    for _ in range(OPTIM["total_steps"]):
        optimizer.zero_grad()
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["max_grad_norm"])
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        losses.append(out.loss.item())
        norms.append(norm.item())
    reference = dict(OPTIM, losses=losses, grad_norms=norms, lrs=lrs, decay_parameters=sorted(decay_names))
    (FIXTURES / name / "optimizer_reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    # Final values of one parameter of each kind, to check weight decay and its groups exactly
    # (losses alone cannot see 5 steps of decay, ~5e-5).
    params = dict(model.named_parameters())
    final = {
        "lm_head.bias": params["lm_head.bias"],
        "roberta.encoder.layer.0.attention.output.LayerNorm.weight": params[
            "roberta.encoder.layer.0.attention.output.LayerNorm.weight"
        ],
        "roberta.embeddings.word_embeddings.weight": params["roberta.embeddings.word_embeddings.weight"],
        "roberta.encoder.layer.1.intermediate.dense.weight": params[
            "roberta.encoder.layer.1.intermediate.dense.weight"
        ],
    }
    save_file(
        {k: v.detach().contiguous().clone() for k, v in final.items()},
        FIXTURES / name / "optimizer_final.safetensors",
    )
    print(f"{name}: optimizer losses {[round(l, 6) for l in losses]}")


# ModernBERT's optimizer (its yamls' `decoupled_stableadamw`: betas (0.9, 0.98), eps 1e-6, built
# with decouple_lr=True so max_lr is the peak lr) under a WSD schedule, on a batch that changes
# every step so that some tensors' RMS of g^2/v exceeds 1 and their update is clipped. The
# weight decay is far above ModernBERT's 1e-5 so that its groups and its lr/max_lr scaling show
# in 5 steps; no global-norm clipping, so only StableAdamW's own clipping acts.
STABLE_ADAMW = dict(
    lr=1e-3,
    betas=(0.9, 0.98),
    eps=1e-6,
    weight_decay=0.1,
    max_grad_norm=0.0,
    # get_wsd_schedule(num_warmup_steps, num_decay_steps, num_training_steps, decay_type,
    # min_lr_ratio): lr 0.1 * peak at step 0, the peak at steps 1-2, a 1-sqrt decay at 3-4.
    warmup_steps=1,
    decay_steps=2,
    total_steps=5,
    decay_type="1-sqrt",
    min_lr_ratio=0.1,
    # The fixture batch's rows each step uses.
    rows=[[0, 3], [0, 1], [1, 3], [2, 3], [0, 2]],
)


def make_stable_adamw_reference() -> None:
    """tests/fixtures/roberta-tiny/stable_adamw_reference.json and stable_adamw_final.safetensors
    (every parameter after the last step): five optimi.StableAdamW steps (torch-optimi, pinned in requirements.txt) with the HF
    Trainer's decay groups, as make_optimizer_reference does for torch.optim.AdamW."""
    from optimi import StableAdamW
    from safetensors.torch import load_file, save_file
    from transformers import Trainer, get_wsd_schedule

    name = "roberta-tiny"
    config = STABLE_ADAMW
    torch.manual_seed(0)
    model = RobertaForMaskedLM.from_pretrained(
        FIXTURES / name,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    model.train()
    batch = load_file(FIXTURES / name / "reference.safetensors")
    decay_names = Trainer.get_decay_parameter_names(None, model)
    decay = [p for n, p in model.named_parameters() if n in decay_names]
    no_decay = [p for n, p in model.named_parameters() if n not in decay_names]
    # foreach/triton off: the per-tensor reference loop (_single_stableadamw).
    optimizer = StableAdamW(
        [
            {"params": decay, "weight_decay": config["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config["lr"],
        betas=config["betas"],
        eps=config["eps"],
        decouple_lr=True,
        foreach=False,
        triton=False,
    )
    scheduler = get_wsd_schedule(
        optimizer,
        num_warmup_steps=config["warmup_steps"],
        num_decay_steps=config["decay_steps"],
        num_training_steps=config["total_steps"],
        decay_type=config["decay_type"],
        min_lr_ratio=config["min_lr_ratio"],
    )
    losses, norms, lrs, clipped, max_rms = [], [], [], [], []
    for step in range(config["total_steps"]):
        start, end = config["rows"][step]
        optimizer.zero_grad()
        out = model(
            input_ids=batch["input_ids"][start:end],
            attention_mask=batch["attention_mask"][start:end],
            labels=batch["labels"][start:end],
        )
        out.loss.backward()
        # max_norm inf: the norm, and a scale of exactly 1.
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        losses.append(out.loss.item())
        norms.append(norm.item())
        # The clipping term optimi used, from the updated v and the untouched gradient.
        eps_sq = torch.tensor(config["eps"] ** 2)
        rms = [
            (p.grad.pow(2) / optimizer.state[p]["exp_avg_sq"].maximum(eps_sq)).mean().sqrt().item()
            for p in model.parameters()
        ]
        clipped.append(sum(r > 1.0 for r in rms))
        max_rms.append(max(rms))
    reference = dict(
        config,
        optimizer=f"optimi.StableAdamW {__import__('optimi').__version__} decouple_lr=True",
        losses=losses,
        grad_norms=norms,
        lrs=lrs,
        clipped_tensors=clipped,
        max_rms=max_rms,
    )
    (FIXTURES / name / "stable_adamw_reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    # Every parameter (the tied decoder once): which tensors were clipped differs by step.
    save_file(
        {k: p.detach().contiguous().clone() for k, p in model.named_parameters()},
        FIXTURES / name / "stable_adamw_final.safetensors",
    )
    print(f"{name}: StableAdamW losses {[round(l, 6) for l in losses]}, clipped tensors {clipped}")


# transformers' get_wsd_schedule cases for tests/fixtures/wsd_schedule_reference.json: every
# warmup/decay shape, a floor, no warmup, warmup and decay overlapping (negative stable phase),
# and a decay given as a share of the total (masklm's decay_fraction: ceil(total * fraction)).
WSD_CASES = [
    dict(warmup_steps=w, decay_steps=d, total_steps=t, warmup_type=wt, decay_type=dt, min_lr_ratio=m)
    for (w, d, t, m) in [(5, 8, 30, 0.0), (3, 10, 25, 0.1)]
    for wt in ["linear", "cosine", "1-sqrt"]
    for dt in ["linear", "cosine", "1-sqrt"]
] + [
    dict(warmup_steps=0, decay_steps=6, total_steps=20, warmup_type="linear", decay_type="cosine", min_lr_ratio=0.0),
    dict(warmup_steps=6, decay_steps=8, total_steps=10, warmup_type="linear", decay_type="linear", min_lr_ratio=0.05),
    dict(warmup_steps=4, decay_fraction=0.3, total_steps=33, warmup_type="linear", decay_type="1-sqrt", min_lr_ratio=0.0),
]


def make_wsd_reference() -> None:
    """tests/fixtures/wsd_schedule_reference.json: the learning rate of every step (and three
    past the end) of transformers' get_wsd_schedule for WSD_CASES, at peak lr 3e-4."""
    import math

    from transformers import get_wsd_schedule

    peak = 3e-4
    cases = []
    for case in WSD_CASES:
        decay_steps = case.get("decay_steps")
        if decay_steps is None:
            decay_steps = math.ceil(case["total_steps"] * case["decay_fraction"])
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
        scheduler = get_wsd_schedule(
            optimizer,
            num_warmup_steps=case["warmup_steps"],
            num_decay_steps=decay_steps,
            num_training_steps=case["total_steps"],
            warmup_type=case["warmup_type"],
            decay_type=case["decay_type"],
            min_lr_ratio=case["min_lr_ratio"],
        )
        lrs = []
        for _ in range(case["total_steps"] + 3):
            lrs.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        cases.append(dict(case, peak=peak, lrs=lrs))
    (FIXTURES / "wsd_schedule_reference.json").write_text(json.dumps(cases, indent=1) + "\n")
    print(f"wsd: {len(cases)} schedules")


def make_bert_tokenizer() -> int:
    """A lower-casing WordPiece tokenizer trained on the tokenizer corpus, saved with
    BertTokenizerFast(tokenizer_object=...) (not vocab_file=, which transformers 5 turns into a
    5-token vocabulary). Returns its size."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import AutoTokenizer, BertTokenizerFast

    # WordPiece training breaks frequency ties in hash order, so it is not reproducible:
    # keep the committed tokenizer when there is one (delete it to train a new one).
    existing = FIXTURES / "bert-tiny" / "tokenizer.json"
    if existing.exists():
        return len(AutoTokenizer.from_pretrained(FIXTURES / "bert-tiny"))
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train(
        [str(FIXTURES / "tokenizer-corpus.txt")],
        vocab_size=1100,
        min_frequency=2,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        show_progress=False,
    )
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, model_max_length=64)
    tokenizer.save_pretrained(FIXTURES / "bert-tiny")
    return len(tokenizer)


FILL_MASK_SENTENCES = {
    "roberta-tiny": [
        "The patient was <mask> with pneumonia.",
        "Catalysis of the reaction: ATP + H2O = ADP + <mask>.",
        "The <mask> of a protein into the nucleus.",
        "Two masks: <mask> and <mask>.",
    ],
    "bert-tiny": [
        "The patient was [MASK] with pneumonia.",
        "Catalysis of the reaction: ATP + H2O = ADP + [MASK].",
        "The [MASK] of a protein into the nucleus.",
        "Two masks: [MASK] and [MASK].",
    ],
}


def make_fill_mask_reference(name: str) -> None:
    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(FIXTURES / name), top_k=5)
    sentences = FILL_MASK_SENTENCES[name]
    outputs = [fill(s) for s in sentences]
    (FIXTURES / name / "fill_mask_reference.json").write_text(
        json.dumps({"sentences": sentences, "outputs": outputs}, ensure_ascii=False, indent=1) + "\n"
    )
    print(f"{name}: fill-mask reference for {len(sentences)} sentences")


PPPL_LINES = [
    "The maintenance of the structure and integrity of the mitochondrial genome.",
    "Catalysis of the reaction: ATP + H2O = ADP + phosphate.",
]


def make_pseudo_perplexity_reference(name: str = "roberta-tiny") -> None:
    """Pseudo-perplexity (Salazar et al. 2020) of the fixture `name` on PPPL_LINES: each
    non-special token masked in turn, exp of the mean negative log-likelihood over all of them."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / name)
    model = AutoModelForMaskedLM.from_pretrained(FIXTURES / name).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for line in PPPL_LINES:
            ids = tokenizer(line, return_tensors="pt")["input_ids"][0]
            for i in range(1, len(ids) - 1):
                masked = ids.clone()
                masked[i] = tokenizer.mask_token_id
                logits = model(input_ids=masked[None]).logits[0, i]
                nll -= torch.log_softmax(logits, -1)[ids[i]].item()
                count += 1
    pppl = float(torch.exp(torch.tensor(nll / count)))
    (FIXTURES / name / "pseudo_perplexity.json").write_text(
        json.dumps({"lines": PPPL_LINES, "tokens": count, "pseudo_perplexity": pppl}, indent=1) + "\n"
    )
    print(f"{name}: pseudo-perplexity {pppl:.4f} over {count} tokens")

PROBES = [
    ("Catalysis of the reaction: ATP + H2O = ADP + <mask>.", ["phosphate"]),
    ("The <mask> of a protein into the nucleus.", ["transport", "binding"]),
    ("Any process that activates the <mask> of a gene.", ["activity", "process"]),
    ("A <mask> that spans the lipid bilayer.", ["protein"]),
    ("The chemical reactions involving <mask>, a nucleic acid.", ["DNA"]),
]


def make_probes_reference() -> None:
    """Knowledge probes on roberta-tiny: writes probes.tsv and, from transformers' logits, each
    probe's best accepted answer (the answer ids are the `Ġword` vocabulary entries, looked up
    directly), its 1-based rank over the vocabulary, its probability, and the MRR."""
    from transformers import AutoTokenizer

    name = "roberta-tiny"
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / name)
    model = RobertaForMaskedLM.from_pretrained(FIXTURES / name).eval()
    vocab = tokenizer.get_vocab()
    lines, results = ["# sentence<TAB>accepted answers (made by scripts/make_reference.py)"], []
    with torch.no_grad():
        for number, (sentence, answers) in enumerate(PROBES, start=2):
            lines.append("\t".join([sentence, *answers]))
            ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
            at = (ids[0] == tokenizer.mask_token_id).nonzero()[0, 0]
            probs = torch.softmax(model(input_ids=ids).logits[0, at], -1)
            best = None
            for answer in answers:
                token = vocab.get("\u0120" + answer)
                if token is None:
                    continue  # not one token: masklm must refuse such a file (see the test)
                p = probs[token]
                rank = 1 + int((probs > p).sum())
                if best is None or rank < best["rank"]:
                    best = {"line": number, "answer": answer, "rank": rank, "probability": float(p)}
            results.append(best)
    (FIXTURES / name / "probes.tsv").write_text("\n".join(lines) + "\n")
    usable = [r for r in results if r is not None]
    mrr = sum(1 / r["rank"] for r in usable) / len(usable)
    (FIXTURES / name / "probes_reference.json").write_text(
        json.dumps({"probes": results, "mrr": mrr}, indent=1) + "\n"
    )
    print(f"{name}: {len(PROBES)} probes, MRR {mrr:.4f}")



def make_parquet_fixture() -> None:
    """tests/fixtures/parquet/: the first 60 lines of tokenizer-corpus.txt as Parquet written by
    pyarrow, in 4 row groups, once snappy- and once zstd-compressed, with an id column before
    the text and a null text in row 7; lines.json lists the texts a reader must yield."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = (FIXTURES / "tokenizer-corpus.txt").read_text(encoding="utf-8").splitlines()[:60]
    texts = [None if i == 6 else line for i, line in enumerate(lines)]
    table = pa.table({"id": pa.array(range(len(texts)), pa.int64()), "text": pa.array(texts, pa.string())})
    out = FIXTURES / "parquet"
    out.mkdir(exist_ok=True)
    for codec in ["snappy", "zstd"]:
        pq.write_table(table, out / f"corpus-{codec}.parquet", row_group_size=16, compression=codec)
    expected = [t for t in texts if t is not None and t.strip()]
    (out / "lines.json").write_text(json.dumps(expected, ensure_ascii=False, indent=0) + "\n")
    print(f"parquet: {len(expected)} texts in {len(texts)} rows (pyarrow {pa.__version__})")



# --- ModernBERT -------------------------------------------------------------------------------
#
# tests/fixtures/modernbert-tiny/: a random, perturbed ModernBertForMaskedLM saved by
# transformers (config.json in transformers 5's spelling: layer_types + rope_parameters), a
# byte-level BPE tokenizer in ModernBERT's convention (made by make_modernbert_tokenizer), the
# reference batch (reference.safetensors, as for RoBERTa, with gradients), and
# fill_mask_reference.json from pipeline("fill-mask").
# tests/fixtures/modernbert-tiny-old/: another model whose config.json uses the older keys
# (global_attn_every_n_layers, global_rope_theta, local_rope_theta), with every bias on
# (norm_bias, attention_bias, mlp_bias, classifier_bias) and no decoder bias, weights in bf16 as
# pytorch_model.bin, and its own reference logits.
#
# Both fixtures: odd shapes (hidden 48, 3 heads of 16, intermediate 72), 4 layers with a global
# layer every 3 (layers 0 and 3), local_attention 8 (each token sees 4 keys either side), and a
# padded batch whose longest row (27 tokens) is longer than the window.
#
#     /var/tmp/masklm-venv/bin/python scripts/make_reference.py --only modernbert

MODERNBERT_SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
MODERNBERT_LENGTHS = [27, 19, 11, 5]
# Parameters whose gradients are dumped (HF names); those a fixture lacks are skipped.
MODERNBERT_GRAD_PARAMS = [
    "model.embeddings.tok_embeddings.weight",
    "model.layers.1.attn.Wqkv.weight",
    "model.layers.1.attn.Wo.weight",
    "model.layers.1.mlp.Wi.weight",
    "model.layers.0.mlp.Wo.weight",
    "model.layers.3.attn.Wqkv.weight",
    "model.final_norm.weight",
    "head.dense.weight",
    "head.norm.weight",
    "decoder.bias",
]
MODERNBERT_COMMON = dict(
    hidden_size=48,
    num_attention_heads=3,
    intermediate_size=72,
    num_hidden_layers=4,
    local_attention=8,
    max_position_embeddings=64,
)
MODERNBERT_FILL_MASK_SENTENCES = [
    "The patient was [MASK] with pneumonia.",
    "Catalysis of the reaction: ATP + H2O = ADP + [MASK].",
    "The [MASK] of a protein into the nucleus.",
    "Two masks: [MASK] and [MASK].",
    "[MASK] is a protein kinase.",
]


def make_modernbert_tokenizer(out_dir: pathlib.Path):
    """A byte-level BPE tokenizer in ModernBERT-base's convention: specials [UNK] [CLS] [SEP]
    [PAD] [MASK] after the learned vocabulary (ModernBERT's sit at 50280..50284), [MASK] with
    lstrip=True, post-processor `[CLS] $A [SEP]`, saved through PreTrainedTokenizerFast so that
    AutoTokenizer loads it. Training is deterministic with one thread (set at the top)."""
    from tokenizers import AddedToken as RawAddedToken
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AddedToken, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=795,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(FIXTURES / "tokenizer-corpus.txt")], trainer)
    tokenizer.add_special_tokens(
        [RawAddedToken(t, special=True, lstrip=(t == "[MASK]"), normalized=False) for t in MODERNBERT_SPECIALS]
    )
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token=AddedToken("[MASK]", lstrip=True, rstrip=False, normalized=False, special=True),
        model_max_length=64,
        clean_up_tokenization_spaces=True,
    )
    fast.save_pretrained(out_dir)
    return fast


def modernbert_perturb(model, generator: torch.Generator) -> None:
    """Moves every parameter off HF's init (truncated normals, LayerNorm 1/0, zero biases)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_((1.0 + 0.2 * noise) if name.endswith("weight") else 0.1 * noise)
            elif "embeddings" in name:
                param.copy_(0.5 * noise)
            elif name.endswith("bias"):
                param.copy_(0.05 * noise)
            else:
                param.copy_(0.15 * noise)


def modernbert_batch(lengths, words, ids, generator):
    """A right-padded batch framed as `[CLS] ... [SEP]`, ~30% of the words masked (at least one
    per row); `words` is the number of non-special ids (specials follow them)."""
    batch, seq = len(lengths), max(lengths)
    input_ids = torch.full((batch, seq), ids["pad"], dtype=torch.long)
    attention_mask = torch.zeros((batch, seq), dtype=torch.long)
    labels = torch.full((batch, seq), -100, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, 0] = ids["cls"]
        input_ids[row, 1 : length - 1] = torch.randint(0, words, (length - 2,), generator=generator)
        input_ids[row, length - 1] = ids["sep"]
        attention_mask[row, :length] = 1
        chosen = torch.rand(length - 2, generator=generator) < 0.3
        chosen[-1] = True
        for i in torch.nonzero(chosen).flatten().tolist():
            labels[row, 1 + i] = input_ids[row, 1 + i]
            input_ids[row, 1 + i] = ids["mask"]
    return input_ids, attention_mask, labels


def modernbert_outputs(model, batch, implementation):
    from transformers import ModernBertForMaskedLM

    model.config._attn_implementation = implementation
    for module in model.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = implementation
    model.zero_grad()
    input_ids, attention_mask, labels = batch
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    return out


def make_modernbert_fixture(name: str, config_kwargs: dict, seed: int, ids: dict, vocab_words: int,
                            old_spelling: bool = False, bf16_bin: bool = False):
    from transformers import AutoConfig, AutoModelForMaskedLM, ModernBertConfig, ModernBertForMaskedLM

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    config = ModernBertConfig(**config_kwargs)
    model = ModernBertForMaskedLM(config)
    modernbert_perturb(model, generator)
    if bf16_bin:
        # Values bf16 can hold exactly, so the f32 reference is the stored model's.
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.bfloat16().float())
    model.eval()
    out_dir = FIXTURES / name
    out_dir.mkdir(parents=True, exist_ok=True)
    if bf16_bin:
        model.config.to_json_file(out_dir / "config.json")
        # torch.save zip of the bf16 state dict, tied decoder.weight included (older
        # checkpoints carry it; loaders ignore it).
        state = {k: v.detach().bfloat16().contiguous() for k, v in model.state_dict().items()}
        torch.save(state, out_dir / "pytorch_model.bin")
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
    if old_spelling:
        saved = json.loads((out_dir / "config.json").read_text())
        saved.pop("layer_types")
        rope = saved.pop("rope_parameters")
        saved["global_attn_every_n_layers"] = config_kwargs["global_attn_every_n_layers"]
        saved["global_rope_theta"] = rope["full_attention"]["rope_theta"]
        if "local_rope_theta" in config_kwargs:
            saved["local_rope_theta"] = rope["sliding_attention"]["rope_theta"]
        (out_dir / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        reread = AutoConfig.from_pretrained(out_dir)
        assert reread.layer_types == config.layer_types, (reread.layer_types, config.layer_types)
        assert reread.rope_parameters == config.rope_parameters, (reread.rope_parameters, config.rope_parameters)

    batch = modernbert_batch(MODERNBERT_LENGTHS, vocab_words, ids, generator)
    real = batch[1].bool()
    sdpa = modernbert_outputs(model, batch, "sdpa")
    eager = modernbert_outputs(model, batch, "eager")
    diff_real = (sdpa.logits - eager.logits)[real].abs().max().item()
    diff_pad = (sdpa.logits - eager.logits)[~real].abs().max().item()
    scale = eager.logits[real].abs().max().item()
    # Relative to the largest logit: the two kernels sum in different orders.
    assert diff_real <= 1e-6 * max(scale, 1.0) * 10, (
        f"{name}: eager and sdpa differ by {diff_real} at real tokens (largest logit {scale})"
    )
    assert abs(sdpa.loss.item() - eager.loss.item()) < 1e-6
    eager.loss.backward()
    params = dict(model.named_parameters(remove_duplicate=False))

    # What a user gets: transformers loading the saved folder.
    loaded = AutoModelForMaskedLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(loaded).__name__ == "ModernBertForMaskedLM"
    with torch.no_grad():
        again = loaded(input_ids=batch[0], attention_mask=batch[1]).logits
    diff_loaded = (again - eager.logits)[real].abs().max().item()
    assert diff_loaded == 0.0, f"{name}: the saved folder gives logits {diff_loaded} away"

    input_ids, attention_mask, labels = batch
    tensors = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "logits": eager.logits.detach().contiguous(),
        "loss": eager.loss.detach().reshape([]),
    }
    for param in MODERNBERT_GRAD_PARAMS:
        if param in params:
            tensors[f"grad.{param}"] = params[param].grad.detach().contiguous()
    save_file(tensors, out_dir / "reference.safetensors")
    print(
        f"{name}: loss {eager.loss.item():.6f}, logits {tuple(eager.logits.shape)} up to {scale:.2f}, "
        f"eager vs sdpa {diff_real:.2e} at tokens ({diff_pad:.2e} at pads), files {sorted(p.name for p in out_dir.iterdir())}"
    )
    return model


def make_modernbert_fill_mask_reference(name: str) -> None:
    from transformers import AutoTokenizer, pipeline

    out_dir = FIXTURES / name
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    fill = pipeline("fill-mask", model=str(out_dir), top_k=5)
    sentences = MODERNBERT_FILL_MASK_SENTENCES
    outputs = [fill(s) for s in sentences]
    reference = {
        "tokenizer_class": type(tokenizer).__name__,
        "mask_token_id": tokenizer.mask_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "cls_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "sentences": sentences,
        "input_ids": [tokenizer(s)["input_ids"] for s in sentences],
        "outputs": outputs,
    }
    (out_dir / "fill_mask_reference.json").write_text(
        json.dumps(reference, ensure_ascii=False, indent=1) + "\n"
    )
    print(f"{name}: fill-mask reference for {len(sentences)} sentences ({type(tokenizer).__name__})")


def make_modernbert_fixtures() -> None:
    tiny = FIXTURES / "modernbert-tiny"
    tokenizer = make_modernbert_tokenizer(tiny)
    vocab = len(tokenizer)
    ids = {
        "cls": tokenizer.cls_token_id,
        "sep": tokenizer.sep_token_id,
        "pad": tokenizer.pad_token_id,
        "mask": tokenizer.mask_token_id,
    }
    words = min(tokenizer.convert_tokens_to_ids(MODERNBERT_SPECIALS))
    special_ids = dict(
        pad_token_id=ids["pad"],
        bos_token_id=ids["cls"],
        eos_token_id=ids["sep"],
        cls_token_id=ids["cls"],
        sep_token_id=ids["sep"],
    )
    make_modernbert_fixture(
        "modernbert-tiny",
        dict(
            MODERNBERT_COMMON,
            vocab_size=vocab,
            layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 300.0},
            },
            **special_ids,
        ),
        seed=10,
        ids=ids,
        vocab_words=words,
    )
    make_modernbert_fill_mask_reference("modernbert-tiny")
    make_pseudo_perplexity_reference("modernbert-tiny")
    make_modernbert_fixture(
        "modernbert-tiny-old",
        dict(
            MODERNBERT_COMMON,
            vocab_size=vocab,
            global_attn_every_n_layers=3,
            # local_rope_theta absent: the class default (10000) applies.
            global_rope_theta=20000.0,
            norm_bias=True,
            attention_bias=True,
            mlp_bias=True,
            classifier_bias=True,
            decoder_bias=False,
            hidden_activation="gelu_pytorch_tanh",
            classifier_activation="gelu_new",
            norm_eps=1e-3,
            **special_ids,
        ),
        seed=11,
        ids=ids,
        vocab_words=words,
        old_spelling=True,
        bf16_bin=True,
    )
    versions_path = FIXTURES / "VERSIONS.json"
    versions = json.loads(versions_path.read_text()) if versions_path.exists() else {}
    versions["modernbert"] = {
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "tokenizers": __import__("tokenizers").__version__,
    }
    versions_path.write_text(json.dumps(versions, indent=2) + "\n")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        choices=["modernbert", "optim"],
        help="write only these fixtures (a model family's, or the StableAdamW and WSD schedule "
        "references), leaving the others as they are",
    )
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    if args.only == "modernbert":
        make_modernbert_fixtures()
        return
    if args.only == "optim":
        make_stable_adamw_reference()
        make_wsd_reference()
        return
    FIXTURE_SPECS["bert-tiny"]["config"]["vocab_size"] = make_bert_tokenizer()
    for name, spec in FIXTURE_SPECS.items():
        make_fixture(name, spec)
    make_tokenizer_reference()
    make_optimizer_reference()
    make_stable_adamw_reference()
    make_wsd_reference()
    # roberta-tiny shares the 1000-token vocabulary of tokenizer-go: together they make a
    # complete Hugging Face folder for the fill-mask pipeline.
    for file in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        (FIXTURES / "roberta-tiny" / file).write_bytes((TOKENIZER_FIXTURE / file).read_bytes())
    make_fill_mask_reference("roberta-tiny")
    make_fill_mask_reference("bert-tiny")
    make_pseudo_perplexity_reference()
    make_probes_reference()
    make_parquet_fixture()
    versions = {
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    (FIXTURES / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")
    make_modernbert_fixtures()


if __name__ == "__main__":
    main()
