//! The model against transformers' `RobertaForMaskedLM` on the same weights and batch.
//!
//! Fixtures: `tests/fixtures/roberta-tiny{,-b}/`, written by `scripts/make_reference.py`
//! (transformers and torch versions in `tests/fixtures/VERSIONS.json`). Regenerate with
//! `/var/tmp/masklm-venv/bin/python scripts/make_reference.py` after installing
//! `scripts/requirements.txt` into that venv.

mod common;

use burn::tensor::{Device, Tensor};
use common::{Reference, max_abs_diff, transpose, values};
use masklm_model::{AttentionImpl, RobertaForMaskedLM, mlm_loss};

const FIXTURES: [&str; 4] = ["roberta-tiny", "roberta-tiny-b", "xlmr-tiny", "bert-tiny"];

/// Both attention paths: fused (`Auto` without live dropout) and eager.
const ATTENTION: [AttentionImpl; 2] = [AttentionImpl::Auto, AttentionImpl::Eager];

fn load(name: &str, device: &Device) -> RobertaForMaskedLM {
    let (_, model, report) =
        masklm_hub::load_roberta(&common::fixture(name), device).expect("fixture loads");
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
    model
}

#[test]
fn logits_match_transformers() {
    let device = Device::flex();
    for (name, attention) in FIXTURES.into_iter().flat_map(|n| ATTENTION.map(|a| (n, a))) {
        let reference = Reference::load(name);
        let model = load(name, &device).with_attention(attention);
        let logits = model.forward(
            reference.int2("input_ids", &device),
            reference.int2("attention_mask", &device),
        );
        let expected = reference.f32("logits");
        assert_eq!(logits.dims().to_vec(), expected.shape, "{name}");
        let diff = max_abs_diff(&values(logits), &expected.data);
        println!("{name} {attention:?}: logits max abs diff {diff:e}");
        assert!(
            diff <= 1e-4,
            "{name} {attention:?}: logits differ from transformers by {diff}"
        );
    }
}

#[test]
fn pytorch_model_bin_loads_the_same_weights() {
    // tests/fixtures/roberta-tiny-b-bin: roberta-tiny-b saved with torch.save.
    let device = Device::flex();
    let reference = Reference::load("roberta-tiny-b");
    let model = load("roberta-tiny-b-bin", &device);
    let logits = model.forward(
        reference.int2("input_ids", &device),
        reference.int2("attention_mask", &device),
    );
    let diff = max_abs_diff(&values(logits), &reference.f32("logits").data);
    assert!(diff <= 1e-4, "pytorch_model.bin logits differ by {diff}");
}

#[test]
fn masked_loss_matches_transformers() {
    let device = Device::flex();
    for name in FIXTURES {
        let reference = Reference::load(name);
        let model = load(name, &device);
        let (positions, labels) = common::masked(&reference, &device);
        let logits = model.forward_at(
            reference.int2("input_ids", &device),
            reference.int2("attention_mask", &device),
            positions,
        );
        let loss = values(mlm_loss(logits, labels))[0];
        let expected = reference.f32("loss").data[0];
        println!("{name}: loss {loss} vs transformers {expected}");
        assert!(
            (loss - expected).abs() <= 1e-5,
            "{name}: loss {loss} vs transformers {expected}"
        );
    }
}

#[test]
fn gradients_match_transformers() {
    // The reference gradients were taken in eval mode; on an autodiff device burn's dropout
    // is live, so build the model with dropout 0 and load the same weights.
    let device = Device::flex().autodiff();
    for (name, attention) in FIXTURES.into_iter().flat_map(|n| ATTENTION.map(|a| (n, a))) {
        let reference = Reference::load(name);
        let (model, loss) = common::fixture_loss_using(name, &device, attention);
        let grads = loss.backward();

        let check = |hf_name: &str, ours: Tensor<2>, hf_layout_transposed: bool| {
            let grad = ours.grad(&grads).expect("parameter has a gradient");
            let [rows, cols] = grad.dims();
            let mut got = values(grad);
            if hf_layout_transposed {
                // burn Linear weights are [in, out]; HF's are [out, in].
                got = transpose(&got, rows, cols);
            }
            // The BERT fixture stores its gradients under BERT's names.
            let key = if name.starts_with("bert") {
                hf_name
                    .replace("roberta.", "bert.")
                    .replace("lm_head.dense.", "cls.predictions.transform.dense.")
            } else {
                hf_name.to_string()
            };
            let expected = reference.f32(&format!("grad.{key}"));
            let diff = max_abs_diff(&got, &expected.data);
            println!("{name} {attention:?}: gradient of {hf_name} max abs diff {diff:e}");
            assert!(
                diff <= 1e-4,
                "{name} {attention:?}: gradient of {hf_name} differs by {diff}"
            );
        };
        // The word-embedding gradient includes the decoder's share: the tie is structural.
        check(
            "roberta.embeddings.word_embeddings.weight",
            model.roberta.embeddings.word_embeddings.weight.val(),
            false,
        );
        check(
            "roberta.encoder.layer.0.attention.self.query.weight",
            model.roberta.encoder.layer[0]
                .attention
                .self_attn
                .query
                .weight
                .val(),
            true,
        );
        check(
            "lm_head.dense.weight",
            model.lm_head.dense.weight.val(),
            true,
        );
    }
}
