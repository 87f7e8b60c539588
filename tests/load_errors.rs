//! Broken checkpoint folders each give a one-line error naming the problem.
//!
//! Each test copies the `roberta-tiny` fixture (made by `scripts/make_reference.py`) into a
//! temporary folder and breaks one thing.

mod common;

use std::path::Path;

use burn::tensor::Device;
use masklm_hub::{HubError, load_roberta};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn copy_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(
            common::fixture("roberta-tiny").join(file),
            dir.path().join(file),
        )
        .unwrap();
    }
    dir
}

fn load_error(dir: &Path) -> HubError {
    match load_roberta(dir, &Device::flex()) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e,
    }
}

/// Rewrites `model.safetensors` with `edit` applied to the list of (name, dtype, shape, bytes).
fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, t.shape().to_vec(), t.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            (
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

#[test]
fn wrong_shaped_tensor_names_tensor_and_shapes() {
    let dir = copy_fixture();
    rewrite_weights(dir.path(), |tensors| {
        let t = tensors
            .iter_mut()
            .find(|(name, ..)| name == "roberta.encoder.layer.1.intermediate.dense.bias")
            .unwrap();
        t.1 = vec![64];
        t.2.truncate(64 * 4);
    });
    let msg = load_error(dir.path()).to_string();
    assert!(
        msg.contains("roberta.encoder.layer.1.intermediate.dense.bias")
            && msg.contains("[64]")
            && msg.contains("[128]"),
        "{msg}"
    );
    assert_eq!(msg.lines().count(), 1, "{msg}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture();
    rewrite_weights(dir.path(), |tensors| {
        tensors.retain(|(name, ..)| name != "roberta.encoder.layer.0.attention.self.key.weight");
    });
    let msg = load_error(dir.path()).to_string();
    assert!(
        msg.contains("missing tensor roberta.encoder.layer.0.attention.self.key.weight"),
        "{msg}"
    );
    assert_eq!(msg.lines().count(), 1, "{msg}");
}

#[test]
fn heads_not_dividing_hidden_size_names_the_key() {
    let dir = copy_fixture();
    let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    // hidden_size 30 with the fixture's num_attention_heads 4.
    assert!(config.contains("\"num_attention_heads\": 4"));
    let config = config.replace("\"hidden_size\": 64", "\"hidden_size\": 30");
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let msg = load_error(dir.path()).to_string();
    assert!(
        msg.contains("config.json")
            && msg.contains("invalid `hidden_size`")
            && msg.contains("num_attention_heads (4)"),
        "{msg}"
    );
}

#[test]
fn truncated_safetensors_says_so() {
    let dir = copy_fixture();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_error(dir.path()).to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("truncated"),
        "{msg}"
    );
    assert_eq!(msg.lines().count(), 1, "{msg}");
}

#[test]
fn folder_without_config_or_weights() {
    let dir = copy_fixture();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let msg = load_error(dir.path()).to_string();
    assert!(
        msg.contains("no model.safetensors, model.safetensors.index.json or pytorch_model.bin"),
        "{msg}"
    );

    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let msg = load_error(dir.path()).to_string();
    assert!(msg.contains("no config.json"), "{msg}");

    let msg = load_error(&dir.path().join("absent")).to_string();
    assert!(msg.contains("no such checkpoint folder"), "{msg}");

    let file = dir.path().join("tokenizer.json");
    std::fs::write(&file, "{}").unwrap();
    let msg = load_error(&file).to_string();
    assert!(
        msg.contains("tokenizer.json: a file, not a model folder"),
        "{msg}"
    );
}

#[test]
fn unknown_model_type_is_rejected() {
    let dir = copy_fixture();
    let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        config.replace("\"model_type\": \"roberta\"", "\"model_type\": \"gpt2\""),
    )
    .unwrap();
    let msg = load_error(dir.path()).to_string();
    assert!(
        msg.contains("model_type \"gpt2\" is not supported"),
        "{msg}"
    );
}

#[test]
fn extra_tensors_are_reported_not_fatal() {
    let dir = copy_fixture();
    rewrite_weights(dir.path(), |tensors| {
        tensors.push(("classifier.weight".to_string(), vec![2], vec![0; 8]));
        // Expected extras are not reported: the tied decoder weight.
        let emb = tensors
            .iter()
            .find(|(n, ..)| n == "roberta.embeddings.word_embeddings.weight")
            .unwrap()
            .clone();
        tensors.push(("lm_head.decoder.weight".to_string(), emb.1, emb.2));
    });
    let (_, _, report) = load_roberta(dir.path(), &Device::flex()).unwrap();
    assert_eq!(report.unexpected, vec!["classifier.weight".to_string()]);
}

/// Rewrites `model.safetensors` with every tensor stored as `dtype` (F16, BF16 or F64), as
/// many Hub checkpoints are.
fn store_as(dir: &Path, dtype: Dtype) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let values = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            let data: Vec<u8> = match dtype {
                Dtype::F16 => values
                    .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
                    .collect(),
                Dtype::BF16 => values
                    .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
                    .collect(),
                Dtype::F64 => values.flat_map(|v| (v as f64).to_le_bytes()).collect(),
                other => panic!("{other:?}"),
            };
            (name, t.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            (
                name.clone(),
                TensorView::new(dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

#[test]
fn half_precision_and_f64_weights_load_as_f32() {
    let device = Device::flex();
    let (_, reference, _) = load_roberta(&common::fixture("roberta-tiny"), &device).unwrap();
    let ids = burn::tensor::Tensor::<2, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(vec![0i64, 40, 4, 300, 77, 2], [1, 6]),
        &device,
    );
    let mask = burn::tensor::Tensor::<2, burn::tensor::Int>::ones([1, 6], &device);
    let expected = common::values(reference.forward(ids.clone(), mask.clone()));
    for (dtype, name, tolerance) in [
        (Dtype::F16, "F16", 2e-2),
        (Dtype::BF16, "BF16", 1e-1),
        (Dtype::F64, "F64", 1e-6),
    ] {
        let dir = copy_fixture();
        store_as(dir.path(), dtype);
        let (_, model, report) =
            load_roberta(dir.path(), &device).unwrap_or_else(|e| panic!("{name} weights: {e}"));
        assert_eq!(report.stored_dtypes, [name]);
        let weight = model.roberta.encoder.layer[0].output.LayerNorm.gamma.val();
        assert_eq!(weight.dtype(), burn::tensor::DType::F32, "{name}");
        // The forward used to panic in layer_norm on half-precision gammas.
        let logits = common::values(model.forward(ids.clone(), mask.clone()));
        let diff = common::max_abs_diff(&logits, &expected);
        assert!(
            diff <= tolerance,
            "{name}: logits {diff} from the f32 weights'"
        );
    }
}

#[test]
fn absurd_configs_are_refused_before_anything_is_allocated() {
    for (edit, key) in [
        (
            ("\"vocab_size\": 1000", "\"vocab_size\": 1000000000"),
            "vocab_size",
        ),
        (
            ("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1000000"),
            "num_hidden_layers",
        ),
        // Plausible on its own, but the weights hold 2 layers.
        (
            ("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 200"),
            "200",
        ),
        (
            ("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 2.5"),
            "num_hidden_layers",
        ),
    ] {
        let dir = copy_fixture();
        let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
        assert!(config.contains(edit.0), "fixture config lacks {}", edit.0);
        std::fs::write(
            dir.path().join("config.json"),
            config.replace(edit.0, edit.1),
        )
        .unwrap();
        let msg = load_error(dir.path()).to_string();
        assert!(
            msg.contains(key) && msg.contains("config.json"),
            "{}: {msg}",
            edit.1
        );
        assert_eq!(msg.lines().count(), 1, "{msg}");
    }
}
