//! Rotary position embeddings (RoPE), transformers' rotate-half form.

use super::*;
use burn::tensor::{Device, Int};
use std::sync::Arc;

/// RoPE's `(cos, sin)` tables, `[rows, seq, head_dim]` for `position_ids` `[rows, seq]` (rows 1
/// for positions shared by the batch), in f32 as transformers computes them
/// (`ModernBertRotaryEmbedding`: `inv_freq = 1 / theta ** (arange(0, dim, 2) / dim)`, the power
/// in f64 from the f32 exponent, then rounded; `freqs = position * inv_freq` in f32;
/// `cat(freqs, freqs)`; cos and sin in f32), so they match torch's to about 1 ulp (checked
/// against `scripts/make_rope_reference.py`'s tables). Positions given per token let packed rows
/// restart at 0 for each sequence. On `device`, in f32 whatever its default float type.
pub(crate) fn rope_cos_sin(
    position_ids: &Tensor<2, Int>,
    head_dim: usize,
    theta: f64,
    device: &Device,
) -> (Tensor<3>, Tensor<3>) {
    let [rows, seq] = position_ids.dims();
    let positions: Vec<i64> = position_ids
        .to_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("converted to i64");
    let inv_freq = inv_freq(head_dim, theta);
    let half = head_dim / 2;
    let (mut cos, mut sin) = (
        Vec::with_capacity(positions.len() * head_dim),
        Vec::with_capacity(positions.len() * head_dim),
    );
    for &p in &positions {
        let start = cos.len();
        for &f in &inv_freq {
            let angle = p as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
        // cat(freqs, freqs): the second half repeats the first.
        cos.extend_from_within(start..start + half);
        sin.extend_from_within(start..start + half);
    }
    let table = |values: Vec<f32>| {
        Tensor::<3>::from_data(TensorData::new(values, [rows, seq, head_dim]), device)
    };
    (table(cos), table(sin))
}

/// `1 / theta ** (2k / dim)` for `k < dim / 2`, as transformers' `compute_default_rope_parameters`
/// rounds it: the exponent in f32, torch's `pow(float, tensor)` in f64 then rounded to f32, the
/// division in f32.
fn inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|k| {
            let exponent = (2 * k) as f32 / head_dim as f32;
            1.0 / theta.powf(exponent as f64) as f32
        })
        .collect()
}

/// RoPE applied to q or k in the `[batch, seq, hidden]` projection layout, per head of
/// `hidden / heads`: `x * cos + rotate_half(x) * sin` (transformers' `apply_rotary_pos_emb`,
/// `rotate_half(x) = cat(-x2, x1)`), with `cos`, `sin` `[1 or batch, seq, head_dim]` from
/// [`rope_cos_sin`] (no gradient flows into them). Backward: the transposed rotation
/// (rotation by minus the angle). `None` unless x is an f32 flex tensor and the shapes fit
/// (head_dim even); the caller then runs burn's ops.
pub(crate) fn rotary(
    x: &Tensor<3>,
    cos: &Tensor<3>,
    sin: &Tensor<3>,
    heads: usize,
) -> Option<Tensor<3>> {
    let [batch, seq, hidden] = x.dims();
    let [rows, table_seq, head_dim] = cos.dims();
    if x.dtype() != DType::F32
        || heads == 0
        || hidden % heads != 0
        || hidden / heads != head_dim
        || head_dim % 2 != 0
        || sin.dims() != cos.dims()
        || table_seq != seq
        || !(rows == 1 || rows == batch)
    {
        return None;
    }
    let host = |t: &Tensor<3>| -> Option<Arc<Vec<f32>>> {
        Some(Arc::new(
            t.to_data().convert::<f32>().try_into_vec::<f32>().ok()?,
        ))
    };
    let table = Table {
        cos: host(cos)?,
        sin: host(sin)?,
        rows,
        seq,
        hidden,
        head_dim,
    };
    if let Ok(t) = x.clone().try_into_primitive::<FlexAd>() {
        let output = table.apply(t.primitive(), Direction::Forward);
        let out = record(RotaryBackward, [&t], output, || table);
        return Some(Tensor::from_primitive::<FlexAd>(out));
    }
    if let Ok(t) = x.clone().try_into_primitive::<Flex>() {
        return Some(Tensor::from_primitive::<Flex>(
            table.apply(&t, Direction::Forward),
        ));
    }
    None
}

/// The cos and sin tables of one call, on the host.
#[derive(Debug, Clone)]
struct Table {
    /// `[rows, seq, head_dim]`, rows 1 (shared by the batch) or batch.
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    rows: usize,
    seq: usize,
    hidden: usize,
    head_dim: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Direction {
    /// `y = x cos + rotate_half(x) sin`.
    Forward,
    /// Its transpose, for the gradient: `dx = g cos + rotate_half^T(g sin)`.
    Backward,
}

impl Table {
    /// The rotation (or its transpose) of every `[hidden]` row of `x`, `[batch, seq, hidden]`.
    ///
    /// q and k arrive as column slices of the fused qkv projection: rows of `hidden` at a
    /// stride of `3 hidden`. Those are read where they are instead of copied out first.
    fn apply(&self, x: &FlexTensor, direction: Direction) -> FlexTensor {
        let (hidden, d, seq) = (self.hidden, self.head_dim, self.seq);
        let copied;
        let (input, stride) = match strided_rows(x, hidden) {
            Some(view) => view,
            None => {
                copied = contiguous(x);
                (f32_slice(&copied), hidden)
            }
        };
        let half = d / 2;
        let tokens = x.layout().num_elements() / hidden;
        let mut out = zeros(tokens * hidden);
        let per_task = rows_per_task(hidden);
        out.par_chunks_mut(per_task * hidden)
            .enumerate()
            .for_each(|(chunk, out)| {
                simd(|| {
                    for (r, o) in out.chunks_mut(hidden).enumerate() {
                        // Row (b, s) of x reads table row (b or 0, s).
                        let token = chunk * per_task + r;
                        let x = &input[token * stride..][..hidden];
                        let at = ((token / seq) % self.rows * seq + token % seq) * d;
                        let (c, s) = (&self.cos[at..][..d], &self.sin[at..][..d]);
                        for (o, x) in o.chunks_mut(d).zip(x.chunks(d)) {
                            let (o1, o2) = o.split_at_mut(half);
                            let (x1, x2) = x.split_at(half);
                            let (c1, c2) = c.split_at(half);
                            let (s1, s2) = s.split_at(half);
                            match direction {
                                Direction::Forward => {
                                    for a in 0..half {
                                        o1[a] = x1[a] * c1[a] - x2[a] * s1[a];
                                        o2[a] = x2[a] * c2[a] + x1[a] * s2[a];
                                    }
                                }
                                Direction::Backward => {
                                    for a in 0..half {
                                        o1[a] = x1[a] * c1[a] + x2[a] * s2[a];
                                        o2[a] = x2[a] * c2[a] - x1[a] * s1[a];
                                    }
                                }
                            }
                        }
                    }
                })
            });
        from_vec(out, x.layout().shape())
    }
}

/// The elements of `x` `[batch, seq, hidden]` and its row stride, when its rows are contiguous
/// and evenly spaced (a contiguous tensor, or a column slice of a wider one): row `t` (batch-major)
/// is `&slice[t * stride..][..hidden]`.
fn strided_rows(x: &FlexTensor, hidden: usize) -> Option<(&[f32], usize)> {
    let layout = x.layout();
    let dims = layout.shape().dims::<3>();
    let [batch_stride, row_stride, unit] = <[isize; 3]>::try_from(layout.strides()).ok()?;
    let stride = usize::try_from(row_stride).ok()?;
    let rows = dims[0] * dims[1];
    let fits = dims[2] == hidden
        && unit == 1
        && stride >= hidden
        && (dims[0] <= 1 || batch_stride == row_stride * dims[1] as isize)
        && x.dtype() == DType::F32;
    if !fits || rows == 0 {
        return None;
    }
    let storage = x.storage::<f32>();
    let len = (rows - 1) * stride + hidden;
    storage
        .get(layout.start_offset()..)?
        .get(..len)
        .map(|s| (s, stride))
}

#[derive(Debug)]
struct RotaryBackward;

impl Backward<Flex, 1> for RotaryBackward {
    type State = Table;

    fn backward(self, ops: Ops<Table, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let table = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            table.apply(&grad, Direction::Backward)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu_ops::testing::*;

    /// `scripts/make_rope_reference.py`'s output: transformers' RoPE tables for head_dim 64.
    const REFERENCE: &str = include_str!("../../../../tests/fixtures/rope_reference.json");

    #[test]
    fn rope_tables_match_transformers() {
        let reference: serde_json::Value = serde_json::from_str(REFERENCE).expect("valid JSON");
        let head_dim = reference["head_dim"].as_u64().expect("head_dim") as usize;
        let positions: Vec<i64> = reference["positions"]
            .as_array()
            .expect("positions")
            .iter()
            .map(|p| p.as_i64().expect("an integer"))
            .collect();
        let floats = |v: &serde_json::Value| -> Vec<f32> {
            v.as_array()
                .expect("an array")
                .iter()
                .map(|x| x.as_f64().expect("a number") as f32)
                .collect()
        };
        let device = Device::flex();
        let ids = Tensor::<1, Int>::from_data(
            TensorData::new(positions.clone(), [positions.len()]),
            &device,
        )
        .reshape([1, positions.len()]);
        for base in reference["bases"].as_array().expect("bases") {
            let theta = base["theta"].as_f64().expect("theta");
            let bits: Vec<u32> = base["inv_freq_bits"]
                .as_array()
                .expect("bits")
                .iter()
                .map(|b| b.as_i64().expect("an integer") as u32)
                .collect();
            let ours: Vec<u32> = inv_freq(head_dim, theta)
                .iter()
                .map(|f| f.to_bits())
                .collect();
            assert_eq!(ours, bits, "inv_freq for theta {theta}, bit for bit");
            let (cos, sin) = rope_cos_sin(&ids, head_dim, theta, &device);
            let n = positions.len() * head_dim;
            // Both sides evaluate cos/sin of the same f32 angle (up to 8191 rad): within 1-2 ulp.
            assert_close(
                &format!("cos theta {theta}"),
                &values(cos.reshape([n])),
                &floats(&base["cos"]),
                1.2e-7,
            );
            assert_close(
                &format!("sin theta {theta}"),
                &values(sin.reshape([n])),
                &floats(&base["sin"]),
                1.2e-7,
            );
        }
    }

    /// transformers' `apply_rotary_pos_emb` in burn ops on `[batch, heads, seq, head_dim]`.
    fn composite(x: Tensor<3>, cos: Tensor<3>, sin: Tensor<3>, heads: usize) -> Tensor<3> {
        let [batch, seq, hidden] = x.dims();
        let d = hidden / heads;
        let x = x.reshape([batch, seq, heads, d]).swap_dims(1, 2);
        let rotate_half = |x: Tensor<4>| {
            let x1 = x.clone().narrow(3, 0, d / 2);
            let x2 = x.narrow(3, d / 2, d / 2);
            Tensor::cat(vec![x2.neg(), x1], 3)
        };
        let (cos, sin) = (cos.unsqueeze_dim::<4>(1), sin.unsqueeze_dim::<4>(1));
        (x.clone() * cos + rotate_half(x) * sin)
            .swap_dims(1, 2)
            .reshape([batch, seq, hidden])
    }

    #[test]
    fn rotary_values_and_gradient_match_the_composite_with_shared_and_per_token_positions() {
        let (batch, seq, heads, d) = (3, 11, 2, 6);
        let hidden = heads * d;
        let n = batch * seq * hidden;
        let device = Device::flex().autodiff();
        let plain = Device::flex();
        let shared = Tensor::<1, Int>::arange(0..seq as i64, &plain).reshape([1, seq]);
        // Packed rows: row 1 restarts at 0 after 4 tokens, row 2 counts down.
        let per_token: Vec<i64> = (0..batch * seq)
            .map(|t| match (t / seq, t % seq) {
                (0, s) => s as i64,
                (1, s) => (if s < 4 { s } else { s - 4 }) as i64,
                (_, s) => (seq - s) as i64 * 37,
            })
            .collect();
        let per_token =
            Tensor::<1, Int>::from_data(TensorData::new(per_token, [batch * seq]), &plain)
                .reshape([batch, seq]);
        let upstream = random(n, 21, &plain).reshape([batch, seq, hidden]);
        for (what, ids) in [("shared", shared), ("per token", per_token)] {
            // Constants in the graph: the tables live on the plain device.
            let (cos, sin) = rope_cos_sin(&ids, d, 10_000.0, &plain);
            let run = |fused: bool| {
                let x = random(n, 22, &device).require_grad();
                let x3 = x.clone().reshape([batch, seq, hidden]);
                let y = if fused {
                    rotary(&x3, &cos, &sin, heads).expect("f32 flex")
                } else {
                    composite(x3, cos.clone(), sin.clone(), heads)
                };
                let grads = (y.clone() * upstream.clone()).sum().backward();
                (
                    values(y.reshape([n])),
                    values(x.grad(&grads).expect("a gradient")),
                )
            };
            let want = run(false);
            let got = run(true);
            assert_close(&format!("{what} y"), &got.0, &want.0, 1e-6);
            assert_close(&format!("{what} dx"), &got.1, &want.1, 1e-6);
            let x = random(n, 22, &plain).reshape([batch, seq, hidden]);
            let y = rotary(&x, &cos, &sin, heads).expect("f32 flex");
            assert_eq!(
                values(y.reshape([n])),
                got.0,
                "{what}: plain flex = autodiff flex"
            );
            // q as the fused projection hands it over: the middle third of [b, s, 3 hidden],
            // read in place; the same values as from a contiguous copy.
            let wide = random(3 * n, 23, &plain).reshape([batch, seq, 3 * hidden]);
            let slice = wide.narrow(2, hidden, hidden);
            let copy = Tensor::<3>::from_data(slice.to_data(), &plain);
            let in_place = rotary(&slice, &cos, &sin, heads).expect("f32 flex");
            let copied = rotary(&copy, &cos, &sin, heads).expect("f32 flex");
            assert_eq!(
                values(in_place.reshape([n])),
                values(copied.reshape([n])),
                "{what}: a column slice = its contiguous copy"
            );
        }
    }
}
