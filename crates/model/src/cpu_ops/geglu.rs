//! GeGLU, the gated GELU of ModernBERT's MLP.

use super::elementwise::gelu_f;
use super::*;

/// GeGLU, `gelu(x[..., :inter]) * x[..., inter:]` with `2 * inter` the last dimension:
/// ModernBERT's MLP (`input, gate = Wi(h).chunk(2, dim=-1); act(input) * gate`, act the exact
/// erf GELU). burn's path is a chunk, GELU and multiply, each a node (GELU's backward three
/// more); here one pass each way, sharing one erf per element. `None` off flex or off f32:
/// the caller then runs its composite (which knows how to get GELU's exact gradient there).
pub(crate) fn geglu<const D: usize>(x: Tensor<D>) -> Option<Tensor<D>> {
    let width = x.dims()[D - 1];
    if x.dtype() != DType::F32 || !width.is_multiple_of(2) {
        return None;
    }
    if let Ok(t) = x.clone().try_into_primitive::<FlexAd>() {
        drop(x);
        let input = t.primitive().clone();
        let output = geglu_forward(&input);
        let out = record(GegluBackward, [&t], output, || input);
        return Some(Tensor::from_primitive::<FlexAd>(out));
    }
    if let Ok(t) = x.clone().try_into_primitive::<Flex>() {
        drop(x);
        return Some(Tensor::from_primitive::<Flex>(geglu_forward(&t)));
    }
    None
}

/// `gelu(input) * gate` for each row `[input | gate]` of `x`, `[..., inter]`.
fn geglu_forward(x: &FlexTensor) -> FlexTensor {
    let x = contiguous(x);
    let shape = x.layout().shape();
    let width = shape[shape.num_dims() - 1];
    let inter = width / 2;
    let input = f32_slice(&x);
    let mut out = zeros(input.len() / 2);
    let rows = rows_per_task(width);
    out.par_chunks_mut(rows * inter)
        .zip(input.par_chunks(rows * width))
        .for_each(|(o, x)| {
            simd(|| {
                for (o, x) in o.chunks_mut(inter).zip(x.chunks(width)) {
                    let (a, gate) = x.split_at(inter);
                    for ((o, &a), &gate) in o.iter_mut().zip(a).zip(gate) {
                        *o = gelu_f(a) * gate;
                    }
                }
            })
        });
    let mut dims: Vec<usize> = (0..shape.num_dims()).map(|i| shape[i]).collect();
    dims[shape.num_dims() - 1] = inter;
    from_vec(out, &burn::tensor::Shape::from(dims))
}

#[derive(Debug)]
struct GegluBackward;

impl Backward<Flex, 1> for GegluBackward {
    /// The op's input, `[..., 2 * inter]`.
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            // d/d input = g * gate * gelu'(input); d/d gate = g * gelu(input).
            let grad = contiguous(&grad);
            let (input, g) = (f32_slice(&x), f32_slice(&grad));
            let width = x.layout().shape()[x.layout().shape().num_dims() - 1];
            let inter = width / 2;
            let mut dx = zeros(input.len());
            let rows = rows_per_task(width);
            dx.par_chunks_mut(rows * width)
                .zip(
                    input
                        .par_chunks(rows * width)
                        .zip(g.par_chunks(rows * inter)),
                )
                .for_each(|(dx, (x, g))| {
                    simd(|| {
                        for ((dx, x), g) in dx
                            .chunks_mut(width)
                            .zip(x.chunks(width))
                            .zip(g.chunks(inter))
                        {
                            let (da, dgate) = dx.split_at_mut(inter);
                            let (a, gate) = x.split_at(inter);
                            for i in 0..inter {
                                let (value, slope) = gelu_and_slope(a[i]);
                                da[i] = g[i] * gate[i] * slope;
                                dgate[i] = g[i] * value;
                            }
                        }
                    })
                });
            from_vec(dx, x.layout().shape())
        });
    }
}

/// `(gelu(x), gelu'(x))` from one erf.
#[inline(always)]
fn gelu_and_slope(x: f32) -> (f32, f32) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let (erf, e) = erf_with_exp(x * std::f32::consts::FRAC_1_SQRT_2);
    let phi = 0.5 * (1.0 + erf);
    (x * phi, phi + x * INV_SQRT_2PI * e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_ops::testing::*;
    use burn::tensor::Device;

    #[test]
    fn geglu_values_and_gradient_match_the_composite_chunk_gelu_mul() {
        // An odd number of rows and an odd `inter`, rank 3 as the MLP calls it.
        let (batch, seq, inter) = (3, 7, 13);
        let n = batch * seq * 2 * inter;
        let device = Device::flex().autodiff();
        let plain = Device::flex();
        let upstream = random(n / 2, 31, &plain).reshape([batch, seq, inter]);
        let run = |fused: bool| {
            let x = random(n, 32, &device).require_grad();
            let x3 = x.clone().reshape([batch, seq, 2 * inter]);
            let y = if fused {
                geglu(x3).expect("an f32 flex tensor")
            } else {
                // transformers' ModernBertMLP: `input, gate = ....chunk(2, dim=-1)`.
                let input = x3.clone().narrow(2, 0, inter);
                let gate = x3.narrow(2, inter, inter);
                burn::tensor::activation::gelu(input) * gate
            };
            let grads = (y.clone() * upstream.clone()).sum().backward();
            (
                values(y.reshape([n / 2])),
                values(x.grad(&grads).expect("a gradient")),
            )
        };
        let want = run(false);
        let got = run(true);
        assert_close("y", &got.0, &want.0, 1e-6);
        assert_close("dx", &got.1, &want.1, 1e-6);
        let x = random(n, 32, &plain).reshape([batch, seq, 2 * inter]);
        assert_eq!(
            values(geglu(x).expect("an f32 flex tensor").reshape([n / 2])),
            got.0,
            "plain flex = autodiff flex"
        );
    }
}
