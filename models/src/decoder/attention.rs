//! Causal grouped-query attention of new positions over the KV cache.
//!
//! Work is split into tasks of (a few tokens, one KV head): the queries of every head sharing
//! that KV head, for those tokens, are scored together against each block of transposed keys
//! and summed together over each value row, so every key and value read from the cache serves
//! them all. Per query the sums run in the same order however the work is split, so a prompt
//! and the same tokens fed one by one give the same bits.

use rayon::prelude::*;

use super::cache::LayerKv;
use super::Shape;
use crate::kernels::attention::{scores_block, weighted_sum, KEYS};

/// Tokens per task in a prompt: enough queries to reuse each key load (with the grouped heads),
/// few enough that the causal triangle's wasted corner stays small.
const TOKENS_PER_TASK: usize = 4;

/// What a layer's attention does beyond the shape.
pub struct Params {
    /// Multiplies the queries (1/√head_dim unless the family says otherwise).
    pub scale: f32,
    /// Each position sees only the last this-many positions.
    pub window: Option<usize>,
    /// `tanh(s / c) · c` on the scores.
    pub softcap: Option<f32>,
}

/// Attention of the rows of `q` (`[token][head][head_dim]`, at positions `pos..`) over the
/// cache (which already holds them); `out` has the shape of `q`.
pub fn attention(s: &Shape, p: &Params, q: &[f32], cache: &LayerKv, pos: usize, out: &mut [f32]) {
    let (d, q_row) = (s.head_dim, s.heads * s.head_dim);
    let n = q.len() / q_row;
    let per = if n == 1 { 1 } else { TOKENS_PER_TASK };
    let tasks: Vec<(usize, usize)> = (0..n.div_ceil(per))
        .flat_map(|b| (0..s.kv_heads).map(move |kv| (b * per, kv)))
        .collect();
    let run =
        |&(t0, kv): &(usize, usize)| (t0, kv, task(s, p, q, cache, pos, t0..(t0 + per).min(n), kv));
    // Short contexts are cheaper on this thread than waking the pool.
    let work = n * s.heads * (pos + n) * d;
    let done: Vec<(usize, usize, Vec<f32>)> = if work < 1 << 16 {
        tasks.iter().map(run).collect()
    } else {
        tasks.par_iter().map(run).collect()
    };
    let group_row = s.heads / s.kv_heads * d;
    for (t0, kv, o) in done {
        for (t, rows) in o.chunks_exact(group_row).enumerate() {
            let at = (t0 + t) * q_row + kv * group_row;
            out[at..at + group_row].copy_from_slice(rows);
        }
    }
}

/// Tokens `tokens`, the heads of KV head `kv`: their outputs, `[token][group head][head_dim]`.
fn task(
    s: &Shape,
    p: &Params,
    q: &[f32],
    cache: &LayerKv,
    pos: usize,
    tokens: std::ops::Range<usize>,
    kv: usize,
) -> Vec<f32> {
    let (d, q_row, kv_row) = (s.head_dim, s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let (t0, t1) = (tokens.start, tokens.end);
    let group = s.heads / s.kv_heads;
    let scale = p.scale;
    let window = |upto: usize| p.window.map_or(0, |w| upto.saturating_sub(w));
    // Keys every query of the task may see: from the first token's window start to the last
    // token's position, in whole blocks.
    let (first, upto) = (window(pos + t0 + 1), pos + t1);
    let (b0, b1) = (first / KEYS, upto.div_ceil(KEYS));
    let (span0, span) = (b0 * KEYS, (b1 - b0) * KEYS);
    let m = (t1 - t0) * group;
    let mut qs = Vec::with_capacity(m * d);
    for t in t0..t1 {
        let at = t * q_row + kv * group * d;
        qs.extend(q[at..at + group * d].iter().map(|x| x * scale));
    }
    let mut scores = vec![0f32; m * span];
    for b in b0..b1 {
        let keys = cache.key_block(b, kv, d, s.kv_heads);
        scores_block(&qs, d, keys, &mut scores[(b - b0) * KEYS..], span);
    }
    // Softmax over each query's own positions; the rest of its row weighs nothing.
    let mut inv = vec![0f32; m];
    for (i, row) in scores.chunks_exact_mut(span).enumerate() {
        let end = pos + t0 + i / group + 1;
        let (lo, hi) = (window(end) - span0, end - span0);
        if let Some(c) = p.softcap {
            row[lo..hi]
                .iter_mut()
                .for_each(|v| *v = (*v / c).tanh() * c);
        }
        let max = row[lo..hi].iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        let mut sum = 0f32;
        for v in &mut row[lo..hi] {
            *v = (*v - max).exp();
            sum += *v;
        }
        row[..lo].fill(0.0);
        row[hi..].fill(0.0);
        inv[i] = 1.0 / sum;
    }
    let mut o = vec![0f32; m * d];
    let values = &cache.values()[span0 * kv_row + kv * d..];
    weighted_sum(&scores, span, upto - span0, values, kv_row, &mut o, d);
    for (row, k) in o.chunks_exact_mut(d).zip(&inv) {
        for v in row {
            *v *= k;
        }
    }
    o
}
