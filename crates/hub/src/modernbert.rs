//! ModernBERT checkpoint folders (`model_type: "modernbert"`, `ModernBertForMaskedLM`).
//!
//! The model's module paths are transformers' weight keys, so the key map is burn's own and
//! nothing else:
//!
//! | HF key                                  | masklm module path                         |
//! |-----------------------------------------|--------------------------------------------|
//! | `*norm.weight` / `*norm.bias` (LayerNorm) | `*norm.gamma` / `*norm.beta` (`PyTorchToBurnAdapter`) |
//! | Linear `weight` `[out, in]`             | `weight` `[in, out]` (transposed by the same adapter) |
//! | `decoder.weight` (tied)                 | not stored: the decoder is `model.embeddings.tok_embeddings` |
//!
//! Layer 0 has no `attn_norm` (transformers' `nn.Identity`), and without `norm_bias`,
//! `attention_bias`, `mlp_bias`, `classifier_bias` or `decoder_bias` the matching biases are
//! absent from both the file and the model. A file that carries the tied `decoder.weight`
//! (older checkpoints, `torch.save` of a state dict) loads without a warning.

use std::path::Path;

use burn::store::KeyRemapper;
use burn::tensor::Device;
use masklm_model::{ModernBertConfig, ModernBertForMaskedLM};

use crate::{
    HubError, LoadReport, WeightNames, config_path, read_weights, save_safetensors, weight_shapes,
    weights_of, write_folder,
};

/// Module path -> HF key: burn's LayerNorm names back to PyTorch's.
fn hf_name(path: &str) -> String {
    for (burn, torch) in [(".gamma", ".weight"), (".beta", ".bias")] {
        if let Some(stem) = path.strip_suffix(burn)
            && stem.ends_with("norm")
        {
            return format!("{stem}{torch}");
        }
    }
    path.to_string()
}

/// Tensors a ModernBERT file may carry that the model does not hold: the tied decoder weight.
fn is_expected_extra(name: &str) -> bool {
    name == "decoder.weight"
}

/// Reads and validates `DIR/config.json`, which must be a ModernBERT config (either spelling
/// of its attention pattern, see [`ModernBertConfig`]).
pub fn read_modernbert_config(dir: &Path) -> Result<ModernBertConfig, HubError> {
    let path = config_path(dir)?;
    let config = ModernBertConfig::from_file(&path)?;
    if config.model_type != "modernbert" {
        return Err(HubError::UnsupportedModelType {
            path,
            model_type: config.model_type.clone(),
        });
    }
    Ok(config)
}

/// Checks config.json against the folder's weights file (its header) and the memory
/// available, before any model is allocated: the layer count and the token-embedding shape
/// must match.
pub fn check_modernbert_weights(config: &ModernBertConfig, dir: &Path) -> Result<(), HubError> {
    let weights = weights_of(dir)?;
    let tensors = weight_shapes(&weights)?;
    let file = weights.path;
    let layers = tensors
        .iter()
        .filter_map(|(name, _)| {
            let rest = name.strip_prefix("model.layers.")?;
            rest.split('.').next()?.parse::<usize>().ok()
        })
        .max()
        .map_or(0, |last| last + 1);
    if layers > 0 && layers != config.num_hidden_layers {
        return Err(HubError::ConfigMismatch {
            path: file,
            reason: format!(
                "config.json says num_hidden_layers {} but the weights hold {layers} layers",
                config.num_hidden_layers
            ),
        });
    }
    let embeddings = "model.embeddings.tok_embeddings.weight";
    if let Some((_, shape)) = tensors.iter().find(|(name, _)| name == embeddings) {
        let expected = [config.vocab_size, config.hidden_size];
        if shape[..] != expected {
            return Err(HubError::ShapeMismatch {
                path: file,
                name: embeddings.to_string(),
                expected: expected.to_vec(),
                found: shape.clone(),
            });
        }
    }
    config.check_memory().map_err(|source| HubError::Memory {
        path: dir.join("config.json"),
        source,
    })
}

/// Loads a `ModernBertForMaskedLM` checkpoint folder (`model.safetensors`, its shards, or
/// `pytorch_model.bin`, f32/f16/bf16 weights upcast to f32) onto `device`.
pub fn load_modernbert(
    dir: &Path,
    device: &Device,
) -> Result<(ModernBertConfig, ModernBertForMaskedLM, LoadReport), HubError> {
    let config = read_modernbert_config(dir)?;
    check_modernbert_weights(&config, dir)?;
    let mut model = ModernBertForMaskedLM::new(&config, device)?;
    let report = load_modernbert_weights(&mut model, dir)?;
    Ok((config, model, report))
}

/// Loads the weights of the checkpoint folder `dir` into `model`, whose shapes come from the
/// folder's config.json (for example built with dropout changed).
pub fn load_modernbert_weights(
    model: &mut ModernBertForMaskedLM,
    dir: &Path,
) -> Result<LoadReport, HubError> {
    let names = WeightNames {
        remapper: KeyRemapper::new(),
        hf_name: &hf_name,
        expected_extra: &is_expected_extra,
    };
    read_weights(model, dir, &names)
}

/// Writes `model` as a Hugging Face folder that `AutoModelForMaskedLM.from_pretrained(out)`
/// loads as `ModernBertForMaskedLM` with no missing or unexpected keys: `config.json` in
/// transformers 5's spelling, `model.safetensors` with HF names and layouts (without the tied
/// `decoder.weight`, as transformers saves it), and the tokenizer files found in
/// `tokenizer_dir`, which must be another folder than `out`.
pub fn export_modernbert(
    model: &ModernBertForMaskedLM,
    config: &ModernBertConfig,
    tokenizer_dir: Option<&Path>,
    out: &Path,
) -> Result<(), HubError> {
    let mut config = config.clone();
    config.model_type = "modernbert".to_string();
    config.architectures = vec!["ModernBertForMaskedLM".to_string()];
    let max_tokens = config.max_sequence_length();
    write_folder(
        &config.to_json(),
        max_tokens,
        tokenizer_dir,
        out,
        |weights| save_safetensors(model, KeyRemapper::new(), weights),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_use_the_hub_names() {
        assert_eq!(hf_name("model.final_norm.gamma"), "model.final_norm.weight");
        assert_eq!(
            hf_name("model.layers.1.attn_norm.beta"),
            "model.layers.1.attn_norm.bias"
        );
        assert_eq!(hf_name("head.dense.weight"), "head.dense.weight");
        assert_eq!(hf_name("decoder.bias"), "decoder.bias");
    }
}
