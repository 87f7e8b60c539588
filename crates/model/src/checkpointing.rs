//! Gradient checkpointing: transformers' `gradient_checkpointing_enable()`, one checkpoint per
//! encoder layer (as `GradientCheckpointingLayer` does).
//!
//! Without it, the backward needs every activation every layer computed, kept from the forward:
//! at 512 tokens, about 20 tensors of the layer's width and the `[heads, seq, seq]` attention
//! probabilities, per layer and per sequence. With it, the forward keeps only each layer's input;
//! the backward walks the layers from the last, recomputes one layer's forward with its graph,
//! backpropagates through it and drops it before the next. About one more forward's compute for
//! about one layer's activations.
//!
//! burn's own checkpointing (its autodiff backend's `BalancedCheckpointing`) recomputes burn's
//! primitive ops only; the fused CPU kernels (`cpu_ops`) are single graph nodes that keep their
//! own state, so it would free little. The recomputation here is a function of the public tensor
//! API only ([`Tensor::detach`], `require_grad`, `backward`), so it runs on every backend:
//!
//! 1. the embeddings run with their graph; each layer then runs on a detached input with
//!    detached parameters: nothing of it is recorded;
//! 2. the head and the loss run on the detached last output, marked `require_grad`: their
//!    backward gives the parameters' gradients and `g`, the gradient of that output;
//! 3. for each layer from the last: its forward again, on its kept input marked `require_grad`,
//!    then the backward of `sum(output * g)`, whose gradient at the output is `g` exactly: the
//!    layer's parameter gradients and the next `g`;
//! 4. the backward of `sum(embeddings * g)`.
//!
//! Dropout: the recomputation must draw the masks the first pass drew, or its gradients belong
//! to another network. Each layer's first mask number is noted before its first pass and the
//! model's [`crate::DropoutStream`] is set back to it before the recomputation
//! ([`crate::DropoutStream::replay_from`]). On the CPU backend a mask is a function of (seed,
//! mask number), so the masks are those a run without checkpointing draws, and the gradients
//! equal its gradients. On device backends the device generator is reseeded at each layer (one
//! synchronisation per layer and pass): the same masks in both passes, but not those a run
//! without checkpointing draws (as runs on two backends, equal in distribution).

use burn::module::{Module, ModuleMapper, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Int, Tensor};

use crate::modernbert::LayerInputs;
use crate::{BatchMask, KeyMask, MaskedLm};

/// What the layers of one forward share: the key mask, and ModernBERT's rotary tables.
enum Shared {
    Roberta(Box<KeyMask>),
    ModernBert(Box<LayerInputs>),
}

/// Detaches every parameter: a forward through the result records nothing for the backward.
/// (burn's `detach` keeps `require_grad` on a leaf: a parameter stays tracked without the
/// `set_require_grad(false)`.)
struct Detach;

impl ModuleMapper for Detach {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|t| t.detach().set_require_grad(false))
    }
}

impl MaskedLm {
    /// The same model with gradient checkpointing on or off (transformers'
    /// `gradient_checkpointing_enable()` / `_disable()`). It changes what
    /// [`MaskedLm::loss_gradients`] keeps in memory, not what it computes; the forwards are
    /// unchanged.
    pub fn with_gradient_checkpointing(mut self, enabled: bool) -> Self {
        match &mut self {
            MaskedLm::Roberta(m) => m.gradient_checkpointing = enabled,
            MaskedLm::ModernBert(m) => m.gradient_checkpointing = enabled,
        }
        self
    }

    /// Whether [`MaskedLm::loss_gradients`] recomputes layers instead of keeping them.
    pub fn gradient_checkpointing(&self) -> bool {
        match self {
            MaskedLm::Roberta(m) => m.gradient_checkpointing,
            MaskedLm::ModernBert(m) => m.gradient_checkpointing,
        }
    }

    /// The gradients of `loss(logits)`, logits taken at `positions` as in
    /// [`MaskedLm::forward_at`], for the parameters of `params`: this model itself, or the f32
    /// model whose mixed-precision view it is (its parameters keep their ids). With gradient
    /// checkpointing, layer by layer (module doc); without, one backward through the whole
    /// graph. `loss` runs once and must return a one-element tensor.
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq]`, `positions`: `[masked]`; `loss` maps `[masked, vocab]`
    ///   to `[1]`
    pub fn loss_gradients(
        &self,
        params: &MaskedLm,
        input_ids: Tensor<2, Int>,
        mask: BatchMask,
        positions: Tensor<1, Int>,
        loss: impl FnOnce(Tensor<2>) -> Tensor<1>,
    ) -> GradientsParams {
        if !self.gradient_checkpointing() {
            let logits = self.forward_at(input_ids, mask, positions);
            return GradientsParams::from_grads(loss(logits).backward(), params);
        }
        let stream = match self {
            MaskedLm::Roberta(m) => m.dropout_stream().clone(),
            MaskedLm::ModernBert(m) => m.dropout_stream().clone(),
        };
        let (embedded, shared) = self.embed(input_ids, mask);
        let device = embedded.device();
        // 1. Every layer without its graph, keeping its input and first mask number.
        let mut kept = Vec::with_capacity(self.layer_count());
        let mut x = embedded.clone().detach();
        for i in 0..self.layer_count() {
            let call = stream.position();
            stream.replay_from(call, &device);
            kept.push((x.clone(), call));
            x = self.layer(i, x, &shared, false);
        }
        let after = stream.position();
        // 2. Head and loss.
        let mut accumulator = GradientsAccumulator::<MaskedLm>::new();
        let last = x.require_grad();
        let grads = loss(self.head_at(last.clone(), positions)).backward();
        let mut g = last.grad(&grads);
        accumulator.accumulate(params, GradientsParams::from_grads(grads, params));
        // 3. Each layer again, with its graph, from the last.
        for i in (0..self.layer_count()).rev() {
            let Some(upstream) = g.take() else { break };
            let Some((input, call)) = kept.pop() else {
                break;
            };
            stream.replay_from(call, &device);
            let input = input.require_grad();
            let output = self.layer(i, input.clone(), &shared, true);
            let grads = project(output, upstream).backward();
            g = input.grad(&grads);
            accumulator.accumulate(params, GradientsParams::from_grads(grads, params));
        }
        stream.replay_from(after, &device);
        // 4. The embeddings.
        if let Some(upstream) = g {
            let grads = project(embedded, upstream).backward();
            accumulator.accumulate(params, GradientsParams::from_grads(grads, params));
        }
        accumulator.grads()
    }

    fn embed(&self, input_ids: Tensor<2, Int>, mask: BatchMask) -> (Tensor<3>, Shared) {
        match self {
            MaskedLm::Roberta(m) => {
                let (x, keys) = m.roberta.embed(input_ids, &mask);
                (x, Shared::Roberta(Box::new(keys)))
            }
            MaskedLm::ModernBert(m) => {
                let (x, inputs) = m.model.embed(input_ids, mask);
                (x, Shared::ModernBert(Box::new(inputs)))
            }
        }
    }

    fn layer_count(&self) -> usize {
        match self {
            MaskedLm::Roberta(m) => m.roberta.encoder.layer.len(),
            MaskedLm::ModernBert(m) => m.model.layers.len(),
        }
    }

    /// Layer `i` on `x`; without `tracked`, on detached parameters.
    fn layer(&self, i: usize, x: Tensor<3>, shared: &Shared, tracked: bool) -> Tensor<3> {
        match (self, shared) {
            (MaskedLm::Roberta(m), Shared::Roberta(keys)) => {
                let layer = &m.roberta.encoder.layer[i];
                match tracked {
                    true => layer.forward(x, keys),
                    false => layer.clone().map(&mut Detach).forward(x, keys),
                }
            }
            (MaskedLm::ModernBert(m), Shared::ModernBert(inputs)) => {
                let layer = &m.model.layers[i];
                match tracked {
                    true => layer.forward(x, inputs),
                    false => layer.clone().map(&mut Detach).forward(x, inputs),
                }
            }
            // `embed` makes the shared inputs of the model's own family.
            _ => unreachable!("layer inputs of another model family"),
        }
    }

    fn head_at(&self, hidden: Tensor<3>, positions: Tensor<1, Int>) -> Tensor<2> {
        match self {
            MaskedLm::Roberta(m) => m.head_at(hidden, positions),
            MaskedLm::ModernBert(m) => m.head_at(hidden, positions),
        }
    }
}

/// `sum(output * upstream)`: its backward starts `upstream` (a constant) at `output`.
fn project(output: Tensor<3>, upstream: Tensor<3>) -> Tensor<1> {
    let upstream = upstream.cast(burn::tensor::FloatDType::from(output.dtype()));
    (output * upstream).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ModernBertConfig, RobertaConfig};
    use burn::tensor::Device;

    /// The first pass must record nothing: a layer output that is still tracked keeps the
    /// layer's whole graph (every activation) alive until the backward, which is the memory
    /// checkpointing exists to save, while the gradients stay right. (burn's `detach` keeps
    /// `require_grad` on a leaf: detaching the parameters alone left them tracked.)
    #[test]
    fn the_first_pass_records_no_graph_in_either_family() {
        let device = Device::flex().autodiff();
        let roberta = RobertaConfig {
            vocab_size: 50,
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 32,
            max_position_embeddings: 20,
            ..RobertaConfig::default()
        };
        let modernbert = ModernBertConfig {
            vocab_size: 50,
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 32,
            pad_token_id: 1,
            bos_token_id: Some(0),
            cls_token_id: Some(0),
            sep_token_id: Some(2),
            eos_token_id: None,
            ..ModernBertConfig::default()
        };
        for config in [roberta.into(), modernbert.resolved().into()] {
            let model = MaskedLm::new(&config, &device).expect("valid config");
            let ids = Tensor::<2, Int>::from_ints([[0, 7, 8, 9, 2]], &device);
            let mask = BatchMask::from(Tensor::<2, Int>::ones([1, 5], &device));
            let (embedded, shared) = model.embed(ids, mask);
            assert!(embedded.is_tracked(), "the embeddings keep their graph");
            let first = model.layer(0, embedded.clone().detach(), &shared, false);
            assert!(
                !first.is_tracked(),
                "{:?}: first pass tracked",
                model.family()
            );
            let again = model.layer(0, embedded.detach().require_grad(), &shared, true);
            assert!(again.is_tracked(), "the recomputation is tracked");
        }
    }
}
