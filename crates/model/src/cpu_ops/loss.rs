//! The masked-token cross-entropy.

use super::*;

/// Mean cross-entropy of `logits` (`[rows, vocab]`) against `labels`, `[1]`: the mean over rows
/// of `logsumexp(row) - row[label]`, as `torch.nn.functional.cross_entropy`. `None` when the
/// logits are not an f32 flex autodiff tensor, there are no rows, or a label is out of range
/// (the caller then runs burn's log_softmax + gather, which reports it).
///
/// One node instead of burn's log_softmax chain (max, sub, exp, sum, log, sub, gather, mean,
/// each a pass over `[rows, vocab]` and a stored intermediate); its backward writes
/// `(softmax(row) - onehot(label)) * g / rows` in one pass.
pub(crate) fn cross_entropy(
    logits: &Tensor<2>,
    labels: &Tensor<1, burn::tensor::Int>,
) -> Option<Tensor<1>> {
    if logits.dtype() != DType::F32 {
        return None;
    }
    let t = logits.clone().try_into_primitive::<FlexAd>().ok()?;
    let [rows, vocab] = logits.dims();
    let labels: Vec<i64> = labels
        .to_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .ok()?;
    if rows == 0 || labels.len() != rows || labels.iter().any(|&l| l < 0 || l as usize >= vocab) {
        return None;
    }
    let input = contiguous(t.primitive());
    let x = f32_slice(&input);
    // Per row: log-sum-exp, computed once and kept for the backward.
    let mut lse = vec![0.0f32; rows];
    let per_task = rows_per_task(vocab);
    lse.par_chunks_mut(per_task)
        .zip(x.par_chunks(per_task * vocab))
        .for_each(|(lse, x)| {
            simd(|| {
                for (lse, row) in lse.iter_mut().zip(x.chunks(vocab)) {
                    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    let sum: f32 = row.iter().map(|&v| exp(v - max)).sum();
                    *lse = max + sum.ln();
                }
            })
        });
    let loss = lse
        .iter()
        .zip(&labels)
        .enumerate()
        .map(|(r, (&lse, &l))| (lse - x[r * vocab + l as usize]) as f64)
        .sum::<f64>()
        / rows.max(1) as f64;
    let output = from_vec(vec![loss as f32], &burn::tensor::Shape::from(vec![1]));
    let out = record(CrossEntropyBackward, [&t], output, || CrossEntropyState {
        logits: input,
        lse: std::sync::Arc::new(lse),
        labels: std::sync::Arc::new(labels),
    });
    Some(Tensor::from_primitive::<FlexAd>(out))
}

#[derive(Debug, Clone)]
struct CrossEntropyState {
    logits: FlexTensor,
    lse: std::sync::Arc<Vec<f32>>,
    labels: std::sync::Arc<Vec<i64>>,
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<Flex, 1> for CrossEntropyBackward {
    type State = CrossEntropyState;

    fn backward(self, ops: Ops<CrossEntropyState, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let CrossEntropyState {
            logits,
            lse,
            labels,
        } = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            // The upstream gradient of the scalar loss.
            let g = f32_slice(&contiguous(&grad))
                .first()
                .copied()
                .unwrap_or(0.0);
            let shape = logits.layout().shape().clone();
            let vocab = shape[1];
            let x = f32_slice(&logits);
            let scale = g / lse.len().max(1) as f32;
            let mut dx = zeros(x.len());
            let per_task = rows_per_task(vocab);
            dx.par_chunks_mut(per_task * vocab)
                .zip(x.par_chunks(per_task * vocab))
                .zip(lse.par_chunks(per_task).zip(labels.par_chunks(per_task)))
                .for_each(|((dx, x), (lse, labels))| {
                    simd(|| {
                        for (((dx, x), &lse), &label) in dx
                            .chunks_mut(vocab)
                            .zip(x.chunks(vocab))
                            .zip(lse)
                            .zip(labels)
                        {
                            for (d, &v) in dx.iter_mut().zip(x) {
                                *d = exp(v - lse) * scale;
                            }
                            dx[label as usize] -= scale;
                        }
                    })
                });
            from_vec(dx, &shape)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_ops::testing::*;
    use burn::tensor::Device;

    #[test]
    fn cross_entropy_and_its_gradient_match_log_softmax_and_gather() {
        let device = Device::flex().autodiff();
        let (rows, vocab) = (9, 301);
        let labels =
            Tensor::<1, burn::tensor::Int>::from_ints([0, 300, 5, 5, 17, 299, 1, 150, 42], &device);
        let run = |fused: bool| {
            let x = random(rows * vocab, 8, &device).require_grad();
            // Spread the logits wide so the max subtraction matters.
            let logits = x.clone().reshape([rows, vocab]) * 7.0;
            let loss = if fused {
                cross_entropy(&logits, &labels)
                    .expect("the fused path takes f32 flex autodiff logits")
            } else {
                let log_probs = burn::tensor::activation::log_softmax(logits, 1);
                log_probs
                    .gather(1, labels.clone().reshape([rows, 1]))
                    .mean()
                    .neg()
            };
            // A non-unit upstream gradient, as under loss scaling or accumulation.
            let grads = (loss.clone() * 0.37).backward();
            (values(loss), values(x.grad(&grads).expect("a gradient")))
        };
        let want = run(false);
        let got = run(true);
        assert_close("loss", &got.0, &want.0, 1e-6);
        assert_close("dx", &got.1, &want.1, 1e-6);
        // Out-of-range labels and plain tensors take burn's path.
        let bad = Tensor::<1, burn::tensor::Int>::from_ints([0, 0, 0, 0, 0, 0, 0, 0, 301], &device);
        let logits = random(rows * vocab, 8, &device).reshape([rows, vocab]);
        assert!(cross_entropy(&logits, &bad).is_none());
        let plain = random(rows * vocab, 8, &Device::flex()).reshape([rows, vocab]);
        assert!(cross_entropy(&plain, &labels.clone().to_device(&Device::flex())).is_none());
    }
}
