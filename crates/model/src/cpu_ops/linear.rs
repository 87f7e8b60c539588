//! Linear layers on gemm.

use super::*;

/// `x W + b` for `x` `[..., in]`, `W` `[in, out]` (any strides: the LM head passes the
/// transposed word embeddings), `b` `[out]`, as burn's `module::linear`.
///
/// On flex, burn's linear allocates each output zeroed through a byte vector that burn-std then
/// re-allocates and copies for alignment (two extra passes over every matmul output, ~20% of
/// the calling thread's time in a training step), adds the bias in a third, and its backward
/// sums the bias gradient in a fourth. Here the output starts as the bias rows and gemm
/// accumulates into it; the backward is two gemm calls and one column sum.
pub(crate) fn linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    // Without a bias (ModernBERT's layers), the fused path starts from zero rows: an
    // untracked constant, so its backward computes no bias gradient.
    let given = bias.is_some();
    let bias = bias.or_else(|| {
        (x.dtype() == DType::F32 && weight.dtype() == DType::F32)
            .then(|| Tensor::<1>::zeros([weight.dims()[1]], &weight.device()))
    });
    let f32s = x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && bias.as_ref().is_some_and(|b| b.dtype() == DType::F32);
    let fits = bias
        .as_ref()
        .is_some_and(|b| shapes_fit(&x.dims(), weight.dims(), b.dims()));
    if f32s
        && fits
        && let Some(b) = bias.clone()
    {
        if let Ok(xt) = x.clone().try_into_primitive::<FlexAd>()
            && let Ok(wt) = weight.clone().try_into_primitive::<FlexAd>()
            && let Ok(bt) = b.clone().try_into_primitive::<FlexAd>()
        {
            return Tensor::from_primitive::<FlexAd>(linear_autodiff(xt, wt, bt, given));
        }
        if let Ok(xt) = x.clone().try_into_primitive::<Flex>()
            && let Ok(wt) = weight.clone().try_into_primitive::<Flex>()
            && let Ok(bt) = b.try_into_primitive::<Flex>()
        {
            return Tensor::from_primitive::<Flex>(linear_forward(
                &contiguous(&xt),
                &wt,
                given.then_some(&bt),
            ));
        }
    }
    burn::tensor::module::linear(x, weight, bias.filter(|_| given))
}

/// Whether `x [..., k]`, `W [k, n]` and `b [n]` are shapes the fused path handles. It writes
/// `n` bias values into each of `m` rows it allocates uninitialised and lets gemm read `m x k`
/// and `k x n` elements, so any other shape (a broadcast bias `[1]`, a mismatched weight, an
/// empty dimension) goes to burn's op, which broadcasts or reports the mismatch itself.
fn shapes_fit(x: &[usize], [k, n]: [usize; 2], [bias]: [usize; 1]) -> bool {
    x.last() == Some(&k) && bias == n && k > 0 && n > 0
}

#[derive(Debug, Clone)]
struct LinearState {
    /// The input, contiguous.
    x: FlexTensor,
    weight: FlexTensor,
}

#[derive(Debug)]
struct LinearBackward;

impl Backward<Flex, 3> for LinearBackward {
    type State = LinearState;

    fn backward(self, ops: Ops<LinearState, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w, node_b] = ops.parents;
        let grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let LinearState { x, weight } = ops.state;
        let (k, n) = (weight.layout().shape()[0], weight.layout().shape()[1]);
        let m = x.layout().num_elements() / k;
        let g = f32_slice(&grad);
        let (w_ptr, w_rs, w_cs) = matrix(&weight);
        if let Some(node) = node_x {
            // dx [m, k] = g [m, n] W^T; W^T[a][b] = W[b][a].
            // SAFETY: every pointer/stride pair addresses the matrix it describes, in bounds.
            let dx =
                unsafe { gemm_new((m, k, n), (g.as_ptr(), n as isize, 1), (w_ptr, w_cs, w_rs)) };
            grads.register::<Flex>(node.id, from_vec(dx, x.layout().shape()));
        }
        if let Some(node) = node_w {
            // dW [k, n] = x^T [k, m] g [m, n]; x^T[a][b] = x[b][a].
            let xs = f32_slice(&x);
            // SAFETY: as above.
            let dw = unsafe {
                gemm_new(
                    (k, n, m),
                    (xs.as_ptr(), 1, k as isize),
                    (g.as_ptr(), n as isize, 1),
                )
            };
            grads.register::<Flex>(node.id, from_vec(dw, weight.layout().shape()));
        }
        if let Some(node) = node_b {
            grads.register::<Flex>(
                node.id,
                from_vec(column_sums(g, n), &burn::tensor::Shape::from(vec![n])),
            );
        }
    }
}

fn linear_autodiff(
    x: FloatTensor<FlexAd>,
    weight: FloatTensor<FlexAd>,
    bias: FloatTensor<FlexAd>,
    given: bool,
) -> FloatTensor<FlexAd> {
    let input = contiguous(x.primitive());
    let output = linear_forward(&input, weight.primitive(), given.then(|| bias.primitive()));
    record(LinearBackward, [&x, &weight, &bias], output, || {
        LinearState {
            x: input,
            weight: weight.primitive().clone(),
        }
    })
}

/// `x [..., k] W [k, n] + b [n]` with `x` contiguous; without a bias, gemm writes the output
/// alone (no rows to fill first and read back).
fn linear_forward(x: &FlexTensor, weight: &FlexTensor, bias: Option<&FlexTensor>) -> FlexTensor {
    let (k, n) = (weight.layout().shape()[0], weight.layout().shape()[1]);
    let m = x.layout().num_elements() / k.max(1);
    // `linear` routes every other shape to burn; the unsafe writes below rely on these.
    assert!(
        m * k == x.layout().num_elements(),
        "fused linear called with mismatched shapes"
    );
    let w = matrix(weight);
    let lhs = (f32_slice(x).as_ptr(), k as isize, 1);
    let out = match bias {
        // SAFETY: every pointer/stride pair addresses the matrix it describes, in bounds.
        None => unsafe { gemm_new((m, n, k), lhs, w) },
        Some(bias) => {
            let bias = contiguous(bias);
            let b = f32_slice(&bias);
            assert!(b.len() == n, "fused linear called with mismatched shapes");
            // The bias in every row: gemm then adds x W to it.
            let mut out: Vec<f32> = Vec::with_capacity(m * n);
            out.spare_capacity_mut()[..m * n]
                .par_chunks_mut(rows_per_task(n) * n)
                .for_each(|rows| {
                    for row in rows.chunks_mut(n) {
                        for (o, &b) in row.iter_mut().zip(b) {
                            o.write(b);
                        }
                    }
                });
            // SAFETY: every row was written above.
            unsafe { out.set_len(m * n) };
            // SAFETY: every pointer/stride pair addresses the matrix it describes, in bounds.
            unsafe {
                gemm_into(
                    (m, n, k),
                    (out.as_mut_ptr(), n as isize, 1),
                    lhs,
                    w,
                    1.0,
                    true,
                    true,
                )
            };
            out
        }
    };
    let mut shape = x.layout().shape().clone();
    let last = shape.num_dims() - 1;
    shape[last] = n;
    from_vec(out, &shape)
}

/// A 2-D tensor's first element and (row, column) strides, for gemm.
fn matrix(t: &FlexTensor) -> (*const f32, isize, isize) {
    let strides = t.layout().strides();
    // SAFETY: start_offset is within the storage of the view.
    let ptr = unsafe { t.storage::<f32>().as_ptr().add(t.layout().start_offset()) };
    (ptr, strides[0], strides[1])
}

/// A new row-major `[m, n]` = `lhs [m, k] rhs [k, n]`, written by gemm alone (no zeroing pass).
///
/// # Safety
/// As [`gemm_into`].
unsafe fn gemm_new(
    (m, n, k): (usize, usize, usize),
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
) -> Vec<f32> {
    if k == 0 {
        return vec![0.0; m * n];
    }
    let mut dst: Vec<f32> = Vec::with_capacity(m * n);
    unsafe {
        gemm_into(
            (m, n, k),
            (dst.as_mut_ptr(), n as isize, 1),
            lhs,
            rhs,
            1.0,
            false,
            true,
        );
        // SAFETY: without accumulate and with k > 0 gemm writes every element of dst.
        dst.set_len(m * n);
    }
    dst
}

/// Sums of the `n` columns of a row-major `[rows, n]` matrix.
fn column_sums(g: &[f32], n: usize) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = g
        .par_chunks(rows_per_task(n) * n)
        .map(|rows| {
            let mut sum = vec![0.0f32; n];
            simd(|| {
                for row in rows.chunks(n) {
                    for (s, &v) in sum.iter_mut().zip(row) {
                        *s += v;
                    }
                }
            });
            sum
        })
        .collect();
    let mut sum = vec![0.0f32; n];
    for p in &partials {
        for (s, v) in sum.iter_mut().zip(p) {
            *s += v;
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_ops::testing::*;
    use burn::tensor::Device;

    #[test]
    fn linear_values_and_gradients_match_burns_for_plain_and_transposed_weights() {
        let device = Device::flex().autodiff();
        let (batch, seq, k, n) = (3, 5, 24, 40);
        let upstream = random(batch * seq * n, 9, &Device::flex()).reshape([batch, seq, n]);
        for transposed in [false, true] {
            let run = |fused: bool| {
                let x = random(batch * seq * k, 10, &device).require_grad();
                let w = random(k * n, 11, &device).require_grad();
                let b = random(n, 12, &device).require_grad();
                // The LM head's decoder is the word-embedding matrix [n, k], transposed.
                let weight = if transposed {
                    w.clone().reshape([n, k]).transpose()
                } else {
                    w.clone().reshape([k, n])
                };
                let x3 = x.clone().reshape([batch, seq, k]);
                let y = if fused {
                    linear(x3, weight, Some(b.clone()))
                } else {
                    burn::tensor::module::linear(x3, weight, Some(b.clone()))
                };
                let grads = (y.clone() * upstream.clone()).sum().backward();
                let grad = |t: &Tensor<1>| values(t.grad(&grads).expect("a gradient"));
                (
                    values(y.reshape([batch * seq * n])),
                    grad(&x),
                    grad(&w),
                    grad(&b),
                )
            };
            let want = run(false);
            let got = run(true);
            let what = if transposed { "transposed" } else { "plain" };
            assert_close(&format!("{what} y"), &got.0, &want.0, 1e-6);
            assert_close(&format!("{what} dx"), &got.1, &want.1, 1e-6);
            assert_close(&format!("{what} dW"), &got.2, &want.2, 1e-6);
            assert_close(&format!("{what} db"), &got.3, &want.3, 1e-6);
        }
        // Inference tensors (no autodiff) take the fused forward too.
        let plain = Device::flex();
        let x = random(batch * seq * k, 10, &plain).reshape([batch, seq, k]);
        let w = random(k * n, 11, &plain).reshape([k, n]);
        let b = random(n, 12, &plain);
        let got = values(linear(x.clone(), w.clone(), Some(b.clone())).reshape([batch * seq * n]));
        let want = values(burn::tensor::module::linear(x, w, Some(b)).reshape([batch * seq * n]));
        assert_close("inference y", &got, &want, 1e-6);
    }

    /// `f`'s values, or the message it panicked with (burn reports shape errors so).
    fn outcome(f: impl FnOnce() -> Tensor<3>) -> Result<Vec<f32>, String> {
        let y = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
            let text = panic.downcast_ref::<String>().cloned();
            text.or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })?;
        let n: usize = y.dims().iter().product();
        Ok(values(y.reshape([n])))
    }

    #[test]
    fn mismatched_bias_or_weight_shapes_get_burns_answer_not_garbage() {
        let (batch, seq, k, n) = (2, 3, 8, 16);
        // (case, x's last dim, weight [k, n], bias length)
        let cases = [
            ("broadcast bias [1]", k, [k, n], 1),
            ("bias one short", k, [k, n], n - 1),
            ("bias three long", k, [k, n], n + 3),
            ("weight rows differ from x", k, [k + 4, n], n),
            ("weight rows fewer than x", k, [k - 3, n], n),
            ("empty input dimension", 0, [0, n], n),
        ];
        for device in [Device::flex(), Device::flex().autodiff()] {
            for (case, x_k, [w_k, w_n], b_n) in cases {
                // burn cannot reshape an empty tensor, so the input is built in its shape.
                let x = Tensor::<3>::from_data(
                    TensorData::new(
                        values(random(batch * seq * x_k, 1, &device)),
                        [batch, seq, x_k],
                    ),
                    &device,
                );
                let w = random(w_k * w_n, 2, &device).reshape([w_k, w_n]);
                let b = random(b_n, 3, &device);
                let got = outcome(|| linear(x.clone(), w.clone(), Some(b.clone())));
                let want = outcome(|| burn::tensor::module::linear(x, w, Some(b)));
                match (&got, &want) {
                    (Ok(got), Ok(want)) => assert_close(case, got, want, 1e-6),
                    (Err(got), Err(want)) => assert_eq!(got, want, "{case}: not burn's error"),
                    _ => panic!("{case}: fused {got:?}, burn {want:?}"),
                }
            }
        }
    }
}
