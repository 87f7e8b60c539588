//! One optimizer step: forward/backward over micro-batches, clipping, AdamW.

use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use masklm_data::MlmBatch;
use masklm_model::{RobertaForMaskedLM, mlm_loss};

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean cross-entropy over all masked tokens of the step's micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Masked tokens that contributed.
    pub masked: usize,
}

/// Runs forward and backward on each micro-batch, accumulates gradients weighted by each
/// micro-batch's share of masked tokens (so accumulation equals one larger batch), clips them
/// to `max_grad_norm` and applies one AdamW update at `lr`.
///
/// Returns the model unchanged and `None` when no micro-batch has a masked token.
pub fn train_step(
    model: RobertaForMaskedLM,
    optimizer: &mut ModuleOptimizer,
    batches: &[MlmBatch],
    lr: f64,
    max_grad_norm: f64,
) -> (RobertaForMaskedLM, Option<StepStats>) {
    let total: usize = batches.iter().map(|b| b.masked).sum();
    if total == 0 {
        return (model, None);
    }
    let mut accumulator = GradientsAccumulator::<RobertaForMaskedLM>::new();
    let mut loss_sum = 0.0;
    for batch in batches.iter().filter(|b| b.masked > 0) {
        let logits = model.forward_at(
            batch.input_ids.clone(),
            batch.attention_mask.clone(),
            batch.positions.clone(),
        );
        let loss = mlm_loss(logits, batch.labels.clone());
        let weight = batch.masked as f64 / total as f64;
        let weighted = loss.mul_scalar(weight);
        loss_sum += weighted.clone().into_scalar::<f32>() as f64;
        let grads = GradientsParams::from_grads(weighted.backward(), &model);
        accumulator.accumulate(&model, grads);
    }
    let (grads, grad_norm) =
        crate::optim::clip_grad_norm(&model, accumulator.grads(), max_grad_norm);
    let model = optimizer.step(lr, model, grads);
    (
        model,
        Some(StepStats {
            loss: loss_sum,
            grad_norm,
            masked: total,
        }),
    )
}
