//! Mixed-precision training: f32 master weights and optimizer state, matmuls in bf16 or f16.
//!
//! burn 0.22 has no automatic mixed precision and no loss scaler (only whole-device dtypes),
//! so this is done by hand, as torch.autocast + GradScaler do it:
//! - each step makes a half-precision *view* of the model ([`autocast`]): the Linear weights
//!   and biases pass through a differentiable cast, everything else (embeddings, LayerNorm) is
//!   shared as is. The model code runs each Linear in its weight's dtype and keeps LayerNorm,
//!   softmax and the loss in f32 (masklm-model), so the matmuls are half precision;
//! - backward goes through the casts, so the gradients land on the f32 master parameters in
//!   f32, and AdamW updates those;
//! - f16 (5 exponent bits) needs loss scaling: [`LossScaler`] multiplies the loss by a scale
//!   (2^16 at first), divides the gradients by it, skips a step whose gradients overflowed and
//!   halves the scale, and doubles it after 2000 clean steps (GradScaler's defaults).
//!   bf16 has f32's exponent range and needs none.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, FloatDType, Tensor};
use masklm_model::MaskedLm;
use serde::{Deserialize, Serialize};

/// `training.precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32 (the default, and the reference's setting).
    #[default]
    F32,
    /// Matmuls in bfloat16: f32's range, no loss scaling needed.
    Bf16,
    /// Matmuls in float16 with dynamic loss scaling.
    F16,
}

impl Precision {
    /// The compute dtype of the matmuls, `None` for f32.
    pub fn half(self) -> Option<FloatDType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(FloatDType::BF16),
            Precision::F16 => Some(FloatDType::F16),
        }
    }

    /// Whether `device` can run this precision: a small matmul, its backward and a cast back.
    /// Backends report unsupported dtypes by panicking, so the panic is caught and returned.
    pub fn check(self, device: &Device) -> Result<(), String> {
        let Some(dtype) = self.half() else {
            return Ok(());
        };
        let device = device.clone().autodiff();
        let result = crate::catch_backend_panic(|| {
            let w = Tensor::<2>::ones([4, 4], &device).require_grad();
            let x = Tensor::<2>::ones([2, 4], &device).cast(dtype);
            let y = x.matmul(w.clone().cast(dtype)).cast(FloatDType::F32).sum();
            let grads = y.backward();
            w.grad(&grads).map(|g| g.sum().into_scalar::<f32>())
        })?;
        match result {
            Some(32.0) => Ok(()),
            other => Err(format!(
                "a test matmul gave a gradient sum of {other:?}, not 32"
            )),
        }
    }

    /// The name `training.precision` takes.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

/// The model as one mixed-precision step computes with it: Linear parameters cast to `dtype`
/// through a differentiable cast (their gradients reach the f32 originals), the rest shared.
pub fn autocast(model: &MaskedLm, dtype: FloatDType) -> MaskedLm {
    struct Autocast {
        dtype: FloatDType,
        in_linear: usize,
    }
    impl ModuleMapper for Autocast {
        fn enter_module(&mut self, _name: &str, container_type: &str) {
            if container_type == "Struct:Linear" {
                self.in_linear += 1;
            }
        }
        fn exit_module(&mut self, _name: &str, container_type: &str) {
            if container_type == "Struct:Linear" {
                self.in_linear -= 1;
            }
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if self.in_linear > 0 {
                let dtype = self.dtype;
                param.map(|t| t.cast(dtype))
            } else {
                param
            }
        }
    }
    model.clone().map(&mut Autocast {
        dtype,
        in_linear: 0,
    })
}

/// Dynamic loss scaling for f16, with torch.cuda.amp.GradScaler's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The factor the loss is multiplied by before backward.
    pub scale: f64,
    /// Consecutive steps without overflow since the last change of scale.
    pub good_steps: usize,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            good_steps: 0,
        }
    }
}

impl LossScaler {
    const GROWTH_INTERVAL: usize = 2000;

    /// Records one step's outcome: an overflow halves the scale, 2000 clean steps double it.
    pub fn update(&mut self, overflowed: bool) {
        if overflowed {
            self.scale = (self.scale * 0.5).max(1.0);
            self.good_steps = 0;
        } else {
            self.good_steps += 1;
            if self.good_steps == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaler_backs_off_on_overflow_and_grows_after_clean_steps() {
        let mut s = LossScaler::default();
        s.update(true);
        assert_eq!(s.scale, 32768.0);
        for _ in 0..1999 {
            s.update(false);
        }
        assert_eq!(s.scale, 32768.0);
        s.update(false);
        assert_eq!((s.scale, s.good_steps), (65536.0, 0));
        let mut tiny = LossScaler {
            scale: 1.0,
            good_steps: 5,
        };
        tiny.update(true);
        assert_eq!((tiny.scale, tiny.good_steps), (1.0, 0));
    }

    #[test]
    fn autocast_casts_only_linear_parameters_and_keeps_their_ids() {
        let config = masklm_model::RobertaConfig {
            vocab_size: 20,
            hidden_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            intermediate_size: 16,
            max_position_embeddings: 12,
            ..Default::default()
        };
        let model = MaskedLm::new(&config.into(), &Device::flex()).unwrap();
        let half = autocast(&model, FloatDType::F16);
        let roberta = |m: &MaskedLm| match m {
            MaskedLm::Roberta(m) => m.clone(),
            _ => panic!("a RoBERTa config builds a RoBERTa model"),
        };
        let (model, half) = (roberta(&model), roberta(&half));
        let layer = &half.roberta.encoder.layer[0];
        assert_eq!(
            layer.attention.self_attn.query.weight.val().dtype(),
            burn::tensor::DType::F16
        );
        assert_eq!(
            layer.attention.self_attn.query.weight.id,
            model.roberta.encoder.layer[0]
                .attention
                .self_attn
                .query
                .weight
                .id
        );
        assert_eq!(
            half.roberta.embeddings.word_embeddings.weight.val().dtype(),
            burn::tensor::DType::F32
        );
        assert_eq!(
            layer.output.LayerNorm.gamma.val().dtype(),
            burn::tensor::DType::F32
        );
    }
}
