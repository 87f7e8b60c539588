//! AdamW with HF Trainer parameter groups, global-norm clipping, and the learning-rate schedule.

use burn::module::{Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::TrainError;

/// `[optimizer]`: AdamW hyper-parameters. burn's own defaults differ from transformers'
/// (eps 1e-5, weight decay 1e-4 on every parameter), so every value is set from here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Peak learning rate.
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay, applied to weight matrices and embeddings only (not to biases
    /// and LayerNorm parameters, as the HF Trainer does).
    #[serde(default)]
    pub weight_decay: f64,
    /// Global L2 norm to clip gradients to (torch `clip_grad_norm_`); 0 disables clipping.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
}

fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_max_grad_norm() -> f64 {
    1.0
}

impl OptimizerConfig {
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |key: &str, reason: String| {
            Err(TrainError::Config {
                key: format!("optimizer.{key}"),
                reason,
            })
        };
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", format!("{} must be a positive number", self.lr));
        }
        for (i, b) in self.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return bad("betas", format!("beta{} = {b} must be in [0, 1)", i + 1));
            }
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return bad("eps", format!("{} must be positive", self.eps));
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return bad(
                "weight_decay",
                format!("{} must be >= 0", self.weight_decay),
            );
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm < 0.0 {
            return bad(
                "max_grad_norm",
                format!("{} must be >= 0", self.max_grad_norm),
            );
        }
        Ok(())
    }

    /// AdamW over `model`'s parameters, grouped as the HF Trainer does
    /// (`Trainer.get_decay_parameter_names`): no weight decay for LayerNorm parameters and any
    /// parameter whose name contains "bias"; decay for the rest (weight matrices, embeddings).
    pub fn build<M: Module>(&self, model: &M) -> ModuleOptimizer {
        let adamw = |weight_decay: f64| {
            AdamWConfig::new()
                .with_beta_1(self.betas[0] as f32)
                .with_beta_2(self.betas[1] as f32)
                .with_epsilon(self.eps as f32)
                .with_weight_decay(weight_decay as f32)
        };
        let no_decay = no_decay_params(model)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        adamw(self.weight_decay).init().with_group(
            ParamGroup::from_ids(no_decay),
            adamw(0.0).build(),
            None,
        )
    }
}

/// The parameters the HF Trainer exempts from weight decay, with their module paths: those of
/// LayerNorm modules, and those whose lower-cased path matches one of the Trainer's forbidden
/// name patterns (`Trainer.get_decay_parameter_names`: "bias", "layernorm", "rmsnorm", a
/// `norm` segment, a segment ending in `_norm`).
pub fn no_decay_params<M: Module>(model: &M) -> Vec<(ParamId, String)> {
    #[derive(Default)]
    struct Collect {
        path: Vec<String>,
        containers: Vec<String>,
        found: Vec<(ParamId, String)>,
    }
    impl ModuleVisitor for Collect {
        // The family variant of `MaskedLm` ("Enum:MaskedLm") is not part of a parameter's
        // name: names are the family's HF module paths.
        fn enter_module(&mut self, name: &str, container_type: &str) {
            if !container_type.starts_with("Enum:") {
                self.path.push(name.to_string());
            }
            self.containers.push(container_type.to_string());
        }
        fn exit_module(&mut self, _name: &str, container_type: &str) {
            if !container_type.starts_with("Enum:") {
                self.path.pop();
            }
            self.containers.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let name = self.path.join(".");
            let lower = name.to_lowercase();
            let in_layer_norm = self.containers.iter().any(|c| c == "Struct:LayerNorm");
            let forbidden_name = ["bias", "layernorm", "rmsnorm"]
                .iter()
                .any(|p| lower.contains(p))
                || lower
                    .split('.')
                    .any(|segment| segment == "norm" || segment.ends_with("_norm"));
            if in_layer_norm || forbidden_name {
                self.found.push((param.id, name));
            }
        }
    }
    let mut visitor = Collect::default();
    model.visit(&mut visitor);
    visitor.found
}

/// The sum of the squares of every gradient of `model`'s parameters, on the device (`None`
/// without gradients): read it when convenient (the training step reads it with the loss).
///
/// # Shapes
/// - output: `[1]`
pub fn grad_sum_squares<M: Module>(model: &M, grads: &GradientsParams) -> Option<Tensor<1>> {
    struct SumSquares<'a> {
        grads: &'a GradientsParams,
        total: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SumSquares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let s = g.square().sum();
                self.total = Some(match self.total.take() {
                    Some(t) => t + s,
                    None => s,
                });
            }
        }
    }
    let mut sum = SumSquares { grads, total: None };
    model.visit(&mut sum);
    sum.total
}

/// The global L2 norm of the gradients of a loss multiplied by `loss_scale` (1 without f16
/// loss scaling), from their sum of squares already read from the device, and the gradients
/// divided by `loss_scale` and scaled down to `max_norm` when the norm exceeds it (`max_norm`
/// 0: not clipped). Mirrors torch `clip_grad_norm_`: the scale is `max_norm / (norm + 1e-6)`,
/// clamped to at most 1.
pub fn clip_by_sum_squares<M: Module>(
    model: &M,
    grads: GradientsParams,
    sum_squares: f64,
    max_norm: f64,
    loss_scale: f64,
) -> (GradientsParams, f64) {
    struct Scale {
        grads: GradientsParams,
        factor: f64,
    }
    impl ModuleVisitor for Scale {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads
                    .register::<D>(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    let norm = sum_squares.sqrt() / loss_scale;
    if norm.is_finite() {
        let clip = if max_norm > 0.0 {
            (max_norm / (norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        let factor = clip / loss_scale;
        if factor != 1.0 {
            let mut scale = Scale { grads, factor };
            model.visit(&mut scale);
            return (scale.grads, norm);
        }
    }
    (grads, norm)
}

/// How the learning rate decays after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    #[default]
    Linear,
    Cosine,
    Constant,
}

/// `[schedule]`: linear warmup, then linear, cosine or constant decay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    pub decay: Decay,
    /// Warmup length in optimizer steps.
    pub warmup_steps: Option<usize>,
    /// Warmup length as a fraction of the total steps (used when `warmup_steps` is absent).
    pub warmup_ratio: Option<f64>,
}

impl ScheduleConfig {
    /// Warmup steps for a run of `total` steps (HF: `ceil(total * warmup_ratio)`).
    pub fn warmup(&self, total: usize) -> usize {
        match (self.warmup_steps, self.warmup_ratio) {
            (Some(steps), _) => steps,
            (None, Some(ratio)) => (total as f64 * ratio).ceil() as usize,
            (None, None) => 0,
        }
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        if let Some(r) = self.warmup_ratio
            && !(0.0..=1.0).contains(&r)
        {
            return Err(TrainError::Config {
                key: "schedule.warmup_ratio".to_string(),
                reason: format!("{r} is not a fraction in [0, 1]"),
            });
        }
        Ok(())
    }

    /// The learning rate of optimizer step `step` (0-based) out of `total`, as transformers'
    /// `get_{linear,cosine,constant}_schedule_with_warmup`: the first warmup step has lr 0.
    pub fn lr(&self, peak: f64, step: usize, total: usize) -> f64 {
        let warmup = self.warmup(total);
        if step < warmup {
            return peak * step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        match self.decay {
            Decay::Linear => peak * (1.0 - progress).max(0.0),
            Decay::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()).max(0.0),
            Decay::Constant => peak,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_transformers_formulas() {
        let linear = ScheduleConfig {
            decay: Decay::Linear,
            warmup_steps: Some(10),
            warmup_ratio: None,
        };
        assert_eq!(linear.lr(1.0, 0, 110), 0.0);
        assert!((linear.lr(1.0, 5, 110) - 0.5).abs() < 1e-12);
        assert!((linear.lr(1.0, 10, 110) - 1.0).abs() < 1e-12);
        assert!((linear.lr(1.0, 60, 110) - 0.5).abs() < 1e-12);
        assert_eq!(linear.lr(1.0, 110, 110), 0.0);
        let cosine = ScheduleConfig {
            decay: Decay::Cosine,
            warmup_steps: None,
            warmup_ratio: Some(0.1),
        };
        assert_eq!(cosine.warmup(100), 10);
        assert!((cosine.lr(2.0, 55, 100) - 1.0).abs() < 1e-12);
        let constant = ScheduleConfig {
            decay: Decay::Constant,
            ..ScheduleConfig::default()
        };
        assert_eq!(constant.lr(3e-4, 99, 100), 3e-4);
    }
}
