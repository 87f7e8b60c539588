//! StableAdamW, ModernBERT's optimizer: AdamW whose step on each tensor is divided by the RMS
//! of `g² / v` when that exceeds 1 (Wortsman et al. 2023, "Stable and low-precision training
//! for large-scale vision-language models"), as torch-optimi 0.3.3 `optimi.StableAdamW`
//! implements it (`_single_param_stableadamw`, in f32 without Kahan summation):
//!
//! 1. `β̂ = (βᵗ - β) / (βᵗ - 1)` for both betas (optimi's `debias_beta`): the moving averages
//!    are bias-corrected as they are updated, so no separate correction follows;
//! 2. `m ← lerp(m, g, 1 - β̂₁)`, `v ← β̂₂ v + (1 - β̂₂) g²`;
//! 3. `rms = sqrt(mean(g² / max(v, eps²)))` over the whole tensor, `lrₜ = lr / max(1, rms)`;
//! 4. weight decay fully decoupled from the schedule (`decouple_lr=True`, `max_lr` the peak
//!    lr, as ModernBERT's `decoupled_stableadamw` builds it): `p ← p (1 - lrₜ / max_lr · wd)`;
//! 5. `p ← p - lrₜ m / (sqrt(v) + eps)`.
//!
//! The RMS and `lrₜ` stay on the device (optimi reads `rms.item()`, a sync per tensor).

use burn::optim::{LearningRate, Optimizer, RecordState, StateSink, StateSource};
use burn::store::burn_pack::Scalar;
use burn::tensor::{Device, Tensor};

/// One parameter group's StableAdamW (see the module doc).
#[derive(Debug, Clone)]
pub struct StableAdamW {
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    /// The peak learning rate, which the decay is relative to (optimi's `max_lr`).
    pub max_lr: f64,
}

/// A parameter's StableAdamW state: the step count and the (already bias-corrected) moving
/// averages, optimi's `step`, `exp_avg` and `exp_avg_sq`. Its record keys differ from burn
/// AdamW's (`momentum.*`), whose moments are not bias-corrected: a resume that switches
/// `optimizer.name` starts the new optimizer's moments afresh rather than misreading them.
#[derive(Clone)]
pub struct StableAdamWState<const D: usize> {
    pub step: usize,
    pub exp_avg: Tensor<D>,
    pub exp_avg_sq: Tensor<D>,
}

impl<const D: usize> RecordState for StableAdamWState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        out.push_scalar(prefix, "step", Scalar::from(self.step));
        out.push_tensor(prefix, "exp_avg", self.exp_avg.clone().into_data());
        out.push_tensor(prefix, "exp_avg_sq", self.exp_avg_sq.clone().into_data());
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        let step = usize::try_from(src.take_scalar(prefix, "step")?).ok()?;
        let exp_avg = Tensor::from_data(src.take_tensor(prefix, "exp_avg")?, device);
        let exp_avg_sq = Tensor::from_data(src.take_tensor(prefix, "exp_avg_sq")?, device);
        Some(Self {
            step,
            exp_avg,
            exp_avg_sq,
        })
    }
}

/// optimi's `debias_beta`: `β(1 - βᵗ⁻¹) / (1 - βᵗ)`, written as optimi computes it.
fn debias_beta(beta: f64, step: usize) -> f64 {
    let power = beta.powi(step as i32);
    (power - beta) / (power - 1.0)
}

/// torch's `lerp(start, end, weight)` for a scalar weight: the formula switches at 0.5 for
/// accuracy (ATen `lerp`), and so does this.
fn lerp<const D: usize>(start: Tensor<D>, end: Tensor<D>, weight: f64) -> Tensor<D> {
    let diff = end.clone() - start.clone();
    if weight < 0.5 {
        start + diff.mul_scalar(weight)
    } else {
        end - diff.mul_scalar(1.0 - weight)
    }
}

impl Optimizer for StableAdamW {
    type State<const D: usize> = StableAdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let [beta_1, beta_2] = self.betas;
        let (step, exp_avg, exp_avg_sq) = match state {
            Some(s) => (s.step + 1, s.exp_avg, s.exp_avg_sq),
            None => (1, grad.zeros_like(), grad.zeros_like()),
        };
        let (beta_1_hat, beta_2_hat) = (debias_beta(beta_1, step), debias_beta(beta_2, step));
        let exp_avg = lerp(exp_avg, grad.clone(), 1.0 - beta_1_hat);
        let grad_sq = grad.square();
        let exp_avg_sq =
            exp_avg_sq.mul_scalar(beta_2_hat) + grad_sq.clone().mul_scalar(1.0 - beta_2_hat);

        // Per-tensor update clipping: the step shrinks by the RMS of g²/v where it exceeds 1.
        // [1] -> [1, ..., 1], to broadcast over the tensor.
        let rms = (grad_sq / exp_avg_sq.clone().clamp_min(self.eps * self.eps))
            .mean()
            .sqrt();
        let lr_t: Tensor<D> = rms.clamp_min(1.0).recip().mul_scalar(lr).unsqueeze();

        let tensor = if self.weight_decay != 0.0 {
            let keep = lr_t
                .clone()
                .mul_scalar(-self.weight_decay / self.max_lr)
                .add_scalar(1.0);
            tensor * keep
        } else {
            tensor
        };
        let update = exp_avg.clone() / exp_avg_sq.clone().sqrt().add_scalar(self.eps);
        let tensor = tensor - update * lr_t;
        let state = StableAdamWState {
            step,
            exp_avg,
            exp_avg_sq,
        };
        (tensor, Some(state))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        StableAdamWState {
            step: state.step,
            exp_avg: state.exp_avg.to_device(device),
            exp_avg_sq: state.exp_avg_sq.to_device(device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debiased_betas_are_adams_bias_correction() {
        // Step 1 takes the gradient as is (β̂ = 0); an EMA with β̂ₜ equals Adam's
        // m̂ₜ = mₜ / (1 - βᵗ) for a constant gradient sequence of ones: 1 at every step.
        assert_eq!(debias_beta(0.9, 1), 0.0);
        let (mut raw, mut debiased) = (0.0_f64, 0.0_f64);
        for t in 1..=20 {
            raw = 0.9 * raw + 0.1 * t as f64;
            let hat = debias_beta(0.9, t);
            debiased = hat * debiased + (1.0 - hat) * t as f64;
            let corrected = raw / (1.0 - 0.9_f64.powi(t as i32));
            assert!((debiased - corrected).abs() < 1e-9 * corrected, "step {t}");
        }
    }
}
