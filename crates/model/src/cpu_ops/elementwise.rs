//! GELU, softmax and the dropout multiply.

use super::*;

/// Exact (erf) GELU, `0.5 x (1 + erf(x / sqrt 2))`, as `torch.nn.functional.gelu`.
pub(crate) fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if x.dtype() != DType::F32 {
        return burn::tensor::activation::gelu(x);
    }
    if let Ok(t) = x.clone().try_into_primitive::<FlexAd>() {
        drop(x);
        return Tensor::from_primitive::<FlexAd>(gelu_autodiff(t));
    }
    if let Ok(t) = x.clone().try_into_primitive::<Flex>() {
        drop(x);
        return Tensor::from_primitive::<Flex>(map_unary(&t, gelu_f));
    }
    burn::tensor::activation::gelu(x)
}

#[derive(Debug)]
struct GeluBackward;

impl Backward<Flex, 1> for GeluBackward {
    /// The op's input.
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            map_binary(&x, grad, gelu_grad_f)
        });
    }
}

fn gelu_autodiff(t: FloatTensor<FlexAd>) -> FloatTensor<FlexAd> {
    let input = t.primitive().clone();
    let output = map_unary(&input, gelu_f);
    record(GeluBackward, [&t], output, || input)
}

/// `x * factor` elementwise for a factor that needs no gradient (a dropout mask), with
/// `factor` in `x`'s shape, row-major.
pub(crate) fn mul_constant<const D: usize>(x: Tensor<D>, factor: Vec<f32>) -> Tensor<D> {
    if x.dtype() == DType::F32
        && let Ok(t) = x.clone().try_into_primitive::<FlexAd>()
    {
        drop(x);
        let factor = FlexTensor::from_data(TensorData::new(
            factor,
            t.primitive().layout().shape().clone(),
        ));
        let output = map_binary(&factor, t.primitive().clone(), |f, x| x * f);
        let out = record(MulConstantBackward, [&t], output, || factor);
        return Tensor::from_primitive::<FlexAd>(out);
    }
    let shape = x.shape();
    let plain = x.device().without_autodiff();
    let factor = Tensor::<D>::from_data(TensorData::new(factor, shape), &plain);
    let dtype = burn::tensor::FloatDType::from(x.dtype());
    // A plain tensor times an autodiff one is a constant factor in the graph; in the input's
    // dtype under mixed precision (a no-op cast otherwise).
    x * factor.cast(dtype)
}

#[derive(Debug)]
struct MulConstantBackward;

impl Backward<Flex, 1> for MulConstantBackward {
    /// The factor.
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let factor = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            map_binary(&factor, grad, |f, g| g * f)
        });
    }
}

/// Softmax over the last dimension, as `torch.softmax(x, -1)`.
///
/// burn 0.22's autodiff differentiates softmax as exp / sum / div nodes (each a
/// single-threaded pass and a stored intermediate); here it is one node whose backward is
/// `p * (g - sum(g * p))` per row.
pub(crate) fn softmax_last<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if x.dtype() == DType::F32
        && let Ok(t) = x.clone().try_into_primitive::<FlexAd>()
    {
        drop(x);
        let width = t.primitive().layout().shape()[D - 1];
        let output = map_rows(t.primitive(), width, |x, y| {
            y.copy_from_slice(x);
            softmax_in_place(y);
        });
        let out = record(SoftmaxBackward, [&t], output.clone(), || output);
        return Tensor::from_primitive::<FlexAd>(out);
    }
    burn::tensor::activation::softmax(x, D - 1)
}

#[derive(Debug)]
struct SoftmaxBackward;

impl Backward<Flex, 1> for SoftmaxBackward {
    /// The op's output, p.
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let p = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            let width = p.layout().shape()[p.layout().shape().num_dims() - 1];
            let grad = contiguous(&grad);
            let (probs, g) = (f32_slice(&p), f32_slice(&grad));
            let mut dx = zeros(probs.len());
            let per_task = rows_per_task(width) * width;
            dx.par_chunks_mut(per_task)
                .zip(probs.par_chunks(per_task).zip(g.par_chunks(per_task)))
                .for_each(|(dx, (p, g))| {
                    simd(|| {
                        for ((dx, p), g) in dx
                            .chunks_mut(width)
                            .zip(p.chunks(width))
                            .zip(g.chunks(width))
                        {
                            dx.copy_from_slice(g);
                            softmax_grad_in_place(p, dx);
                        }
                    })
                });
            from_vec(dx, p.layout().shape())
        });
    }
}

/// `f(row, out_row)` for each row of `width`, rows split across rayon's workers.
fn map_rows(
    x: &FlexTensor,
    width: usize,
    f: impl Fn(&[f32], &mut [f32]) + Copy + Send + Sync,
) -> FlexTensor {
    let x = contiguous(x);
    let input = f32_slice(&x);
    let mut out = zeros(input.len());
    let per_task = rows_per_task(width) * width;
    out.par_chunks_mut(per_task)
        .zip(input.par_chunks(per_task))
        .for_each(|(o, i)| {
            simd(|| {
                for (o, i) in o.chunks_mut(width).zip(i.chunks(width)) {
                    f(i, o);
                }
            })
        });
    from_vec(out, x.layout().shape())
}

#[inline(always)]
pub(super) fn gelu_f(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_with_exp(x * std::f32::consts::FRAC_1_SQRT_2).0)
}

/// `g * d/dx gelu(x)`: d/dx [x Phi(x)] = Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi),
/// whose exponential is the one erf already computed.
#[inline(always)]
fn gelu_grad_f(x: f32, g: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let (erf, e) = erf_with_exp(x * std::f32::consts::FRAC_1_SQRT_2);
    g * (0.5 * (1.0 + erf) + x * INV_SQRT_2PI * e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_ops::testing::*;
    use burn::tensor::Device;

    #[test]
    fn gelu_and_its_gradient_match_burns_libm_gelu_on_flex() {
        let device = Device::flex().autodiff();
        let values = grid();
        let n = values.len();
        // Upstream gradient of varying sign and size, as a real backward has.
        let upstream: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0)
            .collect();
        let w = Tensor::<1>::from_floats(upstream.as_slice(), &device.clone().without_autodiff());
        let run = |fused: bool| {
            let x = Tensor::<1>::from_floats(values.as_slice(), &device).require_grad();
            let y = if fused {
                gelu(x.clone())
            } else {
                burn::tensor::activation::gelu(x.clone())
            };
            let out: Vec<f32> = y.clone().into_data().try_to_vec::<f32>().expect("f32");
            let grads = (y * w.clone()).sum().backward();
            let g: Vec<f32> = x
                .grad(&grads)
                .expect("x has a gradient")
                .into_data()
                .try_to_vec::<f32>()
                .expect("f32");
            (out, g)
        };
        let (want, want_grad) = run(false);
        let (got, got_grad) = run(true);
        for i in 0..n {
            let scale = 1.0 + values[i].abs();
            assert!(
                (got[i] - want[i]).abs() <= 2e-7 * scale,
                "gelu({}) = {} vs {}",
                values[i],
                got[i],
                want[i]
            );
            let gscale = 1.0 + upstream[i].abs() * scale;
            assert!(
                (got_grad[i] - want_grad[i]).abs() <= 3e-7 * gscale,
                "gelu'({}) * {}: {} vs {}",
                values[i],
                upstream[i],
                got_grad[i],
                want_grad[i]
            );
        }
        // Plain (non-autodiff) flex tensors take the kernel too.
        let plain = Tensor::<1>::from_floats(values.as_slice(), &Device::flex());
        let out: Vec<f32> = gelu(plain).into_data().try_to_vec::<f32>().expect("f32");
        assert_eq!(out, got);
    }

    #[test]
    fn softmax_values_and_gradient_match_burns_composite() {
        let device = Device::flex().autodiff();
        let n = 4 * 5 * 37;
        let upstream = random(n, 5, &Device::flex()).reshape([4, 5, 37]);
        let run = |fused: bool| {
            let x = random(n, 6, &device).require_grad();
            // Rows with masked (-1e9) entries, as the attention bias makes.
            let bias = random(n, 7, &device).greater_elem(2.5).float() * -1e9;
            let x3 = (x.clone() + bias).reshape([4, 5, 37]);
            let y = if fused {
                softmax_last(x3)
            } else {
                burn::tensor::activation::softmax(x3, 2)
            };
            let grads = (y.clone() * upstream.clone()).sum().backward();
            (
                values(y.reshape([n])),
                values(x.grad(&grads).expect("a gradient")),
            )
        };
        let want = run(false);
        let got = run(true);
        assert_close("p", &got.0, &want.0, 1e-6);
        assert_close("dx", &got.1, &want.1, 1e-6);
    }
}
