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


def make_pseudo_perplexity_reference() -> None:
    """Pseudo-perplexity (Salazar et al. 2020) of roberta-tiny on PPPL_LINES: each non-special
    token masked in turn, exp of the mean negative log-likelihood over all of them."""
    from transformers import AutoTokenizer

    name = "roberta-tiny"
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / name)
    model = RobertaForMaskedLM.from_pretrained(FIXTURES / name).eval()
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


def main() -> None:
    torch.use_deterministic_algorithms(True)
    FIXTURE_SPECS["bert-tiny"]["config"]["vocab_size"] = make_bert_tokenizer()
    for name, spec in FIXTURE_SPECS.items():
        make_fixture(name, spec)
    make_tokenizer_reference()
    make_optimizer_reference()
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


if __name__ == "__main__":
    main()
