//! `RobertaForMaskedLM` in burn, mirroring `transformers/models/roberta/modeling_roberta.py`.
//!
//! Module paths are the HF weight keys (`roberta.embeddings.word_embeddings.weight`,
//! `roberta.encoder.layer.{i}.attention.self.query.weight`, ...) with two exceptions that the
//! hub crate maps: `self` is a Rust keyword, so the attention block is `self_attn`, and burn
//! calls LayerNorm parameters `gamma`/`beta` and stores Linear weights as `[in, out]`.

// HF weight keys such as `LayerNorm` are field names, and the Module derive turns them into
// local variables too.
#![allow(non_snake_case)]

use burn::module::{Module, Param};
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear};
use burn::tensor::activation::{gelu, gelu_approximate, log_softmax, relu};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Device, Distribution, FloatDType, Int, Tensor};

use std::sync::Arc;

use crate::dropout::{DropoutStream, MlmDropout};
use crate::{BatchMask, HiddenAct, RobertaConfig};

/// A Linear layer initialised as HF `_init_weights`: weight ~ N(0, initializer_range) in burn's
/// `[in, out]` layout, bias 0. Drawn eagerly, so the values come from the device the model is
/// built on (training builds on the CPU backend and then moves, see masklm-train).
fn linear(d_input: usize, d_output: usize, config: &RobertaConfig, device: &Device) -> Linear {
    Linear {
        weight: Param::from_tensor(Tensor::random(
            [d_input, d_output],
            Distribution::Normal(0.0, config.initializer_range),
            device,
        )),
        bias: Some(Param::from_tensor(Tensor::zeros([d_output], device))),
    }
}

/// An embedding table ~ N(0, initializer_range), with the `padding_idx` row zeroed as
/// `nn.Embedding(padding_idx=...)` and HF `_init_weights` leave it.
fn embedding(
    rows: usize,
    dim: usize,
    padding_idx: Option<usize>,
    config: &RobertaConfig,
    device: &Device,
) -> Embedding {
    let mut weight = Tensor::<2>::random(
        [rows, dim],
        Distribution::Normal(0.0, config.initializer_range),
        device,
    );
    if let Some(pad) = padding_idx.filter(|&pad| pad < rows) {
        weight = weight.slice_assign([pad..pad + 1, 0..dim], Tensor::zeros([1, dim], device));
    }
    Embedding {
        weight: Param::from_tensor(weight),
    }
}

/// `x` in `dtype` (burn's cast is a no-op when it already is).
pub(crate) fn cast<const D: usize>(x: Tensor<D>, dtype: DType) -> Tensor<D> {
    x.cast(FloatDType::from(dtype))
}

/// A Linear layer applied in its weight's dtype. Under mixed precision (masklm-train's
/// autocast) only Linear weights are half precision: matmuls run in bf16/f16 while
/// embeddings, LayerNorm, softmax and the loss stay in f32, as torch.autocast does.
pub(crate) fn dense<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let weight = layer.weight.val();
    let dtype = weight.dtype();
    crate::cpu_ops::linear(cast(x, dtype), weight, layer.bias.as_ref().map(|b| b.val()))
}

fn layer_norm(config: &RobertaConfig, device: &Device) -> LayerNorm {
    LayerNormConfig::new(config.hidden_size)
        .with_epsilon(config.layer_norm_eps)
        .init(device)
}

pub(crate) fn activate<const D: usize>(act: HiddenAct, x: Tensor<D>) -> Tensor<D> {
    match act {
        HiddenAct::Gelu if needs_composite_gelu(&x.device()) => {
            // 0.5 x (1 + erf(x / sqrt 2)), differentiated op by op: exact both ways.
            (x.clone().mul_scalar(std::f64::consts::FRAC_1_SQRT_2).erf() + 1.0) * x * 0.5
        }
        HiddenAct::Gelu => crate::cpu_ops::gelu(x),
        HiddenAct::GeluNew | HiddenAct::GeluPytorchTanh => gelu_approximate(x),
        HiddenAct::Relu => relu(x),
    }
}

/// Whether GELU must be built from `erf` on `device` to get the exact gradient.
///
/// burn 0.22's default `gelu_backward`, which the cubecl backends (wgpu) inherit, is the
/// derivative of the *tanh approximation* while the forward is the exact erf form; flex and
/// tch implement the exact derivative. On wgpu this put gradients ~1e-3 (relative) away from
/// transformers'. Rather than naming backends, probe once per autodiff device: the native
/// derivative at x = 1 must be Phi(1) + phi(1) = 1.0833155.
fn needs_composite_gelu(device: &Device) -> bool {
    static PROBED: std::sync::Mutex<Vec<(Device, bool)>> = std::sync::Mutex::new(Vec::new());
    if !device.is_autodiff() {
        return false;
    }
    let mut probed = PROBED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, needs)) = probed.iter().find(|(d, _)| d == device) {
        return *needs;
    }
    let x = Tensor::<1>::from_floats([1.0], device).require_grad();
    let grads = gelu(x.clone()).backward();
    let derivative = x
        .grad(&grads)
        .map(|g| g.into_scalar::<f32>())
        .unwrap_or(f32::NAN);
    let needs = (derivative - 1.083_315_5).abs() > 1e-5;
    probed.push((device.clone(), needs));
    needs
}

/// HF `create_position_ids_from_input_ids`: pads get `padding_idx`, real tokens count up from
/// `padding_idx + 1`. Positions follow `input_ids != pad`, not the attention mask.
pub fn position_ids(input_ids: Tensor<2, Int>, padding_idx: usize) -> Tensor<2, Int> {
    let not_pad = input_ids.not_equal_elem(padding_idx as i64).int();
    (not_pad.clone().cumsum(1) * not_pad) + padding_idx as i64
}

/// BERT's positions: `0..seq` for every row, padding or not (`BertEmbeddings.position_ids`).
pub fn absolute_position_ids(
    batch: usize,
    seq: usize,
    device: &burn::tensor::Device,
) -> Tensor<2, Int> {
    Tensor::<1, Int>::arange(0..seq as i64, device)
        .reshape([1, seq])
        .expand([batch, seq])
}

/// Word + position + token-type embeddings, LayerNorm, dropout (`RobertaEmbeddings`, and
/// `BertEmbeddings` when `absolute_positions`).
#[derive(Module, Debug)]
// `LayerNorm` is the HF weight key.
pub struct RobertaEmbeddings {
    pub word_embeddings: Embedding,
    pub position_embeddings: Embedding,
    pub token_type_embeddings: Embedding,
    pub LayerNorm: LayerNorm,
    pub dropout: MlmDropout,
    pub padding_idx: usize,
    /// `LayerNorm`'s epsilon (burn keeps its own private; the fused CPU kernel needs it).
    #[module(skip)]
    pub layer_norm_eps: f64,
    /// BERT: positions `0..seq`; RoBERTa: [`position_ids`] from `padding_idx + 1`.
    pub absolute_positions: bool,
}

impl RobertaEmbeddings {
    pub fn new(config: &RobertaConfig, stream: &Arc<DropoutStream>, device: &Device) -> Self {
        let pad = Some(config.pad_token_id);
        // BERT has no padding row in its position table.
        let position_pad = (!config.is_bert()).then_some(config.pad_token_id);
        Self {
            word_embeddings: embedding(config.vocab_size, config.hidden_size, pad, config, device),
            position_embeddings: embedding(
                config.max_position_embeddings,
                config.hidden_size,
                position_pad,
                config,
                device,
            ),
            token_type_embeddings: embedding(
                config.type_vocab_size,
                config.hidden_size,
                None,
                config,
                device,
            ),
            LayerNorm: layer_norm(config, device),
            dropout: MlmDropout::new(config.hidden_dropout_prob, stream),
            padding_idx: config.pad_token_id,
            absolute_positions: config.is_bert(),
            layer_norm_eps: config.layer_norm_eps,
        }
    }

    /// Positions restart at each packed document (its ids are those it gets alone).
    ///
    /// # Shapes
    /// - `input_ids`, `token_type_ids`: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        token_type_ids: Tensor<2, Int>,
        mask: &BatchMask,
    ) -> Tensor<3> {
        let pad = self.padding_idx as i64;
        let packed = match self.absolute_positions {
            true => mask.document_positions(0, 0),
            false => mask.document_positions(pad + 1, pad),
        };
        let positions = match packed {
            Some(positions) => positions,
            None if self.absolute_positions => {
                let [batch, seq] = input_ids.dims();
                absolute_position_ids(batch, seq, &input_ids.device())
            }
            None => position_ids(input_ids.clone(), self.padding_idx),
        };
        let x = self.word_embeddings.forward(input_ids)
            + self.token_type_embeddings.forward(token_type_ids)
            + self.position_embeddings.forward(positions);
        self.dropout.forward(crate::cpu_ops::layer_norm(
            &self.LayerNorm,
            self.layer_norm_eps,
            x,
        ))
    }
}

/// How self-attention is computed: HF's `attn_implementation`. On the CPU backend (flex, f32)
/// neither applies: masklm's own fused kernel (`cpu_ops::attention`, eager semantics with
/// dropout) runs for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionImpl {
    /// The backend's fused kernel (burn's `attention`: flash attention in CubeCL, SDPA in
    /// libtorch, a blocked kernel on flex) wherever attention dropout is inactive (evaluation,
    /// fill-mask, training with `attention_probs_dropout_prob = 0`), eager otherwise: HF's
    /// "sdpa", which also falls back to eager for attention dropout it cannot fuse.
    #[default]
    Auto,
    /// Always matmul -> mask -> softmax -> dropout -> matmul (HF's "eager").
    Eager,
}

/// Which keys each query may see, in the forms the attention paths take. Built once per
/// forward from the batch's [`BatchMask`]; the per-query forms ([`KeyMask::bias`],
/// [`KeyMask::pad`]) only when a path asks for them: for packed rows they are
/// `[batch, 1, seq, seq]`, which the CPU kernels never read (they take `keys` and `runs`).
#[derive(Debug, Clone)]
pub struct KeyMask {
    /// The keys' padding bias, `[batch, 1, 1, seq]`: the CPU kernels' input.
    pub keys: Tensor<4>,
    /// Packed rows: each document's `(first token, length)` on the flattened token axis,
    /// for the CPU kernels.
    pub runs: Option<Vec<(usize, usize)>>,
    mask: BatchMask,
    dense: std::sync::OnceLock<(Tensor<4>, Tensor<4, Bool>)>,
}

impl KeyMask {
    pub fn new(mask: &BatchMask) -> Self {
        Self {
            keys: attention_bias(mask.attention_mask.clone()),
            runs: mask.runs(),
            mask: mask.clone(),
            dense: std::sync::OnceLock::new(),
        }
    }

    /// Additive bias, 0 where a query sees a key and the most negative f32 where not (eager
    /// path): `[batch, 1, 1, seq]` masking pads, or `[batch, 1, seq, seq]` block-diagonal
    /// for packed rows.
    pub fn bias(&self) -> Tensor<4> {
        self.dense().0.clone()
    }

    /// `true` where a query may not see a key (fused path), in the same shape as
    /// [`Self::bias`].
    pub fn pad(&self) -> Tensor<4, Bool> {
        self.dense().1.clone()
    }

    fn dense(&self) -> &(Tensor<4>, Tensor<4, Bool>) {
        self.dense.get_or_init(|| {
            let [batch, seq] = self.mask.dims();
            match self.mask.same_document() {
                Some(same) => {
                    let hidden = same.bool_not();
                    let bias = Tensor::<4>::zeros([batch, 1, seq, seq], &self.keys.device())
                        .mask_fill(hidden.clone(), f32::MIN);
                    (bias, hidden)
                }
                None => {
                    let key_pads = self
                        .mask
                        .attention_mask
                        .clone()
                        .equal_elem(0)
                        .reshape([batch, 1, 1, seq]);
                    (self.keys.clone(), key_pads)
                }
            }
        })
    }
}

/// What `true` in the boolean mask of burn's fused `attention` means on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MaskMeaning {
    /// burn's documented meaning: the key is masked out.
    TrueMasks,
    /// PyTorch's SDPA meaning: the key takes part. burn-tch 0.22.1 hands burn's mask to
    /// `scaled_dot_product_attention` as is, so on libtorch (outside autodiff) `true` attends.
    TrueAttends,
}

/// How `device`'s fused attention reads a boolean mask, or `None` when it ignores it (then
/// the eager path runs). Probed once per device rather than by backend name, as
/// [`needs_composite_gelu`]: one query, two equal-scoring keys with values 1 and 3, key 1
/// masked. The answer is 1 if `true` masks, 3 if it attends.
pub(crate) fn fused_mask_meaning(device: &Device) -> Option<MaskMeaning> {
    // Keyed by autodiff too: `Device` equality ignores it, and autodiff runs burn's own
    // (composite) attention while the plain device runs the backend's kernel.
    static PROBED: std::sync::Mutex<Vec<(Device, bool, Option<MaskMeaning>)>> =
        std::sync::Mutex::new(Vec::new());
    let mut probed = PROBED.lock().unwrap_or_else(|e| e.into_inner());
    let autodiff = device.is_autodiff();
    if let Some((.., meaning)) = probed
        .iter()
        .find(|(d, ad, _)| d == device && *ad == autodiff)
    {
        return *meaning;
    }
    let q = Tensor::<4>::zeros([1, 1, 1, 1], device);
    let k = Tensor::<4>::zeros([1, 1, 2, 1], device);
    let v = Tensor::<1>::from_floats([1.0, 3.0], device).reshape([1, 1, 2, 1]);
    let mask = Tensor::<1, Bool>::from_bool(burn::tensor::TensorData::from([false, true]), device)
        .reshape([1, 1, 1, 2]);
    let out = attention(q, k, v, Some(mask), None, AttentionModuleOptions::default())
        .into_scalar::<f32>();
    let meaning = if (out - 1.0).abs() < 1e-4 {
        Some(MaskMeaning::TrueMasks)
    } else if (out - 3.0).abs() < 1e-4 {
        Some(MaskMeaning::TrueAttends)
    } else {
        None
    };
    probed.push((device.clone(), autodiff, meaning));
    meaning
}

/// Multi-head scaled dot-product attention (`RobertaSelfAttention`).
#[derive(Module, Debug)]
pub struct RobertaSelfAttention {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub dropout: MlmDropout,
    pub num_heads: usize,
    #[module(skip)]
    pub implementation: AttentionImpl,
}

impl RobertaSelfAttention {
    pub fn new(config: &RobertaConfig, stream: &Arc<DropoutStream>, device: &Device) -> Self {
        let h = config.hidden_size;
        Self {
            query: linear(h, h, config, device),
            key: linear(h, h, config, device),
            value: linear(h, h, config, device),
            dropout: MlmDropout::new(config.attention_probs_dropout_prob, stream),
            num_heads: config.num_attention_heads,
            implementation: AttentionImpl::Auto,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>, mask: &KeyMask) -> Tensor<3> {
        let [batch, seq, hidden] = x.dims();
        let head_dim = hidden / self.num_heads;
        let heads = |t: Tensor<3>| {
            // [batch, seq, hidden] -> [batch, heads, seq, head_dim]
            t.reshape([batch, seq, self.num_heads, head_dim])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (
            dense(&self.query, x.clone()),
            dense(&self.key, x.clone()),
            dense(&self.value, x),
        );
        let device = q.device();
        // The CPU backend's fused attention (crate::cpu_ops): eager semantics, dropout included.
        let draw = |n: usize| self.dropout.draw_host_mask(n);
        let dropout = self
            .dropout
            .active(&device)
            .then_some(&draw as &dyn Fn(usize) -> Vec<f32>);
        let runs = mask.runs.as_deref();
        if let Some(context) =
            crate::cpu_ops::attention(&q, &k, &v, self.num_heads, &mask.keys, runs, dropout)
        {
            return context;
        }
        let (q, k, v) = (heads(q), heads(k), heads(v));
        let fused = match self.implementation {
            AttentionImpl::Auto if !self.dropout.active(&device) => fused_mask_meaning(&device),
            _ => None,
        };
        let context = match fused {
            Some(meaning) => {
                // Pads masked to -inf rather than finfo.min: the same probabilities, as every
                // query row has at least one real key.
                let pad = mask.pad().expand([batch, self.num_heads, seq, seq]);
                // (Packed rows: padding queries see padding keys, so no row is all masked.)
                let mask = match meaning {
                    MaskMeaning::TrueMasks => pad,
                    MaskMeaning::TrueAttends => pad.bool_not(),
                };
                attention(q, k, v, Some(mask), None, AttentionModuleOptions::default())
            }
            None => self.eager(q, k, v, mask.bias()),
        };
        // [batch, heads, seq, head_dim] -> [batch, seq, hidden]
        context.swap_dims(1, 2).reshape([batch, seq, hidden])
    }

    /// softmax(q k^T / sqrt(d) + bias) v with dropout on the probabilities, HF's eager path.
    ///
    /// # Shapes
    /// - `q`, `k`, `v`: `[batch, heads, seq, head_dim]`, `bias`: `[batch, 1, 1, seq]`
    /// - output: `[batch, heads, seq, head_dim]`
    fn eager(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, bias: Tensor<4>) -> Tensor<4> {
        let [.., head_dim] = q.dims();
        // [batch, heads, seq, seq]; the mask and softmax in f32 (mixed precision: the scores
        // may be half precision).
        let scores = q.matmul(k.swap_dims(2, 3)) / (head_dim as f64).sqrt();
        let probs = crate::cpu_ops::softmax_last(cast(scores, bias.dtype()) + bias);
        let probs = self.dropout.forward(cast(probs, v.dtype()));
        probs.matmul(v)
    }
}

/// Dense + dropout + residual + LayerNorm after attention or the FFN (`RobertaSelfOutput`,
/// `RobertaOutput`: the same computation, different input width).
#[derive(Module, Debug)]
pub struct RobertaOutput {
    pub dense: Linear,
    pub LayerNorm: LayerNorm,
    pub dropout: MlmDropout,
    #[module(skip)]
    pub layer_norm_eps: f64,
}

impl RobertaOutput {
    pub fn new(
        d_input: usize,
        config: &RobertaConfig,
        stream: &Arc<DropoutStream>,
        device: &Device,
    ) -> Self {
        Self {
            dense: linear(d_input, config.hidden_size, config, device),
            LayerNorm: layer_norm(config, device),
            dropout: MlmDropout::new(config.hidden_dropout_prob, stream),
            layer_norm_eps: config.layer_norm_eps,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, seq, d_input]`, `residual`: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>, residual: Tensor<3>) -> Tensor<3> {
        let x = self.dropout.forward(dense(&self.dense, x));
        crate::cpu_ops::layer_norm(
            &self.LayerNorm,
            self.layer_norm_eps,
            cast(x, residual.dtype()) + residual,
        )
    }
}

/// `RobertaAttention`: self-attention followed by its output block.
#[derive(Module, Debug)]
pub struct RobertaAttention {
    /// HF key `attention.self`.
    pub self_attn: RobertaSelfAttention,
    pub output: RobertaOutput,
}

/// `RobertaIntermediate`: the FFN's widening dense layer and its activation.
#[derive(Module, Debug)]
pub struct RobertaIntermediate {
    pub dense: Linear,
    #[module(skip)]
    pub act: HiddenAct,
}

/// One post-LayerNorm transformer block (`RobertaLayer`).
#[derive(Module, Debug)]
pub struct RobertaLayer {
    pub attention: RobertaAttention,
    pub intermediate: RobertaIntermediate,
    pub output: RobertaOutput,
}

impl RobertaLayer {
    pub fn new(
        config: &RobertaConfig,
        act: HiddenAct,
        stream: &Arc<DropoutStream>,
        device: &Device,
    ) -> Self {
        Self {
            attention: RobertaAttention {
                self_attn: RobertaSelfAttention::new(config, stream, device),
                output: RobertaOutput::new(config.hidden_size, config, stream, device),
            },
            intermediate: RobertaIntermediate {
                dense: linear(config.hidden_size, config.intermediate_size, config, device),
                act,
            },
            output: RobertaOutput::new(config.intermediate_size, config, stream, device),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>, mask: &KeyMask) -> Tensor<3> {
        let attn = self.attention.self_attn.forward(x.clone(), mask);
        let x = self.attention.output.forward(attn, x);
        let ffn = activate(
            self.intermediate.act,
            dense(&self.intermediate.dense, x.clone()),
        );
        self.output.forward(ffn, x)
    }
}

/// The stack of transformer blocks (`RobertaEncoder`).
#[derive(Module, Debug)]
pub struct RobertaEncoder {
    pub layer: Vec<RobertaLayer>,
}

/// Embeddings and encoder (`RobertaModel` without the pooler, which MLM does not use).
#[derive(Module, Debug)]
pub struct RobertaModel {
    pub embeddings: RobertaEmbeddings,
    pub encoder: RobertaEncoder,
}

impl RobertaModel {
    /// # Shapes
    /// - `input_ids`, `attention_mask` (1 = token, 0 = pad, or packed rows): `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: impl Into<BatchMask>,
    ) -> Tensor<3> {
        let (mut x, mask) = self.embed(input_ids, &attention_mask.into());
        for layer in &self.encoder.layer {
            x = layer.forward(x, &mask);
        }
        x
    }

    /// The first layer's input (embeddings, dropout included) and the key mask every layer
    /// reads.
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub(crate) fn embed(
        &self,
        input_ids: Tensor<2, Int>,
        mask: &BatchMask,
    ) -> (Tensor<3>, KeyMask) {
        let [batch, seq] = input_ids.dims();
        let token_type_ids = Tensor::<2, Int>::zeros([batch, seq], &input_ids.device());
        let x = self.embeddings.forward(input_ids, token_type_ids, mask);
        (x, KeyMask::new(mask))
    }
}

/// The additive attention mask: 0 where `attention_mask` is 1, the most negative f32 where it
/// is 0, as HF's eager path builds it (`(1 - mask) * torch.finfo(dtype).min`).
///
/// # Shapes
/// - `attention_mask`: `[batch, seq]`
/// - output: `[batch, 1, 1, seq]`
pub fn attention_bias(attention_mask: Tensor<2, Int>) -> Tensor<4> {
    let [batch, seq] = attention_mask.dims();
    let pad: Tensor<2, Bool> = attention_mask.equal_elem(0);
    Tensor::<2>::zeros([batch, seq], &pad.device())
        .mask_fill(pad, f32::MIN)
        .reshape([batch, 1, 1, seq])
}

/// The MLM head (`RobertaLMHead`; BERT's `cls.predictions`): dense -> activation ->
/// LayerNorm -> decoder. RoBERTa's head always uses exact GELU; BERT's uses `hidden_act`.
///
/// The decoder weight is not stored here: [`RobertaForMaskedLM`] passes the word-embedding
/// parameter in, so the tie is structural (one parameter, two uses, one gradient sum).
#[derive(Module, Debug)]
pub struct RobertaLMHead {
    pub dense: Linear,
    pub layer_norm: LayerNorm,
    /// HF `lm_head.bias` (also saved as `lm_head.decoder.bias`, the same tensor).
    pub bias: Param<Tensor<1>>,
    #[module(skip)]
    pub act: HiddenAct,
    #[module(skip)]
    pub layer_norm_eps: f64,
}

impl RobertaLMHead {
    pub fn new(config: &RobertaConfig, device: &Device) -> Self {
        Self {
            dense: linear(config.hidden_size, config.hidden_size, config, device),
            layer_norm: layer_norm(config, device),
            bias: Param::from_tensor(Tensor::zeros([config.vocab_size], device)),
            act: HiddenAct::Gelu,
            layer_norm_eps: config.layer_norm_eps,
        }
    }

    /// # Shapes
    /// - `features`: `[..., hidden]`, `word_embeddings`: `[vocab, hidden]`
    /// - output: `[..., vocab]`
    pub fn forward<const D: usize>(
        &self,
        features: Tensor<D>,
        word_embeddings: Tensor<2>,
    ) -> Tensor<D> {
        let x = activate(self.act, dense(&self.dense, features));
        let x =
            crate::cpu_ops::layer_norm(&self.layer_norm, self.layer_norm_eps, cast(x, DType::F32));
        // The decoder runs in the dense layer's dtype too (the largest matmul at big vocabularies).
        let dtype = self.dense.weight.val().dtype();
        crate::cpu_ops::linear(
            cast(x, dtype),
            cast(word_embeddings, dtype).transpose(),
            Some(cast(self.bias.val(), dtype)),
        )
    }
}

/// RoBERTa with its masked-language-modelling head (`RobertaForMaskedLM`).
#[derive(Module, Debug)]
pub struct RobertaForMaskedLM {
    pub roberta: RobertaModel,
    pub lm_head: RobertaLMHead,
    /// Recompute each layer in the backward instead of keeping its activations
    /// ([`crate::MaskedLm::with_gradient_checkpointing`]).
    #[module(skip)]
    pub gradient_checkpointing: bool,
}

impl RobertaForMaskedLM {
    /// A freshly initialised model, initialised as HF `_init_weights` does. The config must
    /// pass [`RobertaConfig::validate`], and its parameters fit in the memory available
    /// ([`RobertaConfig::check_memory`]).
    pub fn new(config: &RobertaConfig, device: &Device) -> Result<Self, crate::ConfigError> {
        config.validate()?;
        config.check_memory()?;
        let act = config.activation()?;
        // One dropout stream for the whole model (crate::dropout).
        let stream = DropoutStream::shared();
        Ok(Self {
            roberta: RobertaModel {
                embeddings: RobertaEmbeddings::new(config, &stream, device),
                encoder: RobertaEncoder {
                    layer: (0..config.num_hidden_layers)
                        .map(|_| RobertaLayer::new(config, act, &stream, device))
                        .collect(),
                },
            },
            lm_head: RobertaLMHead {
                // RobertaLMHead hard-codes exact GELU; BertPredictionHeadTransform follows
                // hidden_act.
                act: if config.is_bert() {
                    act
                } else {
                    HiddenAct::Gelu
                },
                ..RobertaLMHead::new(config, device)
            },
            gradient_checkpointing: false,
        })
    }

    /// Logits over the vocabulary at every position (inference, fill-mask).
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask`: `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: impl Into<BatchMask>,
    ) -> Tensor<3> {
        let hidden = self.roberta.forward(input_ids, attention_mask);
        self.lm_head.forward(hidden, self.word_embeddings())
    }

    /// Logits only at the given flat positions (`batch_index * seq + position`): the vocab
    /// projection, the costliest matmul in a small model, runs on the ~15% masked tokens.
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask`: `[batch, seq]`, `positions`: `[masked]`
    /// - output: `[masked, vocab]`
    pub fn forward_at(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: impl Into<BatchMask>,
        positions: Tensor<1, Int>,
    ) -> Tensor<2> {
        let hidden = self.roberta.forward(input_ids, attention_mask);
        self.head_at(hidden, positions)
    }

    /// The LM head at the given flat positions of the last layer's output.
    ///
    /// # Shapes
    /// - `hidden`: `[batch, seq, hidden]`, `positions`: `[masked]`
    /// - output: `[masked, vocab]`
    pub(crate) fn head_at(&self, hidden: Tensor<3>, positions: Tensor<1, Int>) -> Tensor<2> {
        let [batch, seq, width] = hidden.dims();
        // [batch * seq, hidden] -> [masked, hidden]
        let picked = hidden.reshape([batch * seq, width]).select(0, positions);
        self.lm_head.forward(picked, self.word_embeddings())
    }

    /// Appends one vocabulary row per entry of `sources`, each initialised as the mean of the
    /// existing rows `sources[i]` (word embedding and LM-head bias alike); the existing rows
    /// are untouched. Mean-of-pieces initialisation starts a new word where the model already
    /// "reads" it (the subword sequence it replaces), which is what makes vocabulary
    /// extension work without a long re-warm-up (Hewitt 2021, "Initializing new word
    /// embeddings for pretrained language models"; the approach of transformers'
    /// `resize_token_embeddings(mean_resizing=True)`, applied per word instead of globally).
    /// Every source id must be below the current vocabulary size.
    ///
    /// # Shapes
    /// - word embeddings `[vocab, hidden]` -> `[vocab + sources.len(), hidden]`
    pub fn with_new_rows(mut self, sources: &[Vec<u32>]) -> Self {
        let embeddings = self.word_embeddings();
        let [vocab, _] = embeddings.dims();
        let mean_rows = |table: Tensor<2>| grow_rows(table, sources);
        let grown = mean_rows(embeddings);
        debug_assert_eq!(grown.dims()[0], vocab + sources.len());
        self.roberta.embeddings.word_embeddings.weight = Param::from_tensor(grown);
        // The bias as a [vocab, 1] column, grown the same way.
        let bias = self.lm_head.bias.val().unsqueeze_dim::<2>(1);
        let bias = mean_rows(bias).squeeze_dim::<1>(1);
        self.lm_head.bias = Param::from_tensor(bias);
        self
    }

    /// The same model with every self-attention computed by `implementation`.
    pub fn with_attention(mut self, implementation: AttentionImpl) -> Self {
        for layer in &mut self.roberta.encoder.layer {
            layer.attention.self_attn.implementation = implementation;
        }
        self
    }

    /// The word-embedding matrix, which is also the decoder weight.
    pub fn word_embeddings(&self) -> Tensor<2> {
        self.roberta.embeddings.word_embeddings.weight.val()
    }

    /// The random stream every dropout of this model draws from.
    pub fn dropout_stream(&self) -> &Arc<DropoutStream> {
        &self.roberta.embeddings.dropout.stream
    }
}

/// `table` with one row appended per entry of `sources`, each the mean of the rows it lists
/// (vocabulary extension, for every family: embeddings and decoder bias alike).
///
/// # Shapes
/// - `table`: `[rows, width]` -> `[rows + sources.len(), width]`
pub(crate) fn grow_rows(table: Tensor<2>, sources: &[Vec<u32>]) -> Tensor<2> {
    let device = table.device();
    let rows: Vec<Tensor<2>> = sources
        .iter()
        .map(|ids| {
            let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
            let n = ids.len();
            let index =
                Tensor::<1, Int>::from_data(burn::tensor::TensorData::new(ids, [n]), &device);
            // [pieces, width] -> [1, width]
            table.clone().select(0, index).mean_dim(0)
        })
        .collect();
    Tensor::cat([vec![table], rows].concat(), 0)
}

/// Cross-entropy averaged over masked tokens only: HF's loss with labels -100 elsewhere.
///
/// # Shapes
/// - `logits`: `[masked, vocab]`, `labels`: `[masked]`
/// - output: `[1]`
pub fn mlm_loss(logits: Tensor<2>, labels: Tensor<1, Int>) -> Tensor<1> {
    if let Some(loss) = crate::cpu_ops::cross_entropy(&logits, &labels) {
        return loss;
    }
    let [masked] = labels.dims();
    // In f32 whatever the logits' precision, as torch.autocast runs log_softmax.
    let log_probs = log_softmax(cast(logits, DType::F32), 1);
    let picked = log_probs.gather(1, labels.reshape([masked, 1]));
    picked.mean().neg()
}
