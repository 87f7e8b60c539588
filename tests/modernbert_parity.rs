//! ModernBERT against transformers' `ModernBertForMaskedLM` on the same weights and batch.
//!
//! Fixtures, written by `scripts/make_reference.py --only modernbert` (versions in
//! `tests/fixtures/VERSIONS.json` under "modernbert"):
//! - `tests/fixtures/modernbert-tiny/`: config.json in transformers 5's spelling
//!   (`layer_types`, `rope_parameters`), f32 model.safetensors, a ModernBERT-style tokenizer,
//!   reference.safetensors (batch, logits, loss, gradients) and fill_mask_reference.json;
//! - `tests/fixtures/modernbert-tiny-old/`: the older spelling (`global_attn_every_n_layers`,
//!   `global_rope_theta`), every bias on and no decoder bias, bf16 pytorch_model.bin.
//!
//! Both have 4 layers (0 and 3 global), `local_attention` 8 and rows up to 27 tokens, so the
//! sliding window cuts every long row. Logits are compared at real tokens only: at padded
//! positions transformers' own eager and sdpa paths disagree (a pad query far from every token
//! has no visible key in a sliding layer), and nothing reads those logits.
//!
//! Regenerate: `/var/tmp/masklm-venv/bin/python scripts/make_reference.py --only modernbert`.

mod common;

use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Int, Tensor, TensorData};
use common::{Reference, transpose, values};
use masklm_model::modernbert::ModernBertForMaskedLM;
use masklm_model::{AttentionImpl, ModernBertConfig, mlm_loss};

const FIXTURES: [&str; 2] = ["modernbert-tiny", "modernbert-tiny-old"];
const ATTENTION: [AttentionImpl; 2] = [AttentionImpl::Auto, AttentionImpl::Eager];

fn load(name: &str, device: &Device) -> (ModernBertConfig, ModernBertForMaskedLM) {
    let (config, model, report) =
        masklm_hub::load_modernbert(&common::fixture(name), device).expect("fixture loads");
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
    (config, model)
}

/// The fixture model without dropout (the reference was taken in eval mode).
fn load_without_dropout(name: &str, device: &Device) -> ModernBertForMaskedLM {
    let dir = common::fixture(name);
    let mut config = masklm_hub::read_modernbert_config(&dir).unwrap();
    config.embedding_dropout = 0.0;
    config.attention_dropout = 0.0;
    config.mlp_dropout = 0.0;
    let mut model = ModernBertForMaskedLM::new(&config, device).unwrap();
    masklm_hub::load_modernbert_weights(&mut model, &dir).unwrap();
    model
}

/// Largest |a - b| over the elements where `keep` is true, and the largest |b| there.
fn diff_where(ours: &[f32], reference: &[f32], keep: impl Fn(usize) -> bool) -> (f32, f32) {
    assert_eq!(ours.len(), reference.len());
    let mut diff = 0.0f32;
    let mut scale = 0.0f32;
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        if keep(i) {
            diff = diff.max((a - b).abs());
            scale = scale.max(b.abs());
        }
    }
    (diff, scale)
}

/// Whether flat logit element `i` of a `[batch, seq, vocab]` tensor is at a real token.
fn at_token<'a>(mask: &'a [i64], vocab: usize) -> impl Fn(usize) -> bool + 'a {
    move |i| mask[i / vocab] == 1
}

#[test]
fn logits_match_transformers_at_every_token() {
    let device = Device::flex();
    for (name, attention) in FIXTURES.into_iter().flat_map(|n| ATTENTION.map(|a| (n, a))) {
        let reference = Reference::load(name);
        let (config, model) = load(name, &device);
        let model = model.with_attention(attention);
        let logits = model.forward(
            reference.int2("input_ids", &device),
            reference.int2("attention_mask", &device),
        );
        let expected = reference.f32("logits");
        assert_eq!(logits.dims().to_vec(), expected.shape, "{name}");
        let mask = reference.i64("attention_mask").data;
        let ours = values(logits);
        let (diff, scale) = diff_where(&ours, &expected.data, at_token(&mask, config.vocab_size));
        let (pad_diff, _) = diff_where(&ours, &expected.data, |i| {
            !at_token(&mask, config.vocab_size)(i)
        });
        println!(
            "{name} {attention:?}: logits max abs diff {diff:e} (relative to the largest logit \
             {:e}); at pads {pad_diff:e}",
            diff / scale
        );
        assert!(
            ours.iter().all(|v| v.is_finite()),
            "{name}: non-finite logits"
        );
        assert!(
            diff <= 1e-5 * scale,
            "{name} {attention:?}: logits differ from transformers by {diff} (largest {scale})"
        );
    }
}

#[test]
fn masked_loss_matches_transformers_and_forward_at_is_forward() {
    let device = Device::flex();
    for name in FIXTURES {
        let reference = Reference::load(name);
        let (config, model) = load(name, &device);
        let (positions, labels) = common::masked(&reference, &device);
        let ids = reference.int2("input_ids", &device);
        let mask = reference.int2("attention_mask", &device);
        let picked = model.forward_at(ids.clone(), mask.clone(), positions.clone());
        let loss = values(mlm_loss(picked.clone(), labels))[0];
        let expected = reference.f32("loss").data[0];
        println!(
            "{name}: loss {loss} vs transformers {expected} (diff {:e})",
            (loss - expected).abs()
        );
        assert!(
            (loss - expected).abs() <= 1e-5 * expected.abs(),
            "{name}: loss {loss} vs transformers {expected}"
        );

        // forward_at is forward at the picked flat positions.
        let [batch, seq] = ids.dims();
        let full = model
            .forward(ids, mask)
            .reshape([batch * seq, config.vocab_size])
            .select(0, positions);
        let diff = common::max_abs_diff(&values(picked), &values(full));
        assert!(
            diff <= 1e-5,
            "{name}: forward_at differs from forward by {diff}"
        );
    }
}

#[test]
fn gradients_match_transformers() {
    let device = Device::flex().autodiff();
    for (name, attention) in FIXTURES.into_iter().flat_map(|n| ATTENTION.map(|a| (n, a))) {
        let reference = Reference::load(name);
        let model = load_without_dropout(name, &device).with_attention(attention);
        let (positions, labels) = common::masked(&reference, &device);
        let logits = model.forward_at(
            reference.int2("input_ids", &device),
            reference.int2("attention_mask", &device),
            positions,
        );
        let grads = mlm_loss(logits, labels).backward();

        let check = |hf_name: &str, ours: Tensor<2>, linear: bool| {
            let grad = ours.grad(&grads).expect("parameter has a gradient");
            let [rows, cols] = grad.dims();
            let mut got = values(grad);
            if linear {
                // burn Linear weights are [in, out]; HF's are [out, in].
                got = transpose(&got, rows, cols);
            }
            compare(name, attention, hf_name, &got, &reference);
        };
        let check_1d = |hf_name: &str, ours: Option<&Param<Tensor<1>>>| {
            let Some(ours) = ours else { return };
            let grad = ours.val().grad(&grads).expect("parameter has a gradient");
            compare(name, attention, hf_name, &values(grad), &reference);
        };
        let layers = &model.model.layers;
        // The token-embedding gradient includes the decoder's share: the tie is structural.
        check(
            "model.embeddings.tok_embeddings.weight",
            model.word_embeddings(),
            false,
        );
        check(
            "model.layers.1.attn.Wqkv.weight",
            layers[1].attn.Wqkv.weight.val(),
            true,
        );
        check(
            "model.layers.1.attn.Wo.weight",
            layers[1].attn.Wo.weight.val(),
            true,
        );
        check(
            "model.layers.1.mlp.Wi.weight",
            layers[1].mlp.Wi.weight.val(),
            true,
        );
        check(
            "model.layers.0.mlp.Wo.weight",
            layers[0].mlp.Wo.weight.val(),
            true,
        );
        check(
            "model.layers.3.attn.Wqkv.weight",
            layers[3].attn.Wqkv.weight.val(),
            true,
        );
        check("head.dense.weight", model.head.dense.weight.val(), true);
        check_1d(
            "model.final_norm.weight",
            Some(&model.model.final_norm.gamma),
        );
        check_1d("head.norm.weight", Some(&model.head.norm.gamma));
        check_1d("decoder.bias", model.decoder.bias.as_ref());
    }
}

/// Asserts a gradient within 1e-4 of transformers', relative to its largest element.
fn compare(
    name: &str,
    attention: AttentionImpl,
    hf_name: &str,
    got: &[f32],
    reference: &Reference,
) {
    let expected = reference.f32(&format!("grad.{hf_name}"));
    let (diff, scale) = diff_where(got, &expected.data, |_| true);
    println!(
        "{name} {attention:?}: gradient of {hf_name} max abs diff {diff:e}, relative {:e}",
        diff / scale
    );
    assert!(
        diff <= 1e-4 * scale,
        "{name} {attention:?}: gradient of {hf_name} differs by {diff} (largest {scale})"
    );
}

#[test]
fn both_config_spellings_resolve_as_transformers_does() {
    let new = masklm_hub::read_modernbert_config(&common::fixture("modernbert-tiny")).unwrap();
    let old = masklm_hub::read_modernbert_config(&common::fixture("modernbert-tiny-old")).unwrap();
    let describe = |c: &ModernBertConfig| {
        c.layers()
            .iter()
            .map(|l| (l.half_window, l.rope_theta))
            .collect::<Vec<_>>()
    };
    // layer_types ["full", "sliding", "sliding", "full"]; thetas 1000 / 300 in the new file.
    assert_eq!(
        describe(&new),
        [
            (None, 1000.0),
            (Some(4), 300.0),
            (Some(4), 300.0),
            (None, 1000.0)
        ]
    );
    // global_attn_every_n_layers 3, global_rope_theta 20000, local_rope_theta absent: 10000.
    assert_eq!(
        describe(&old),
        [
            (None, 20000.0),
            (Some(4), 10000.0),
            (Some(4), 10000.0),
            (None, 20000.0)
        ]
    );
    // Resolved into transformers 5's spelling on reading.
    assert!(old.layer_types.is_some() && old.global_rope_theta.is_none());
}

#[test]
fn half_precision_pytorch_model_bin_is_upcast() {
    let (_, _, report) =
        masklm_hub::load_modernbert(&common::fixture("modernbert-tiny-old"), &Device::flex())
            .unwrap();
    assert!(report.weights.ends_with("pytorch_model.bin"));
    assert_eq!(report.stored_dtypes, ["BF16"]);
    // The tied decoder.weight the .bin carries is expected, not reported.
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
}

fn tensor_names(path: &Path) -> std::collections::BTreeSet<String> {
    let bytes = std::fs::read(path).unwrap();
    safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(str::to_string)
        .collect()
}

#[test]
fn export_loads_back_and_in_transformers() {
    let device = Device::flex();
    for name in FIXTURES {
        let fixture = common::fixture(name);
        let reference = Reference::load(name);
        let (config, model) = load(name, &device);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("export");
        masklm_hub::export_modernbert(&model, &config, Some(&fixture), &out).unwrap();
        if name == "modernbert-tiny" {
            // Exactly the tensor names transformers itself saved.
            assert_eq!(
                tensor_names(&out.join("model.safetensors")),
                tensor_names(&fixture.join("model.safetensors"))
            );
            assert!(out.join("tokenizer.json").is_file());
        }
        let exported: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(exported["model_type"], "modernbert");
        assert_eq!(exported["architectures"][0], "ModernBertForMaskedLM");
        assert!(exported["layer_types"].is_array(), "{exported}");
        assert!(exported.get("global_rope_theta").is_none(), "{exported}");

        let (reloaded_config, reloaded) = load_export(&out, &device);
        assert_eq!(reloaded_config, config);
        let ids = reference.int2("input_ids", &device);
        let mask = reference.int2("attention_mask", &device);
        let a = values(model.forward(ids.clone(), mask.clone()));
        let b = values(reloaded.forward(ids, mask));
        assert_eq!(common::max_abs_diff(&a, &b), 0.0, "{name}");

        check_in_transformers(name, &out);
    }
}

fn load_export(out: &Path, device: &Device) -> (ModernBertConfig, ModernBertForMaskedLM) {
    let (config, model, report) = masklm_hub::load_modernbert(out, device).unwrap();
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
    assert_eq!(report.stored_dtypes, ["F32"]);
    (config, model)
}

/// transformers' `AutoModelForMaskedLM` on the export: a ModernBertForMaskedLM with no
/// missing or unexpected keys, giving the fixture's reference logits at every token.
fn check_in_transformers(name: &str, out: &Path) {
    let Some(python) = common::reference_python("transformers, torch") else {
        return;
    };
    let script = r#"
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM
out, reference = sys.argv[1], sys.argv[2]
model, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
problems = {k: v for k, v in info.items() if v}
assert not problems, problems
assert type(model).__name__ == "ModernBertForMaskedLM", type(model).__name__
assert model.decoder.weight.data_ptr() == model.model.embeddings.tok_embeddings.weight.data_ptr(), "untied"
batch = load_file(reference)
with torch.no_grad():
    logits = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
real = batch["attention_mask"].bool()
diff = (logits - batch["logits"])[real].abs().max().item()
print(f"transformers on the export: max abs diff {diff:e}")
assert diff <= 1e-5 * batch["logits"][real].abs().max().item(), diff
print("EXPORT_CHECK ok")
"#;
    let result = std::process::Command::new(&python)
        .args(["-c", script])
        .arg(out)
        .arg(common::fixture(name).join("reference.safetensors"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&result.stdout);
    println!("{name}: {stdout}");
    assert!(
        result.status.success() && stdout.contains("EXPORT_CHECK ok"),
        "{name}: {stdout}{}",
        String::from_utf8_lossy(&result.stderr)
    );
}

/// A copy of the `modernbert-tiny` fixture's config and weights in `dir`, config edited by
/// `edit`.
fn edited_copy(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let fixture = common::fixture("modernbert-tiny");
    std::fs::copy(
        fixture.join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap())
            .unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

#[test]
fn config_and_weight_errors_name_the_key_and_file() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    edited_copy(dir.path(), |c| c["hidden_activation"] = "swish".into());
    let msg = masklm_hub::load_modernbert(dir.path(), &device)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("hidden_activation") && msg.contains("swish") && msg.contains("config.json"),
        "{msg}"
    );

    // A weights file without the embedding norm.
    let dir = tempfile::tempdir().unwrap();
    edited_copy(dir.path(), |_| {});
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = file
        .tensors()
        .into_iter()
        .filter(|(name, _)| name != "model.embeddings.norm.weight")
        .collect();
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    safetensors::serialize_to_file(kept, metadata, &path).unwrap();
    let msg = masklm_hub::load_modernbert(dir.path(), &device)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("model.embeddings.norm.weight") && msg.contains("model.safetensors"),
        "{msg}"
    );

    // Not a ModernBERT folder.
    let msg = masklm_hub::load_modernbert(&common::fixture("roberta-tiny"), &device)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("roberta"), "{msg}");
}

#[test]
fn with_new_rows_grows_embeddings_and_decoder_bias_alike() {
    let device = Device::flex();
    let (config, model) = load("modernbert-tiny", &device);
    let before_bias = values(model.decoder.bias.as_ref().unwrap().val());
    let before = values(model.word_embeddings());
    let grown = model.with_new_rows(&[vec![10, 20], vec![7]]);
    let v = config.vocab_size;
    let h = config.hidden_size;
    let after = values(grown.word_embeddings());
    assert_eq!(after.len(), (v + 2) * h);
    assert_eq!(after[..v * h], before[..]);
    for j in 0..h {
        let mean = (before[10 * h + j] + before[20 * h + j]) / 2.0;
        assert!((after[v * h + j] - mean).abs() < 1e-6);
        assert_eq!(after[(v + 1) * h + j], before[7 * h + j]);
    }
    let bias = values(grown.decoder.bias.as_ref().unwrap().val());
    assert_eq!(bias.len(), v + 2);
    assert!((bias[v] - (before_bias[10] + before_bias[20]) / 2.0).abs() < 1e-6);
    // The grown model runs and predicts over the grown vocabulary.
    let ids =
        Tensor::<2, Int>::from_data(TensorData::new(vec![796i64, 10, 800, 797], [1, 4]), &device);
    let logits = grown.forward(ids, Tensor::ones([1, 4], &device));
    assert_eq!(logits.dims(), [1, 4, v + 2]);
}

/// The fixture tokenizer through masklm's loader, against transformers' AutoTokenizer and
/// `pipeline("fill-mask")` (fill_mask_reference.json). The fill-mask CLI (crates/train's
/// fill.rs) is RoBERTa-typed until the family seam lands, so the top-k is computed here from
/// ModernBertForMaskedLM's logits.
#[test]
fn tokenizer_and_fill_mask_match_transformers() {
    let dir = common::fixture("modernbert-tiny");
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("fill_mask_reference.json")).unwrap(),
    )
    .unwrap();
    let tokenizer = masklm_data::load_tokenizer(&dir).unwrap();
    let id = |key: &str| reference[key].as_u64().unwrap() as u32;
    assert_eq!(tokenizer.mask_id, id("mask_token_id"));
    assert_eq!(tokenizer.pad_id, id("pad_token_id"));
    assert_eq!(tokenizer.bos_id, id("cls_token_id"));
    assert_eq!(tokenizer.eos_id, id("sep_token_id"));
    assert_eq!(tokenizer.mask_token, "[MASK]");

    let device = Device::flex();
    let (config, model) = load("modernbert-tiny", &device);
    assert_eq!(tokenizer.vocab_size(), config.vocab_size);
    let sentences = reference["sentences"].as_array().unwrap();
    for (i, sentence) in sentences.iter().enumerate() {
        let sentence = sentence.as_str().unwrap();
        let ids = tokenizer.encode(sentence).unwrap();
        let expected: Vec<u32> = reference["input_ids"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, expected, "{sentence}");

        let n = ids.len();
        let input = Tensor::<2, Int>::from_data(
            TensorData::new(ids.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, n]),
            &device,
        );
        let probs = values(burn::tensor::activation::softmax(
            model.forward(input, Tensor::ones([1, n], &device)),
            2,
        ));
        let masks: Vec<usize> = (0..n).filter(|&p| ids[p] == tokenizer.mask_id).collect();
        // One mask: a flat list of candidates; several: a list per mask, as the pipeline.
        let outputs = &reference["outputs"][i];
        let per_mask: Vec<&serde_json::Value> = if masks.len() == 1 {
            vec![outputs]
        } else {
            outputs.as_array().unwrap().iter().collect()
        };
        assert_eq!(per_mask.len(), masks.len(), "{sentence}");
        for (&position, theirs) in masks.iter().zip(per_mask) {
            let row = &probs[position * config.vocab_size..(position + 1) * config.vocab_size];
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            for (rank, candidate) in theirs.as_array().unwrap().iter().enumerate() {
                let token = candidate["token"].as_u64().unwrap() as usize;
                let score = candidate["score"].as_f64().unwrap();
                assert_eq!(order[rank], token, "{sentence}: rank {rank}");
                let diff = (f64::from(row[token]) - score).abs();
                assert!(diff <= 1e-5, "{sentence}: score differs by {diff}");
            }
        }
    }
}
