//! One optimizer step: forward/backward over micro-batches, clipping, AdamW.

use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::Tensor;
use masklm_data::MlmBatch;
use masklm_model::{BatchMask, MaskedLm, mlm_loss};

use crate::precision::{LossScaler, Precision, autocast};

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean cross-entropy over all masked tokens of the step's micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Masked tokens that contributed.
    pub masked: usize,
    /// The update was skipped and the weights are unchanged: the loss or the gradient norm was
    /// not finite (under f16 the loss scale was halved too), or no token was masked.
    pub skipped: bool,
}

/// Runs forward and backward on each micro-batch, accumulates gradients weighted by each
/// micro-batch's share of masked tokens (so accumulation equals one larger batch), clips them
/// to `max_grad_norm` and applies one AdamW update at `lr`. Under mixed precision (see
/// [`crate::precision`]) the forward and backward run on a half-precision view of `model`,
/// and the update on its f32 weights; `scaler` is used (and updated) for f16 only.
///
/// A non-finite loss or gradient norm never reaches the optimizer (as fairseq's
/// `FloatingPointError` and `clip_grad_norm_(error_if_nonfinite=True)`): the step is skipped
/// and the weights stay bit-identical. So is a step without any masked token.
pub fn train_step(
    model: MaskedLm,
    optimizer: &mut ModuleOptimizer,
    batches: &[MlmBatch],
    lr: f64,
    max_grad_norm: f64,
    precision: Precision,
    scaler: &mut LossScaler,
) -> (MaskedLm, StepStats) {
    let total: usize = batches.iter().map(|b| b.masked).sum();
    if total == 0 {
        let stats = StepStats {
            loss: f64::NAN,
            grad_norm: f64::NAN,
            masked: 0,
            skipped: true,
        };
        return (model, stats);
    }
    let compute = match precision.half() {
        Some(dtype) => autocast(&model, dtype),
        None => model.clone(),
    };
    let loss_scale = if precision == Precision::F16 {
        scaler.scale
    } else {
        1.0
    };
    let mut accumulator = GradientsAccumulator::<MaskedLm>::new();
    // The loss stays on the device until the end of the step: reading it per micro-batch
    // would make the host wait for each forward before it can queue the backward.
    let plain = model.word_embeddings().device().without_autodiff();
    let mut loss_sum = Tensor::<1>::zeros([1], &plain);
    for batch in batches.iter().filter(|b| b.masked > 0) {
        let weight = batch.masked as f64 / total as f64;
        // Gradients are taken for the f32 parameters of `model`: under autocast they flow
        // back through the casts. With gradient checkpointing, layer by layer.
        let grads = compute.loss_gradients(
            &model,
            batch.input_ids.clone(),
            batch_mask(batch),
            batch.positions.clone(),
            |logits| {
                let weighted = mlm_loss(logits, batch.labels.clone()).mul_scalar(weight);
                loss_sum = loss_sum.clone() + weighted.clone().without_autodiff();
                weighted.mul_scalar(loss_scale)
            },
        );
        accumulator.accumulate(&model, grads);
    }
    // The compute view shares the f32 weights (or is their half-precision copy): dropped
    // here so that the optimizer finds the weights held only by `model` and updates them in
    // place (crate::adamw).
    drop(compute);
    let grads = accumulator.grads();
    let (loss_sum, sum_squares) = read_loss_and_sum_squares(&model, &grads, loss_sum);
    let (grads, grad_norm) =
        crate::optim::clip_by_sum_squares(&model, grads, sum_squares, max_grad_norm, loss_scale);
    let skipped = !(grad_norm.is_finite() && loss_sum.is_finite());
    if precision == Precision::F16 {
        scaler.update(skipped);
    }
    let model = if skipped {
        model
    } else {
        optimizer.step(lr, model, grads)
    };
    let stats = StepStats {
        loss: loss_sum,
        grad_norm,
        masked: total,
        skipped,
    };
    (model, stats)
}

/// The step's loss and its gradients' sum of squares, in one device-to-host transfer: the
/// step's only read (the skip decision needs both before the update).
fn read_loss_and_sum_squares(
    model: &MaskedLm,
    grads: &GradientsParams,
    loss: Tensor<1>,
) -> (f64, f64) {
    let device = loss.device();
    let sum_squares =
        crate::optim::grad_sum_squares(model, grads).unwrap_or_else(|| Tensor::zeros([1], &device));
    let both = Tensor::cat(vec![loss, sum_squares], 0)
        .into_data()
        .convert::<f32>();
    match both.as_slice::<f32>() {
        Ok(&[loss, sum_squares]) => (loss as f64, sum_squares as f64),
        _ => (f64::NAN, f64::NAN),
    }
}

/// The batch's attention mask, with its packed documents when it has them.
pub fn batch_mask(batch: &MlmBatch) -> BatchMask {
    match &batch.documents {
        Some(documents) => {
            let [_, seq] = batch.input_ids.dims();
            BatchMask::packed(documents.clone(), seq, &batch.input_ids.device())
                // `collate_packed` lays each row's documents out within its width.
                .expect("packed documents fit their rows")
        }
        None => batch.attention_mask.clone().into(),
    }
}
