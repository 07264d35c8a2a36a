//! The project's own decoder forward pass for llama-style models (RMSNorm, rotary positions,
//! grouped-query attention, gated SiLU MLP), on the [`crate::kernels`].
//!
//! Why not candle-transformers' forward: per decode token it sends every projection to a GEMM on
//! one thread, concatenates the KV cache and repeats KV heads, and allocates per op. Here the
//! weights are read once per token by all threads, the KV cache grows in place (amortized, no
//! copy of what is there), grouped heads index their KV head instead of repeating it, and the
//! buffers are reused. candle-transformers stays the reference the tests compare against.
//!
//! Scope today: f32 weights, llama (`model_type` llama) without rope scaling; everything else
//! still runs on candle-transformers. The layout leaves room for several sequences per weight
//! read (`matmul_t` already applies each weight row to many token rows).

pub mod llama;

use rayon::prelude::*;

use crate::kernels;

/// The shape of a llama-style decoder.
#[derive(Debug, Clone)]
pub struct Shape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub max_context: usize,
}

/// One layer's weights, row-major `[out][in]` as stored in safetensors.
pub struct Layer {
    pub input_norm: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub o: Vec<f32>,
    pub post_norm: Vec<f32>,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub down: Vec<f32>,
}

pub struct Weights {
    pub embed: Vec<f32>,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    /// `None`: tied to `embed`.
    pub lm_head: Option<Vec<f32>>,
}

/// A decoder with its KV cache and scratch buffers.
pub struct Decoder {
    shape: Shape,
    w: Weights,
    inv_freq: Vec<f32>,
    /// Per layer, `[position][kv_head][head_dim]`, grown as positions are added.
    k_cache: Vec<Vec<f32>>,
    v_cache: Vec<Vec<f32>>,
    len: usize,
}

impl Decoder {
    pub fn new(shape: Shape, w: Weights) -> Self {
        let d = shape.head_dim;
        let inv_freq = (0..d)
            .step_by(2)
            .map(|i| 1f32 / shape.rope_theta.powf(i as f32 / d as f32))
            .collect();
        let layers = shape.layers;
        Decoder {
            shape,
            w,
            inv_freq,
            k_cache: vec![Vec::new(); layers],
            v_cache: vec![Vec::new(); layers],
            len: 0,
        }
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn reset(&mut self) {
        for c in self.k_cache.iter_mut().chain(self.v_cache.iter_mut()) {
            c.clear();
        }
        self.len = 0;
    }

    /// Feeds `tokens` at positions `pos..`, returns the logits of the last one. Positions must
    /// continue the cache (`pos` ≤ what is cached; a smaller `pos` forgets the rest).
    pub fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, String> {
        let s = self.shape.clone();
        let n = tokens.len();
        if n == 0 {
            return Err("no tokens".into());
        }
        if pos > self.len {
            return Err(format!("position {pos} is past the cache ({})", self.len));
        }
        if pos + n > s.max_context {
            return Err(format!(
                "context of {} tokens exceeds {}",
                pos + n,
                s.max_context
            ));
        }
        let kv_row = s.kv_heads * s.head_dim;
        for l in 0..s.layers {
            self.k_cache[l].truncate(pos * kv_row);
            self.v_cache[l].truncate(pos * kv_row);
        }
        let (hid, q_row) = (s.hidden, s.heads * s.head_dim);
        let mut x = Vec::with_capacity(n * hid);
        for &t in tokens {
            let t = t as usize;
            if t >= s.vocab {
                return Err(format!("token {t} outside the vocabulary ({})", s.vocab));
            }
            x.extend_from_slice(&self.w.embed[t * hid..(t + 1) * hid]);
        }
        let mut h = vec![0f32; n * hid];
        let mut q = vec![0f32; n * q_row];
        let mut k = vec![0f32; n * kv_row];
        let mut v = vec![0f32; n * kv_row];
        let mut att = vec![0f32; n * q_row];
        let mut proj = vec![0f32; n * hid];
        let mut gate = vec![0f32; n * s.intermediate];
        let mut up = vec![0f32; n * s.intermediate];
        for l in 0..s.layers {
            let layer = &self.w.layers[l];
            rms_norm(&x, &layer.input_norm, s.rms_eps, &mut h);
            linear(&layer.q, &h, hid, &mut q);
            linear(&layer.k, &h, hid, &mut k);
            linear(&layer.v, &h, hid, &mut v);
            for t in 0..n {
                let p = pos + t;
                rope(
                    &mut q[t * q_row..(t + 1) * q_row],
                    s.head_dim,
                    p,
                    &self.inv_freq,
                );
                rope(
                    &mut k[t * kv_row..(t + 1) * kv_row],
                    s.head_dim,
                    p,
                    &self.inv_freq,
                );
            }
            self.k_cache[l].extend_from_slice(&k);
            self.v_cache[l].extend_from_slice(&v);
            attention(&s, &q, &self.k_cache[l], &self.v_cache[l], pos, &mut att);
            linear(&layer.o, &att, q_row, &mut proj);
            for (xi, pi) in x.iter_mut().zip(&proj) {
                *xi += pi;
            }
            rms_norm(&x, &layer.post_norm, s.rms_eps, &mut h);
            linear(&layer.gate, &h, hid, &mut gate);
            linear(&layer.up, &h, hid, &mut up);
            for (g, u) in gate.iter_mut().zip(&up) {
                *g = silu(*g) * u;
            }
            linear(&layer.down, &gate, s.intermediate, &mut proj);
            for (xi, pi) in x.iter_mut().zip(&proj) {
                *xi += pi;
            }
        }
        self.len = pos + n;
        // Only the last position's logits are needed.
        let last = &x[(n - 1) * hid..];
        let mut normed = vec![0f32; hid];
        rms_norm(last, &self.w.norm, s.rms_eps, &mut normed);
        let head = self.w.lm_head.as_deref().unwrap_or(&self.w.embed);
        let mut logits = vec![0f32; s.vocab];
        kernels::matvec(head, &normed, &mut logits);
        Ok(logits)
    }
}

/// `y = x Wᵀ` for one or several rows of `x` (`cols` wide).
fn linear(w: &[f32], x: &[f32], cols: usize, y: &mut [f32]) {
    if x.len() == cols {
        kernels::matvec(w, x, y);
    } else {
        kernels::matmul_t(w, x, cols, y);
    }
}

/// Row-wise RMSNorm (f32, as the reference).
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, v), w) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * scale * w;
        }
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Rotary positions, non-interleaved halves (as llama's `rope`), for every head in `row`.
fn rope(row: &mut [f32], head_dim: usize, pos: usize, inv_freq: &[f32]) {
    let half = head_dim / 2;
    for head in row.chunks_exact_mut(head_dim) {
        for (j, f) in inv_freq.iter().enumerate().take(half) {
            let angle = pos as f32 * f;
            let (sin, cos) = angle.sin_cos();
            let (a, b) = (head[j], head[j + half]);
            head[j] = a * cos - b * sin;
            head[j + half] = b * cos + a * sin;
        }
    }
}

/// Causal grouped-query attention of the new rows of `q` (at positions `pos..`) over the cache.
fn attention(s: &Shape, q: &[f32], k_cache: &[f32], v_cache: &[f32], pos: usize, out: &mut [f32]) {
    let (d, q_row, kv_row) = (s.head_dim, s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let group = s.heads / s.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    // One task per (token, head): each writes its own slice of `out`.
    out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
        let (t, head) = (i / s.heads, i % s.heads);
        let kv = head / group;
        let qv = &q[t * q_row + head * d..t * q_row + (head + 1) * d];
        let upto = pos + t + 1;
        let mut scores: Vec<f32> = (0..upto)
            .map(|p| {
                kernels::dot(qv, &k_cache[p * kv_row + kv * d..p * kv_row + (kv + 1) * d]) * scale
            })
            .collect();
        let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for sc in scores.iter_mut() {
            *sc = (*sc - max).exp();
            sum += *sc;
        }
        o.fill(0.0);
        for (p, sc) in scores.iter().enumerate() {
            let w = sc / sum;
            let vv = &v_cache[p * kv_row + kv * d..p * kv_row + (kv + 1) * d];
            for (oi, vi) in o.iter_mut().zip(vv) {
                *oi += w * vi;
            }
        }
    });
}
