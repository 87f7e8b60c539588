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
        msg.contains("no model.safetensors or pytorch_model.bin"),
        "{msg}"
    );

    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let msg = load_error(dir.path()).to_string();
    assert!(msg.contains("no config.json"), "{msg}");

    let msg = load_error(&dir.path().join("absent")).to_string();
    assert!(msg.contains("no such checkpoint folder"), "{msg}");
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
