//! `ModernBertForMaskedLM` in burn, mirroring `transformers/models/modernbert/modeling_modernbert.py`
//! (transformers 5.24).
//!
//! Module paths are the HF weight keys as they are (`model.layers.{i}.attn.Wqkv.weight`,
//! `head.norm.weight`, `decoder.bias`); the only translation on loading is burn's own
//! (LayerNorm `weight`/`bias` are `gamma`/`beta`, Linear weights are stored `[in, out]`).
//!
//! How it differs from RoBERTa, each in one named function below so that a fused kernel can
//! replace it in one place:
//! - no position table: [`rotary`] rotates q and k by their position (RoPE, rotate-half
//!   layout), with one base per layer type;
//! - pre-LayerNorm blocks, layer 0 without `attn_norm` (the embeddings' norm precedes it);
//! - sliding-window attention on `sliding_attention` layers ([`sliding_window_bias`]);
//! - a GeGLU MLP ([`geglu`]) and no biases by default (`attention_bias`, `mlp_bias`,
//!   `norm_bias` false).

// HF weight keys such as `Wqkv` are field names.
#![allow(non_snake_case)]

use burn::module::{Module, Param};
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Device, Distribution, Int, Tensor};

use super::config::{LayerAttention, ModernBertConfig};
use std::sync::Arc;

use crate::dropout::{DropoutStream, MlmDropout};
use crate::model::{MaskMeaning, activate, cast, dense, fused_mask_meaning};
use crate::{AttentionImpl, BatchMask, ConfigError, HiddenAct, KeyMask};

/// Truncated normal N(0, std) cut at `cutoff * std`, as transformers' ModernBERT
/// `_init_weights` (`init.trunc_normal_(w, std=std, a=-cutoff*std, b=cutoff*std)`): values
/// outside the bounds are redrawn (rejection sampling), so the distribution is the truncated one;
/// after 12 rounds (at cutoff 2, 0.0455^12 of the elements) the rest are clamped.
fn trunc_normal<const D: usize>(
    shape: [usize; D],
    std: f64,
    cutoff: f64,
    device: &Device,
) -> Tensor<D> {
    let mut x = Tensor::<D>::random(shape, Distribution::Normal(0.0, std), device);
    if std == 0.0 {
        return x;
    }
    let bound = cutoff * std;
    for _ in 0..12 {
        let outside = x.clone().abs().greater_elem(bound);
        let fresh = Tensor::<D>::random(shape, Distribution::Normal(0.0, std), device);
        x = x.mask_where(outside, fresh);
    }
    x.clamp(-bound, bound)
}

/// A Linear layer `[d_input, d_output]` (burn's layout) initialised as ModernBERT's
/// `init_weight`: truncated normal weight, zero bias when it has one.
fn linear(
    d_input: usize,
    d_output: usize,
    bias: bool,
    std: f64,
    config: &ModernBertConfig,
    device: &Device,
) -> Linear {
    Linear {
        weight: Param::from_tensor(trunc_normal(
            [d_input, d_output],
            std,
            config.initializer_cutoff_factor,
            device,
        )),
        bias: bias.then(|| Param::from_tensor(Tensor::zeros([d_output], device))),
    }
}

fn layer_norm(config: &ModernBertConfig, device: &Device) -> LayerNorm {
    LayerNormConfig::new(config.hidden_size)
        .with_epsilon(config.norm_eps)
        .with_bias(config.norm_bias)
        .init(device)
}

/// The standard deviations of ModernBERT's `_init_weights`.
struct InitStd {
    /// Token embeddings, `Wqkv`, `Wi`: `initializer_range`.
    input: f64,
    /// The attention's and MLP's `Wo`, the head's dense layer:
    /// `initializer_range / sqrt(2 num_hidden_layers)`.
    output: f64,
}

impl InitStd {
    fn new(config: &ModernBertConfig) -> Self {
        Self {
            input: config.initializer_range,
            output: config.initializer_range / (2.0 * config.num_hidden_layers as f64).sqrt(),
        }
    }
}

/// LayerNorm through the fused CPU kernel where it applies (with a bias), burn's otherwise.
fn norm<const D: usize>(norm: &LayerNorm, eps: f64, x: Tensor<D>) -> Tensor<D> {
    crate::cpu_ops::layer_norm(norm, eps, x)
}

/// Token embeddings, LayerNorm, dropout (`ModernBertEmbeddings`): no positions, those are
/// rotary.
#[derive(Module, Debug)]
pub struct ModernBertEmbeddings {
    pub tok_embeddings: Embedding,
    pub norm: LayerNorm,
    pub drop: MlmDropout,
    #[module(skip)]
    pub norm_eps: f64,
}

impl ModernBertEmbeddings {
    pub fn new(config: &ModernBertConfig, stream: &Arc<DropoutStream>, device: &Device) -> Self {
        // `nn.Embedding(padding_idx=pad)` zeroes the pad row, but `_init_weights` then draws the
        // whole table again, pad row included.
        let weight = trunc_normal(
            [config.vocab_size, config.hidden_size],
            InitStd::new(config).input,
            config.initializer_cutoff_factor,
            device,
        );
        Self {
            tok_embeddings: Embedding {
                weight: Param::from_tensor(weight),
            },
            norm: layer_norm(config, device),
            drop: MlmDropout::new(config.embedding_dropout, stream),
            norm_eps: config.norm_eps,
        }
    }

    /// # Shapes
    /// - `input_ids`: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        let x = self.tok_embeddings.forward(input_ids);
        self.drop.forward(norm(&self.norm, self.norm_eps, x))
    }
}

/// The cosine and sine tables of RoPE for positions `0..seq`, as transformers'
/// `ModernBertRotaryEmbedding` computes them in f32: `inv_freq[j] = 1 / theta^(2j / dim)`,
/// angles `position * inv_freq` repeated twice along the head dimension (`cat(freqs, freqs)`).
///
/// # Shapes
/// - output: two `[1, seq, head_dim]` tensors (broadcast over batch; heads are folded into
///   the hidden dimension by the caller)
pub fn rotary_tables(seq: usize, head_dim: usize, theta: f64, device: &Device) -> [Tensor<3>; 2] {
    let positions = Tensor::<1, Int>::arange(0..seq as i64, device).reshape([1, seq]);
    let (cos, sin) = crate::cpu_ops::rope_cos_sin(&positions, head_dim, theta, device);
    [cos, sin]
}

/// Rotary position embedding of q or k, `x cos + rotate_half(x) sin` with
/// `rotate_half(x) = cat(-x2, x1)` over the two halves of the head dimension (transformers'
/// `apply_rotary_pos_emb`, GPT-NeoX layout, not interleaved pairs). In f32 whatever `x`'s dtype,
/// as transformers does.
///
/// # Shapes
/// - `x`: `[batch, seq, heads * head_dim]`, `cos`, `sin`: `[1 or batch, seq, head_dim]`
/// - output: `[batch, seq, heads * head_dim]`
pub fn rotary(x: Tensor<3>, cos: &Tensor<3>, sin: &Tensor<3>, heads: usize) -> Tensor<3> {
    let dtype = x.dtype();
    let x = cast(x, DType::F32);
    if let Some(rotated) = crate::cpu_ops::rotary(&x, cos, sin, heads) {
        // The CPU backend's fused kernel, in place on the projection layout.
        return cast(rotated, dtype);
    }
    let [batch, seq, hidden] = x.dims();
    let head_dim = hidden / heads;
    let half = head_dim / 2;
    // [batch, seq, hidden] -> [batch, seq, heads, head_dim]
    let x = x.reshape([batch, seq, heads, head_dim]);
    // Tables shared by every row (`[1, seq, head_dim]`) or per row (packed documents).
    let rows = cos.dims()[0];
    let [cos, sin] = [cos, sin].map(|t| t.clone().reshape([rows, seq, 1, head_dim]));
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    cast(
        (x * cos + rotated * sin).reshape([batch, seq, hidden]),
        dtype,
    )
}

/// The additive mask of a sliding-attention layer: 0 where query `i` may see key `j`
/// (`|i - j| <= half_window` and key `j` is a token), the most negative f32 elsewhere.
/// transformers' `sliding_window_bidirectional_overlay` is `abs(q_idx - kv_idx) <=
/// sliding_window` with `sliding_window = local_attention // 2`: an inclusive edge, a window of
/// `2 * half_window + 1` keys. One fill value, not a sum of two masks, so that a pad query with
/// no visible key gets a finite, uniform row as in transformers' eager path.
///
/// # Shapes
/// - `attention_mask` (1 = token, 0 = pad): `[batch, seq]`
/// - output: `[batch, 1, seq, seq]`
pub fn sliding_window_bias(attention_mask: impl Into<BatchMask>, half_window: usize) -> Tensor<4> {
    let mask = attention_mask.into();
    let [batch, seq] = mask.dims();
    let device = mask.attention_mask.device();
    let positions = Tensor::<1, Int>::arange(0..seq as i64, &device);
    // [seq, seq]: |i - j|
    let distance = (positions.clone().reshape([seq, 1]) - positions.reshape([1, seq])).abs();
    let in_window: Tensor<4, Bool> = distance
        .lower_equal_elem(half_window as i64)
        .reshape([1, 1, seq, seq])
        .expand([batch, 1, seq, seq]);
    // Packed rows: keys of the query's own document (padding sees padding, itself included).
    let visible_key: Tensor<4, Bool> = match mask.same_document() {
        Some(same) => same,
        None => mask
            .attention_mask
            .not_equal_elem(0)
            .reshape([batch, 1, 1, seq])
            .expand([batch, 1, seq, seq]),
    };
    let visible = in_window.bool_and(visible_key);
    Tensor::<4>::zeros([batch, 1, seq, seq], &device).mask_fill(visible.bool_not(), f32::MIN)
}

/// GeGLU: `Wi`'s output split in two along the last dimension, `act(first half) * second
/// half` (transformers' `input, gate = Wi(x).chunk(2, dim=-1); act(input) * gate`).
///
/// # Shapes
/// - `x`: `[..., 2 * intermediate]`
/// - output: `[..., intermediate]`
pub fn geglu<const D: usize>(act: HiddenAct, x: Tensor<D>) -> Tensor<D> {
    if act == HiddenAct::Gelu
        && let Some(y) = crate::cpu_ops::geglu(x.clone())
    {
        // The CPU backend's fused kernel (one pass each way).
        return y;
    }
    let width = x.dims()[D - 1] / 2;
    let input = x.clone().narrow(D - 1, 0, width);
    let gate = x.narrow(D - 1, width, width);
    activate(act, input) * gate
}

/// Masks and rotary tables of one forward, shared by the layers of each type.
pub(crate) struct LayerInputs {
    keys: KeyMask,
    /// `[cos, sin]` per distinct RoPE base, with the base: `[1, seq, head_dim]`, or
    /// `[batch, seq, head_dim]` for packed rows (positions restart at each document).
    rope: Vec<(f64, [Tensor<3>; 2])>,
    /// The batch's mask, for the sliding-window bias of the composite path (built only
    /// where the fused windowed kernel does not run, once per half window).
    mask: BatchMask,
    windows: std::cell::RefCell<Vec<(usize, Tensor<4>)>>,
}

impl LayerInputs {
    fn new(mask: BatchMask, layers: &[ModernBertEncoderLayer], head_dim: usize) -> Self {
        let [_, seq] = mask.dims();
        let device = mask.attention_mask.device();
        let positions = mask.document_positions(0, 0);
        let mut rope: Vec<(f64, [Tensor<3>; 2])> = Vec::new();
        for layer in layers {
            let theta = layer.attn.rope_theta;
            if !rope.iter().any(|(t, _)| *t == theta) {
                let tables = match &positions {
                    Some(positions) => {
                        let (cos, sin) =
                            crate::cpu_ops::rope_cos_sin(positions, head_dim, theta, &device);
                        [cos, sin]
                    }
                    None => rotary_tables(seq, head_dim, theta, &device),
                };
                rope.push((theta, tables));
            }
        }
        Self {
            keys: KeyMask::new(&mask),
            rope,
            mask,
            windows: Default::default(),
        }
    }

    fn rope(&self, theta: f64) -> &[Tensor<3>; 2] {
        let found = self.rope.iter().find(|(t, _)| *t == theta);
        // Every layer's base was added in `new`.
        &found.expect("rotary tables for every layer").1
    }

    /// The `[batch, 1, seq, seq]` bias of a sliding layer ([`sliding_window_bias`]).
    fn window(&self, half: usize) -> Tensor<4> {
        let mut windows = self.windows.borrow_mut();
        if let Some((_, bias)) = windows.iter().find(|(w, _)| *w == half) {
            return bias.clone();
        }
        let bias = sliding_window_bias(self.mask.clone(), half);
        windows.push((half, bias.clone()));
        bias
    }
}

/// Self-attention with RoPE, full or sliding-window (`ModernBertAttention`).
#[derive(Module, Debug)]
pub struct ModernBertAttention {
    /// q, k and v in one projection: output columns `[q | k | v]`, each `[heads x head_dim]`.
    pub Wqkv: Linear,
    pub Wo: Linear,
    /// On the attention probabilities.
    pub drop: MlmDropout,
    /// After `Wo` (transformers' `out_drop`, the same rate).
    pub out_drop: MlmDropout,
    pub num_heads: usize,
    #[module(skip)]
    pub rope_theta: f64,
    /// `Some(w)`: keys within distance `w` only; `None`: full attention.
    #[module(skip)]
    pub half_window: Option<usize>,
    #[module(skip)]
    pub implementation: AttentionImpl,
}

impl ModernBertAttention {
    pub fn new(
        config: &ModernBertConfig,
        layer: LayerAttention,
        stream: &Arc<DropoutStream>,
        device: &Device,
    ) -> Self {
        let h = config.hidden_size;
        let std = InitStd::new(config);
        Self {
            Wqkv: linear(h, 3 * h, config.attention_bias, std.input, config, device),
            Wo: linear(h, h, config.attention_bias, std.output, config, device),
            drop: MlmDropout::new(config.attention_dropout, stream),
            out_drop: MlmDropout::new(config.attention_dropout, stream),
            num_heads: config.num_attention_heads,
            rope_theta: layer.rope_theta,
            half_window: layer.half_window,
            implementation: AttentionImpl::Auto,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    fn forward(&self, x: Tensor<3>, inputs: &LayerInputs) -> Tensor<3> {
        let [.., hidden] = x.dims();
        // [batch, seq, 3 * hidden] -> three [batch, seq, hidden]
        let qkv = dense(&self.Wqkv, x);
        let [q, k, v] = [0, 1, 2].map(|i| qkv.clone().narrow(2, i * hidden, hidden));
        let [cos, sin] = inputs.rope(self.rope_theta);
        let (q, k) = (
            rotary(q, cos, sin, self.num_heads),
            rotary(k, cos, sin, self.num_heads),
        );
        let context = match self.half_window {
            None => self.full(q, k, v, &inputs.keys),
            Some(half) => self.windowed(q, k, v, half, inputs),
        };
        self.out_drop.forward(dense(&self.Wo, context))
    }

    /// Full attention over the real keys: the CPU backend's fused kernel, burn's fused
    /// attention (`AttentionImpl::Auto`, no live dropout), or eager.
    ///
    /// # Shapes
    /// - `q`, `k`, `v`: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    fn full(&self, q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, keys: &KeyMask) -> Tensor<3> {
        let [batch, seq, hidden] = q.dims();
        let device = q.device();
        let draw = |n: usize| self.drop.draw_host_mask(n);
        let dropout = self
            .drop
            .active(&device)
            .then_some(&draw as &dyn Fn(usize) -> Vec<f32>);
        let runs = keys.runs.as_deref();
        if let Some(context) =
            crate::cpu_ops::attention(&q, &k, &v, self.num_heads, &keys.keys, runs, dropout)
        {
            return context;
        }
        let fused = match self.implementation {
            AttentionImpl::Auto if !self.drop.active(&device) => fused_mask_meaning(&device),
            _ => None,
        };
        let Some(meaning) = fused else {
            return self.eager(q, k, v, keys.bias());
        };
        let heads = |t: Tensor<3>| {
            // [batch, seq, hidden] -> [batch, heads, seq, head_dim]
            t.reshape([batch, seq, self.num_heads, hidden / self.num_heads])
                .swap_dims(1, 2)
        };
        // Every query row has a visible key here (full attention; packed padding sees
        // padding), so -inf masking is safe.
        let pad = keys.pad().expand([batch, self.num_heads, seq, seq]);
        let mask = match meaning {
            MaskMeaning::TrueMasks => pad,
            MaskMeaning::TrueAttends => pad.bool_not(),
        };
        let options = AttentionModuleOptions::default();
        let context = attention(heads(q), heads(k), heads(v), Some(mask), None, options);
        // [batch, heads, seq, head_dim] -> [batch, seq, hidden]
        context.swap_dims(1, 2).reshape([batch, seq, hidden])
    }

    /// Sliding-window attention: on the CPU backend the fused kernel that computes only the
    /// band of `2 * half + 1` keys around each query (cost linear in the sequence length);
    /// elsewhere eager with the window's additive bias (a pad query far from every token has
    /// no visible key, which fused kernels turn into NaN).
    fn windowed(
        &self,
        q: Tensor<3>,
        k: Tensor<3>,
        v: Tensor<3>,
        half: usize,
        inputs: &LayerInputs,
    ) -> Tensor<3> {
        let device = q.device();
        let draw = |n: usize| self.drop.draw_host_mask(n);
        let dropout = self
            .drop
            .active(&device)
            .then_some(&draw as &dyn Fn(usize) -> Vec<f32>);
        // The keys' padding bias and, for packed rows, the documents.
        let keys = (&inputs.keys.keys, inputs.keys.runs.as_deref());
        if let Some(context) =
            crate::cpu_ops::attention_windowed(&q, &k, &v, self.num_heads, keys, 2 * half, dropout)
        {
            return context;
        }
        self.eager(q, k, v, inputs.window(half))
    }

    /// softmax(q k^T / sqrt(d) + bias) v with dropout on the probabilities: transformers'
    /// `eager_attention_forward` (`matmul * head_dim**-0.5`, mask added, f32 softmax).
    ///
    /// # Shapes
    /// - `q`, `k`, `v`: `[batch, seq, hidden]`; `bias`: `[batch, 1, 1 or seq, seq]`
    /// - output: `[batch, seq, hidden]`
    fn eager(&self, q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, bias: Tensor<4>) -> Tensor<3> {
        let [batch, seq, hidden] = q.dims();
        let head_dim = hidden / self.num_heads;
        let heads = |t: Tensor<3>| {
            // [batch, seq, hidden] -> [batch, heads, seq, head_dim]
            t.reshape([batch, seq, self.num_heads, head_dim])
                .swap_dims(1, 2)
        };
        let (q, k, v) = (heads(q), heads(k), heads(v));
        // [batch, heads, seq, seq]
        let scores = q.matmul(k.swap_dims(2, 3)) * (head_dim as f64).powf(-0.5);
        let probs = crate::cpu_ops::softmax_last(cast(scores, bias.dtype()) + bias);
        let probs = self.drop.forward(cast(probs, v.dtype()));
        // [batch, heads, seq, head_dim] -> [batch, seq, hidden]
        probs
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([batch, seq, hidden])
    }
}

/// The GeGLU feed-forward block (`ModernBertMLP`): `Wo(drop(geglu(Wi x)))`.
#[derive(Module, Debug)]
pub struct ModernBertMLP {
    /// `[hidden, 2 * intermediate]`: the activation's input, then the gate.
    pub Wi: Linear,
    pub Wo: Linear,
    pub drop: MlmDropout,
    #[module(skip)]
    pub act: HiddenAct,
}

impl ModernBertMLP {
    pub fn new(
        config: &ModernBertConfig,
        act: HiddenAct,
        stream: &Arc<DropoutStream>,
        device: &Device,
    ) -> Self {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let std = InitStd::new(config);
        Self {
            Wi: linear(h, 2 * i, config.mlp_bias, std.input, config, device),
            Wo: linear(i, h, config.mlp_bias, std.output, config, device),
            drop: MlmDropout::new(config.mlp_dropout, stream),
            act,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = geglu(self.act, dense(&self.Wi, x));
        dense(&self.Wo, self.drop.forward(x))
    }
}

/// One pre-LayerNorm block (`ModernBertEncoderLayer`):
/// `x + attn(attn_norm(x))`, then `x + mlp(mlp_norm(x))`.
#[derive(Module, Debug)]
pub struct ModernBertEncoderLayer {
    /// `None` in layer 0 (`nn.Identity` in transformers: the embeddings end in a LayerNorm).
    pub attn_norm: Option<LayerNorm>,
    pub attn: ModernBertAttention,
    pub mlp_norm: LayerNorm,
    pub mlp: ModernBertMLP,
    #[module(skip)]
    pub norm_eps: f64,
}

impl ModernBertEncoderLayer {
    pub fn new(
        config: &ModernBertConfig,
        index: usize,
        layer: LayerAttention,
        act: HiddenAct,
        stream: &Arc<DropoutStream>,
        device: &Device,
    ) -> Self {
        Self {
            attn_norm: (index > 0).then(|| layer_norm(config, device)),
            attn: ModernBertAttention::new(config, layer, stream, device),
            mlp_norm: layer_norm(config, device),
            mlp: ModernBertMLP::new(config, act, stream, device),
            norm_eps: config.norm_eps,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub(crate) fn forward(&self, x: Tensor<3>, inputs: &LayerInputs) -> Tensor<3> {
        let normed = match &self.attn_norm {
            Some(attn_norm) => norm(attn_norm, self.norm_eps, x.clone()),
            None => x.clone(),
        };
        let x = x.clone() + cast(self.attn.forward(normed, inputs), x.dtype());
        let mlp = self
            .mlp
            .forward(norm(&self.mlp_norm, self.norm_eps, x.clone()));
        x.clone() + cast(mlp, x.dtype())
    }
}

/// Embeddings, encoder layers and the final LayerNorm (`ModernBertModel`).
#[derive(Module, Debug)]
pub struct ModernBertModel {
    pub embeddings: ModernBertEmbeddings,
    pub layers: Vec<ModernBertEncoderLayer>,
    pub final_norm: LayerNorm,
    #[module(skip)]
    pub norm_eps: f64,
}

impl ModernBertModel {
    /// Positions are `0..seq` in every row (transformers' default `position_ids`): inputs are
    /// right-padded. Packed rows: positions restart at each document.
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask` (1 = token, 0 = pad, or packed rows): `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: impl Into<BatchMask>,
    ) -> Tensor<3> {
        norm(
            &self.final_norm,
            self.norm_eps,
            self.encode(input_ids, attention_mask.into()),
        )
    }

    /// The last layer's output, before the final LayerNorm.
    fn encode(&self, input_ids: Tensor<2, Int>, attention_mask: BatchMask) -> Tensor<3> {
        let (mut x, inputs) = self.embed(input_ids, attention_mask);
        for layer in &self.layers {
            x = layer.forward(x, &inputs);
        }
        x
    }

    /// The first layer's input (embeddings, dropout included) and the masks and rotary tables
    /// the layers share.
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub(crate) fn embed(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: BatchMask,
    ) -> (Tensor<3>, LayerInputs) {
        let x = self.embeddings.forward(input_ids);
        let [.., hidden] = x.dims();
        let head_dim = self
            .layers
            .first()
            .map_or(hidden, |l| hidden / l.attn.num_heads);
        let inputs = LayerInputs::new(attention_mask, &self.layers, head_dim);
        (x, inputs)
    }
}

/// The MLM head's transform (`ModernBertPredictionHead`): dense -> activation -> LayerNorm.
/// Its bias and activation come from `classifier_bias` and `classifier_activation`.
#[derive(Module, Debug)]
pub struct ModernBertPredictionHead {
    pub dense: Linear,
    pub norm: LayerNorm,
    #[module(skip)]
    pub act: HiddenAct,
    #[module(skip)]
    pub norm_eps: f64,
}

impl ModernBertPredictionHead {
    pub fn new(config: &ModernBertConfig, act: HiddenAct, device: &Device) -> Self {
        let h = config.hidden_size;
        let std = InitStd::new(config).output;
        Self {
            dense: linear(h, h, config.classifier_bias, std, config, device),
            norm: layer_norm(config, device),
            act,
            norm_eps: config.norm_eps,
        }
    }

    /// # Shapes
    /// - `x`: `[..., hidden]`
    /// - output: `[..., hidden]`, f32
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let x = activate(self.act, dense(&self.dense, x));
        norm(&self.norm, self.norm_eps, cast(x, DType::F32))
    }
}

/// The MLM decoder's own parameter: its bias (HF `decoder.bias`, present when
/// `decoder_bias`). Its weight is the token-embedding matrix, passed in by
/// [`ModernBertForMaskedLM`]: a structural tie, one parameter used twice.
#[derive(Module, Debug)]
pub struct ModernBertDecoder {
    pub bias: Option<Param<Tensor<1>>>,
}

impl ModernBertDecoder {
    /// # Shapes
    /// - `x`: `[..., hidden]`, `weight`: `[vocab, hidden]`
    /// - output: `[..., vocab]`
    pub fn forward<const D: usize>(
        &self,
        x: Tensor<D>,
        weight: Tensor<2>,
        dtype: DType,
    ) -> Tensor<D> {
        crate::cpu_ops::linear(
            cast(x, dtype),
            cast(weight, dtype).transpose(),
            self.bias.as_ref().map(|b| cast(b.val(), dtype)),
        )
    }
}

/// ModernBERT with its masked-language-modelling head (`ModernBertForMaskedLM`).
#[derive(Module, Debug)]
pub struct ModernBertForMaskedLM {
    pub model: ModernBertModel,
    pub head: ModernBertPredictionHead,
    pub decoder: ModernBertDecoder,
    /// Recompute each layer in the backward instead of keeping its activations
    /// ([`crate::MaskedLm::with_gradient_checkpointing`]).
    #[module(skip)]
    pub gradient_checkpointing: bool,
}

impl ModernBertForMaskedLM {
    /// A freshly initialised model, as transformers' `_init_weights` for ModernBERT:
    /// truncated normals (cut at `initializer_cutoff_factor` standard deviations) of std
    /// `initializer_range` for the token embeddings, `Wqkv` and `Wi`, and
    /// `initializer_range / sqrt(2 num_hidden_layers)` for both `Wo` and the head's dense
    /// layer; zero biases, LayerNorms 1 (and 0). The config must pass
    /// [`ModernBertConfig::validate`] and its parameters fit in memory.
    pub fn new(config: &ModernBertConfig, device: &Device) -> Result<Self, ConfigError> {
        config.validate()?;
        config.check_memory()?;
        let act = config.activation()?;
        // One dropout stream for the whole model (crate::dropout).
        let stream = DropoutStream::shared();
        let layers = config
            .layers()
            .into_iter()
            .enumerate()
            .map(|(i, layer)| ModernBertEncoderLayer::new(config, i, layer, act, &stream, device))
            .collect();
        Ok(Self {
            model: ModernBertModel {
                embeddings: ModernBertEmbeddings::new(config, &stream, device),
                layers,
                final_norm: layer_norm(config, device),
                norm_eps: config.norm_eps,
            },
            head: ModernBertPredictionHead::new(config, config.head_activation()?, device),
            decoder: ModernBertDecoder {
                bias: config
                    .decoder_bias
                    .then(|| Param::from_tensor(Tensor::zeros([config.vocab_size], device))),
            },
            gradient_checkpointing: false,
        })
    }

    /// Logits over the vocabulary at every position.
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask`: `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: impl Into<BatchMask>,
    ) -> Tensor<3> {
        let hidden = self.model.forward(input_ids, attention_mask);
        self.logits(hidden)
    }

    /// Logits only at the given flat positions (`batch_index * seq + position`), as
    /// transformers' `sparse_prediction`: the vocab projection runs on the masked tokens only.
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
        let hidden = self.model.encode(input_ids, attention_mask.into());
        self.head_at(hidden, positions)
    }

    /// The final LayerNorm, then head and decoder at the given flat positions of the last
    /// layer's output.
    ///
    /// # Shapes
    /// - `hidden`: `[batch, seq, hidden]`, `positions`: `[masked]`
    /// - output: `[masked, vocab]`
    pub(crate) fn head_at(&self, hidden: Tensor<3>, positions: Tensor<1, Int>) -> Tensor<2> {
        let hidden = norm(&self.model.final_norm, self.model.norm_eps, hidden);
        let [batch, seq, width] = hidden.dims();
        // [batch * seq, hidden] -> [masked, hidden]
        let picked = hidden.reshape([batch * seq, width]).select(0, positions);
        self.logits(picked)
    }

    /// Head and decoder, the decoder in the head's dense dtype (mixed precision).
    fn logits<const D: usize>(&self, hidden: Tensor<D>) -> Tensor<D> {
        let x = self.head.forward(hidden);
        let dtype = self.head.dense.weight.val().dtype();
        self.decoder.forward(x, self.word_embeddings(), dtype)
    }

    /// Appends one vocabulary row per entry of `sources`, each the mean of the existing rows
    /// `sources[i]`, in the token embeddings and the decoder bias alike (see
    /// [`crate::RobertaForMaskedLM::with_new_rows`] for why). Every source id must be below
    /// the current vocabulary size.
    ///
    /// # Shapes
    /// - token embeddings `[vocab, hidden]` -> `[vocab + sources.len(), hidden]`
    pub fn with_new_rows(mut self, sources: &[Vec<u32>]) -> Self {
        let embeddings = self.word_embeddings();
        let mean_rows = |table: Tensor<2>| crate::model::grow_rows(table, sources);
        self.model.embeddings.tok_embeddings.weight = Param::from_tensor(mean_rows(embeddings));
        if let Some(bias) = self.decoder.bias.take() {
            // The bias as a [vocab, 1] column, grown the same way.
            let column = bias.val().unsqueeze_dim::<2>(1);
            self.decoder.bias = Some(Param::from_tensor(mean_rows(column).squeeze_dim::<1>(1)));
        }
        self
    }

    /// The same model with every full-attention layer computed by `implementation` (sliding
    /// layers run the CPU backend's band kernel, or eager with the window mask elsewhere).
    pub fn with_attention(mut self, implementation: AttentionImpl) -> Self {
        for layer in &mut self.model.layers {
            layer.attn.implementation = implementation;
        }
        self
    }

    /// The token-embedding matrix, which is also the decoder weight.
    pub fn word_embeddings(&self) -> Tensor<2> {
        self.model.embeddings.tok_embeddings.weight.val()
    }

    /// The random stream every dropout of this model draws from.
    pub fn dropout_stream(&self) -> &Arc<DropoutStream> {
        &self.model.embeddings.drop.stream
    }
}
