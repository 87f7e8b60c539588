//! LayerNorm.

use super::*;

/// LayerNorm over the last dimension, `(x - mean) / sqrt(var + eps) * gamma + beta` with the
/// biased variance, as `torch.nn.LayerNorm`.
///
/// burn 0.22's autodiff has no LayerNorm node: it differentiates the composite (mean, sub, mul,
/// mean, add, sqrt, div, mul, add), ~20 single-threaded passes over the activations per call
/// in training. Here it is one pass forward and one backward.
pub(crate) fn layer_norm<const D: usize>(
    norm: &LayerNorm,
    epsilon: f64,
    x: Tensor<D>,
) -> Tensor<D> {
    let gamma = norm.gamma.val();
    // Without a bias (ModernBERT's norms) the fused path adds zeros: an untracked constant,
    // so its backward computes no bias gradient.
    let beta = norm.beta.as_ref().map(|b| b.val()).or_else(|| {
        (gamma.dtype() == DType::F32).then(|| Tensor::<1>::zeros(gamma.dims(), &gamma.device()))
    });
    let all_f32 = x.dtype() == DType::F32
        && gamma.dtype() == DType::F32
        && beta.as_ref().is_none_or(|b| b.dtype() == DType::F32);
    if all_f32
        && let Some(beta) = beta
        && let Ok(t) = x.clone().try_into_primitive::<FlexAd>()
        && let Ok(g) = gamma.clone().try_into_primitive::<FlexAd>()
        && let Ok(b) = beta.clone().try_into_primitive::<FlexAd>()
    {
        drop((x, gamma, beta));
        return Tensor::from_primitive::<FlexAd>(layer_norm_autodiff(t, g, b, epsilon));
    }
    norm.forward(x)
}

#[derive(Debug, Clone)]
struct LayerNormState {
    x: FlexTensor,
    gamma: FlexTensor,
    /// Per row: mean and 1 / sqrt(var + eps).
    stats: std::sync::Arc<Vec<(f32, f32)>>,
}

#[derive(Debug)]
struct LayerNormBackward;

impl Backward<Flex, 3> for LayerNormBackward {
    type State = LayerNormState;

    fn backward(self, ops: Ops<LayerNormState, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let LayerNormState { x, gamma, stats } = ops.state;
        let (dx, dgamma, dbeta) = layer_norm_grad(&x, &gamma, &stats, &grad);
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, dx);
        }
        if let Some(node) = node_gamma {
            grads.register::<Flex>(node.id, dgamma);
        }
        if let Some(node) = node_beta {
            grads.register::<Flex>(node.id, dbeta);
        }
    }
}

fn layer_norm_autodiff(
    x: FloatTensor<FlexAd>,
    gamma: FloatTensor<FlexAd>,
    beta: FloatTensor<FlexAd>,
    epsilon: f64,
) -> FloatTensor<FlexAd> {
    let input = contiguous(x.primitive());
    let (output, stats) = layer_norm_forward(&input, gamma.primitive(), beta.primitive(), epsilon);
    record(LayerNormBackward, [&x, &gamma, &beta], output, || {
        LayerNormState {
            x: input,
            gamma: contiguous(gamma.primitive()),
            stats: std::sync::Arc::new(stats),
        }
    })
}

fn layer_norm_forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    epsilon: f64,
) -> (FlexTensor, Vec<(f32, f32)>) {
    let (gamma, beta) = (contiguous(gamma), contiguous(beta));
    let (gamma, beta) = (f32_slice(&gamma), f32_slice(&beta));
    let width = gamma.len();
    let input = f32_slice(x);
    let rows = input.len() / width.max(1);
    let mut out = zeros(input.len());
    let mut stats = vec![(0.0f32, 0.0f32); rows];
    let per_task = rows_per_task(width);
    out.par_chunks_mut(per_task * width)
        .zip(input.par_chunks(per_task * width))
        .zip(stats.par_chunks_mut(per_task))
        .for_each(|((out, input), stats)| {
            simd(|| {
                for ((y, x), stat) in out.chunks_mut(width).zip(input.chunks(width)).zip(stats) {
                    // Two passes (mean, then squared deviations), as torch's CPU kernel.
                    let mean = x.iter().sum::<f32>() / width as f32;
                    let var =
                        x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
                    let rstd = 1.0 / (var + epsilon as f32).sqrt();
                    for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
                        *y = (x - mean) * rstd * g + b;
                    }
                    *stat = (mean, rstd);
                }
            })
        });
    (from_vec(out, x.layout().shape()), stats)
}

/// `(dx, dgamma, dbeta)`: with xhat = (x - mean) * rstd and dxhat = g * gamma,
/// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dgamma = sum over rows of
/// g * xhat, dbeta = sum over rows of g.
fn layer_norm_grad(
    x: &FlexTensor,
    gamma: &FlexTensor,
    stats: &[(f32, f32)],
    grad: &FlexTensor,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let grad = contiguous(grad);
    let (input, gamma_s, g) = (f32_slice(x), f32_slice(gamma), f32_slice(&grad));
    let width = gamma_s.len();
    let mut dx = zeros(input.len());
    let per_task = rows_per_task(width);
    // Each task returns its rows' partial sums for dgamma and dbeta.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(per_task * width)
        .zip(input.par_chunks(per_task * width))
        .zip(g.par_chunks(per_task * width))
        .zip(stats.par_chunks(per_task))
        .map(|(((dx, x), g), stats)| {
            let mut dgamma = vec![0.0f32; width];
            let mut dbeta = vec![0.0f32; width];
            simd(|| {
                for (((dx, x), g), &(mean, rstd)) in dx
                    .chunks_mut(width)
                    .zip(x.chunks(width))
                    .zip(g.chunks(width))
                    .zip(stats)
                {
                    let mut sum_dxhat = 0.0f32;
                    let mut sum_dxhat_xhat = 0.0f32;
                    for (((&x, &g), &gm), (dg, db)) in x
                        .iter()
                        .zip(g)
                        .zip(gamma_s)
                        .zip(dgamma.iter_mut().zip(dbeta.iter_mut()))
                    {
                        let xhat = (x - mean) * rstd;
                        let dxhat = g * gm;
                        sum_dxhat += dxhat;
                        sum_dxhat_xhat += dxhat * xhat;
                        *dg += g * xhat;
                        *db += g;
                    }
                    let a = sum_dxhat / width as f32;
                    let b = sum_dxhat_xhat / width as f32;
                    for (((dx, &x), &g), &gm) in dx.iter_mut().zip(x).zip(g).zip(gamma_s) {
                        let xhat = (x - mean) * rstd;
                        *dx = rstd * (g * gm - a - xhat * b);
                    }
                }
            });
            (dgamma, dbeta)
        })
        .collect();
    let mut dgamma = vec![0.0f32; width];
    let mut dbeta = vec![0.0f32; width];
    for (pg, pb) in &partials {
        for (d, p) in dgamma.iter_mut().zip(pg) {
            *d += p;
        }
        for (d, p) in dbeta.iter_mut().zip(pb) {
            *d += p;
        }
    }
    let param_shape = gamma.layout().shape();
    (
        from_vec(dx, x.layout().shape()),
        from_vec(dgamma, param_shape),
        from_vec(dbeta, param_shape),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_ops::testing::*;
    use burn::tensor::Device;

    #[test]
    fn layer_norm_values_and_all_three_gradients_match_burns_composite() {
        let device = Device::flex().autodiff();
        let plain = Device::flex();
        let width = 48;
        let mut norm = burn::nn::LayerNormConfig::new(width)
            .with_epsilon(1e-5)
            .init(&device);
        // Non-trivial gamma and beta so their gradients and uses are all exercised.
        norm.gamma = burn::module::Param::from_tensor(
            Tensor::from_data((random(width, 1, &plain) + 1.0).into_data(), &device).require_grad(),
        );
        norm.beta = Some(burn::module::Param::from_tensor(
            random(width, 2, &device).require_grad(),
        ));
        let n = 3 * 7 * width;
        let upstream = random(n, 3, &plain).reshape([3, 7, width]);
        let run = |fused: bool| {
            let x = random(n, 4, &device).require_grad();
            let x3 = x.clone().reshape([3, 7, width]);
            let y = if fused {
                layer_norm(&norm, 1e-5, x3)
            } else {
                norm.forward(x3)
            };
            let grads = (y.clone() * upstream.clone()).sum().backward();
            let grad = |t: Tensor<1>| values(t.grad(&grads).expect("a gradient"));
            (
                values(y.reshape([n])),
                grad(x),
                grad(norm.gamma.val()),
                grad(norm.beta.as_ref().expect("beta").val()),
            )
        };
        let want = run(false);
        let got = run(true);
        assert_close("y", &got.0, &want.0, 1e-6);
        assert_close("dx", &got.1, &want.1, 1e-5);
        assert_close("dgamma", &got.2, &want.2, 1e-5);
        assert_close("dbeta", &got.3, &want.3, 1e-5);
    }
}
