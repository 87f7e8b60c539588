//! AdamW or StableAdamW with HF Trainer parameter groups, global-norm clipping, and the
//! learning-rate schedule (linear, cosine, constant, warmup-stable-decay).

use burn::module::{Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::adamw::AdamW;
use crate::stable_adamw::StableAdamW;

/// `[optimizer] name`: which update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerName {
    /// torch.optim.AdamW (the HF Trainer's `adamw_torch`).
    #[default]
    Adamw,
    /// ModernBERT's `decoupled_stableadamw`: torch-optimi's `StableAdamW` with
    /// `decouple_lr=True` (see [`crate::stable_adamw`]).
    StableAdamw,
}

/// `[optimizer]`: AdamW / StableAdamW hyper-parameters. burn's own defaults differ from
/// transformers' (eps 1e-5, weight decay 1e-4 on every parameter), so every value is set from
/// here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// The update rule: `adamw` (default) or `stable_adamw`.
    #[serde(default)]
    pub name: OptimizerName,
    /// Peak learning rate.
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay, applied to weight matrices and embeddings only (not to biases
    /// and LayerNorm parameters, as the HF Trainer does). AdamW shrinks a weight by
    /// `lr * weight_decay` per step; StableAdamW, fully decoupled from the learning rate as
    /// ModernBERT trains, by `lr / peak lr * weight_decay` (so ModernBERT's 1e-5 is not
    /// AdamW's 0.01).
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

    /// The optimizer over `model`'s parameters, grouped as the HF Trainer does
    /// (`Trainer.get_decay_parameter_names`): no weight decay for LayerNorm parameters and any
    /// parameter whose name contains "bias"; decay for the rest (weight matrices, embeddings).
    /// ModernBERT's `filter_bias_norm_wd` makes the same two groups for StableAdamW.
    pub fn build<M: Module>(&self, model: &M) -> ModuleOptimizer {
        let no_decay = ParamGroup::from_ids(
            no_decay_params(model)
                .into_iter()
                .map(|(id, _)| id)
                .collect(),
        );
        match self.name {
            OptimizerName::Adamw => {
                let adamw = |weight_decay: f64| AdamW::new(self.betas, self.eps, weight_decay);
                ModuleOptimizer::from(adamw(self.weight_decay)).with_group(
                    no_decay,
                    adamw(0.0),
                    None,
                )
            }
            OptimizerName::StableAdamw => {
                let stable = |weight_decay: f64| StableAdamW {
                    betas: self.betas,
                    eps: self.eps,
                    weight_decay,
                    max_lr: self.lr,
                };
                ModuleOptimizer::from(stable(self.weight_decay)).with_group(
                    no_decay,
                    stable(0.0),
                    None,
                )
            }
        }
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
    /// Warmup-stable-decay (transformers' `warmup_stable_decay`, `get_wsd_schedule`): warmup,
    /// the peak held, then a decay over the last `decay_steps` / `decay_fraction` of the run.
    #[serde(alias = "warmup_stable_decay")]
    Wsd,
}

/// The shape of a WSD warmup or decay (transformers' `warmup_type` / `decay_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WsdShape {
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "cosine")]
    Cosine,
    /// `1 - sqrt(progress)` (decay) / `1 - sqrt(1 - progress)` (warmup).
    #[serde(rename = "1-sqrt")]
    OneMinusSqrt,
}

/// `[schedule]`: linear warmup, then linear, cosine or constant decay; or warmup-stable-decay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    pub decay: Decay,
    /// Warmup length in optimizer steps.
    pub warmup_steps: Option<usize>,
    /// Warmup length as a fraction of the total steps (used when `warmup_steps` is absent).
    pub warmup_ratio: Option<f64>,
    /// WSD: the decay length in steps (transformers' `num_decay_steps`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decay_steps: Option<usize>,
    /// WSD: the decay length as a share of the total steps, `ceil(total * decay_fraction)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decay_fraction: Option<f64>,
    /// WSD: the warmup's shape (default linear).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_type: Option<WsdShape>,
    /// WSD: the decay's shape (default cosine, as transformers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decay_type: Option<WsdShape>,
    /// WSD: where warmup starts and decay ends, as a fraction of the peak (default 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_lr_ratio: Option<f64>,
}

impl ScheduleConfig {
    /// Warmup steps for a run of `total` steps (HF: `ceil(total * warmup_ratio)`).
    pub fn warmup(&self, total: usize) -> usize {
        // transformers 4's `TrainingArguments.get_warmup_steps`, which had both keys:
        // `warmup_steps` when positive, else the ratio (transformers 5 reads a `warmup_steps`
        // below 1 as the ratio).
        match (self.warmup_steps, self.warmup_ratio) {
            (Some(steps), _) if steps > 0 => steps,
            (_, Some(ratio)) => (total as f64 * ratio).ceil() as usize,
            (_, None) => 0,
        }
    }

    /// WSD's decay steps for a run of `total` steps: `decay_steps`, or
    /// `ceil(total * decay_fraction)`.
    pub fn decay_steps(&self, total: usize) -> usize {
        match (self.decay_steps, self.decay_fraction) {
            (Some(steps), _) => steps,
            (None, Some(fraction)) => (total as f64 * fraction).ceil() as usize,
            (None, None) => 0,
        }
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |key: &str, reason: String| {
            Err(TrainError::Config {
                key: format!("schedule.{key}"),
                reason,
            })
        };
        let fraction = |key: &str, value: Option<f64>| match value {
            Some(r) if !(0.0..=1.0).contains(&r) => {
                bad(key, format!("{r} is not a fraction in [0, 1]"))
            }
            _ => Ok(()),
        };
        fraction("warmup_ratio", self.warmup_ratio)?;
        fraction("decay_fraction", self.decay_fraction)?;
        fraction("min_lr_ratio", self.min_lr_ratio)?;
        if self.decay == Decay::Wsd {
            return match (self.decay_steps, self.decay_fraction) {
                (None, None) => bad(
                    "decay_steps",
                    "decay = \"wsd\" needs the decay's length: decay_steps = N, or \
                     decay_fraction = F (a share of the total steps)"
                        .to_string(),
                ),
                (Some(_), Some(_)) => bad(
                    "decay_fraction",
                    "give decay_steps or decay_fraction, not both".to_string(),
                ),
                _ => Ok(()),
            };
        }
        let wsd_only = [
            ("decay_steps", self.decay_steps.is_some()),
            ("decay_fraction", self.decay_fraction.is_some()),
            ("warmup_type", self.warmup_type.is_some()),
            ("decay_type", self.decay_type.is_some()),
            ("min_lr_ratio", self.min_lr_ratio.is_some()),
        ];
        if let Some((key, _)) = wsd_only.iter().find(|(_, set)| *set) {
            return bad(
                key,
                format!(
                    "applies to decay = \"wsd\" only (decay is {:?}); set decay = \"wsd\" or \
                     remove it",
                    self.decay
                ),
            );
        }
        Ok(())
    }

    /// The learning rate of optimizer step `step` (0-based) out of `total`, as transformers'
    /// `get_{linear,cosine,constant}_schedule_with_warmup` (the first warmup step has lr 0) and
    /// `get_wsd_schedule`.
    pub fn lr(&self, peak: f64, step: usize, total: usize) -> f64 {
        let warmup = self.warmup(total);
        if self.decay == Decay::Wsd {
            return peak * self.wsd_factor(step, warmup, total);
        }
        if step < warmup {
            return peak * step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        match self.decay {
            Decay::Linear => peak * (1.0 - progress).max(0.0),
            Decay::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()).max(0.0),
            Decay::Constant | Decay::Wsd => peak,
        }
    }

    /// transformers' `_get_wsd_scheduler_lambda` (5.24) with `num_cycles = 0.5`, line by line.
    /// The stable phase ends `decay_steps(total)` before `total`, so until then no step's lr
    /// depends on `total` (with `warmup_steps` given): a run can be resumed with a longer or
    /// shorter `training.max_steps` while the peak is held, and is then the run planned with
    /// that length from the start.
    fn wsd_factor(&self, step: usize, warmup: usize, total: usize) -> f64 {
        use std::f64::consts::PI;
        let min_lr_ratio = self.min_lr_ratio.unwrap_or(0.0);
        // transformers' num_stable_steps = total - warmup - decay, negative when warmup and
        // decay overlap (then the decay starts early, part-way through its shape).
        let (step, warmup_i) = (step as i64, warmup as i64);
        let decay = self.decay_steps(total) as i64;
        let stable = total as i64 - warmup_i - decay;
        if step < warmup_i {
            let progress = step as f64 / warmup.max(1) as f64;
            let factor = match self.warmup_type.unwrap_or(WsdShape::Linear) {
                WsdShape::Linear => progress,
                WsdShape::Cosine => 0.5 * (1.0 - (PI * progress).cos()),
                WsdShape::OneMinusSqrt => 1.0 - (1.0 - progress).sqrt(),
            };
            return (factor * (1.0 - min_lr_ratio) + min_lr_ratio).max(0.0);
        }
        if step < warmup_i + stable {
            return 1.0;
        }
        if step < warmup_i + stable + decay {
            let progress = (step - warmup_i - stable) as f64 / decay.max(1) as f64;
            let factor = match self.decay_type.unwrap_or(WsdShape::Cosine) {
                WsdShape::Linear => 1.0 - progress,
                WsdShape::Cosine => 0.5 * (1.0 + (PI * 0.5 * 2.0 * progress).cos()),
                WsdShape::OneMinusSqrt => 1.0 - progress.sqrt(),
            };
            return (factor * (1.0 - min_lr_ratio) + min_lr_ratio).max(0.0);
        }
        min_lr_ratio
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
            ..ScheduleConfig::default()
        };
        assert_eq!(linear.lr(1.0, 0, 110), 0.0);
        assert!((linear.lr(1.0, 5, 110) - 0.5).abs() < 1e-12);
        assert!((linear.lr(1.0, 10, 110) - 1.0).abs() < 1e-12);
        assert!((linear.lr(1.0, 60, 110) - 0.5).abs() < 1e-12);
        assert_eq!(linear.lr(1.0, 110, 110), 0.0);
        let cosine = ScheduleConfig {
            decay: Decay::Cosine,
            warmup_ratio: Some(0.1),
            ..ScheduleConfig::default()
        };
        assert_eq!(cosine.warmup(100), 10);
        assert!((cosine.lr(2.0, 55, 100) - 1.0).abs() < 1e-12);
        let constant = ScheduleConfig {
            decay: Decay::Constant,
            ..ScheduleConfig::default()
        };
        assert_eq!(constant.lr(3e-4, 99, 100), 3e-4);
    }

    fn wsd(decay_steps: Option<usize>, decay_fraction: Option<f64>) -> ScheduleConfig {
        ScheduleConfig {
            decay: Decay::Wsd,
            warmup_steps: Some(4),
            decay_steps,
            decay_fraction,
            decay_type: Some(WsdShape::OneMinusSqrt),
            min_lr_ratio: Some(0.1),
            ..ScheduleConfig::default()
        }
    }

    #[test]
    fn wsd_stable_phase_does_not_depend_on_the_total() {
        // What makes WSD resumable with a new length: every step before the decay of the
        // shorter plan has the same lr under either plan (bitwise), longer or shorter.
        for schedule in [wsd(Some(6), None), wsd(None, Some(0.2))] {
            for (n, m) in [(20, 50), (50, 20), (20, 21)] {
                let decay_start = n.min(m) - schedule.decay_steps(n.min(m));
                for step in 0..decay_start {
                    assert_eq!(
                        schedule.lr(3e-4, step, n).to_bits(),
                        schedule.lr(3e-4, step, m).to_bits(),
                        "{schedule:?}: step {step} of {n} vs {m}"
                    );
                }
                assert_ne!(
                    schedule.lr(3e-4, decay_start + 1, n),
                    schedule.lr(3e-4, decay_start + 1, m)
                );
            }
        }
        let s = wsd(Some(6), None);
        assert!(
            (s.lr(1.0, 0, 20) - 0.1).abs() < 1e-15,
            "warmup starts at min_lr_ratio"
        );
        assert_eq!(s.lr(1.0, 13, 20), 1.0);
        assert!(
            s.lr(1.0, 14, 20) == 1.0 && s.lr(1.0, 15, 20) < 1.0,
            "decay starts at 14"
        );
        assert_eq!(s.lr(1.0, 20, 20), 0.1, "then min_lr_ratio");
    }

    #[test]
    fn wsd_keys_are_checked() {
        let err = |s: ScheduleConfig| s.validate().unwrap_err().to_string();
        assert!(err(wsd(None, None)).contains("schedule.decay_steps"));
        assert!(err(wsd(Some(3), Some(0.1))).contains("not both"));
        assert!(err(wsd(None, Some(1.5))).contains("schedule.decay_fraction"));
        let linear_with_wsd_key = ScheduleConfig {
            decay_type: Some(WsdShape::Linear),
            ..ScheduleConfig::default()
        };
        assert!(err(linear_with_wsd_key).contains("schedule.decay_type"));
        let parsed: ScheduleConfig = toml::from_str(
            "decay = \"warmup_stable_decay\"\ndecay_steps = 5\ndecay_type = \"1-sqrt\"",
        )
        .unwrap();
        assert_eq!(parsed.decay, Decay::Wsd);
        assert_eq!(parsed.decay_type, Some(WsdShape::OneMinusSqrt));
        assert!(
            toml::from_str::<ScheduleConfig>("decay = \"wsd\"\ndecay_type = \"sqrt\"").is_err()
        );
    }
}
