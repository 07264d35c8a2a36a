//! BERT's encoder forward pass on the project's kernels: sentence-embedding models at f32, bf16
//! or f16 weights (in place from the mapping when the file has that type).
//!
//! Why not candle-transformers' BERT: a batch is padded to its longest input and every product
//! and attention runs over the padding; here the real tokens of every input are packed into one
//! matrix, so each weight row is read once per batch and applied to all of them (the kernels'
//! prompt tiles), and attention runs per input over its own tokens only (no mask, no padding).
//! candle-transformers stays the reference the tests compare against.

use rayon::prelude::*;

use crate::decoder::gelu_tanh;
use crate::decoder::load::TensorLoader;
use crate::kernels::attention::{scores_block, weighted_sum, KEYS};
use crate::kernels::{apply_group, Input, Matrix, PackedF32};
use crate::precision::Role;

/// The activation between the two MLP products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// GELU with erf (BERT's `gelu`).
    Gelu,
    /// GELU, tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
}

/// The shape of a BERT encoder.
#[derive(Debug, Clone)]
pub struct Shape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub vocab: usize,
    pub max_positions: usize,
    pub eps: f32,
    pub act: Act,
}

impl Shape {
    /// From BERT's `config.json`; `None` for what this pass does not run (left to candle).
    pub fn from_config(c: &serde_json::Value) -> Option<Shape> {
        let n = |k: &str| c.get(k)?.as_u64().map(|v| v as usize);
        let act = match c
            .get("hidden_act")
            .and_then(|v| v.as_str())
            .unwrap_or("gelu")
        {
            "gelu" => Act::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Act::GeluTanh,
            "relu" => Act::Relu,
            _ => return None,
        };
        let absolute = c
            .get("position_embedding_type")
            .and_then(|v| v.as_str())
            .is_none_or(|t| t == "absolute");
        let s = Shape {
            hidden: n("hidden_size")?,
            intermediate: n("intermediate_size")?,
            layers: n("num_hidden_layers")?,
            heads: n("num_attention_heads")?,
            vocab: n("vocab_size")?,
            max_positions: n("max_position_embeddings")?,
            eps: c
                .get("layer_norm_eps")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-12) as f32,
            act,
        };
        (absolute && s.heads > 0 && s.hidden > 0 && s.hidden.is_multiple_of(s.heads)).then_some(s)
    }
}

struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

struct Linear {
    w: Weights,
    b: Vec<f32>,
}

/// A projection's weights: f32 packed for whole-batch products where the CPU has the kernel
/// (what an encoder mostly runs at), else row-major at the run precision.
enum Weights {
    Rows(Matrix),
    Packed(PackedF32),
}

impl Weights {
    fn new(m: Matrix, rows: usize, cols: usize) -> Self {
        match m.f32_values() {
            Some(w) if PackedF32::available() => Weights::Packed(PackedF32::pack(w, rows, cols)),
            _ => Weights::Rows(m),
        }
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    attn_norm: Norm,
    up: Linear,
    down: Linear,
    out_norm: Norm,
}

/// A loaded encoder.
pub struct Encoder {
    shape: Shape,
    word: Matrix,
    positions: Vec<f32>,
    token_type: Vec<f32>,
    emb_norm: Norm,
    layers: Vec<Layer>,
    /// The encoder's own threads: a pass runs on one of them, so its products are shared with
    /// threads already awake instead of being handed from the caller's thread and back (as the
    /// decoder does; most of the time of a short input otherwise).
    pool: Option<rayon::ThreadPool>,
}

/// Below this many values, element-wise steps (norms, activations) run on the calling thread:
/// waking the pool costs more than they do.
const SERIAL_ELEMENTS: usize = 1 << 15;

impl Encoder {
    /// Loads the weights (names with or without the `bert.` prefix) at the loader's precision.
    pub fn load(shape: Shape, t: &mut TensorLoader) -> Result<Self, String> {
        let prefix = if t.has("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let (h, i) = (shape.hidden, shape.intermediate);
        let linear = |t: &mut TensorLoader, name: &str, rows, cols| -> Result<Linear, String> {
            let w = t.matrix(&format!("{prefix}{name}.weight"), rows, cols, Role::Linear)?;
            Ok(Linear {
                w: Weights::new(w, rows, cols),
                b: t.vector(&format!("{prefix}{name}.bias"), rows)?,
            })
        };
        let norm = |t: &mut TensorLoader, name: &str| -> Result<Norm, String> {
            Ok(Norm {
                weight: t.vector(&format!("{prefix}{name}.weight"), h)?,
                bias: t.vector(&format!("{prefix}{name}.bias"), h)?,
            })
        };
        let mut layers = Vec::with_capacity(shape.layers);
        for l in 0..shape.layers {
            let p = format!("encoder.layer.{l}");
            layers.push(Layer {
                q: linear(t, &format!("{p}.attention.self.query"), h, h)?,
                k: linear(t, &format!("{p}.attention.self.key"), h, h)?,
                v: linear(t, &format!("{p}.attention.self.value"), h, h)?,
                o: linear(t, &format!("{p}.attention.output.dense"), h, h)?,
                attn_norm: norm(t, &format!("{p}.attention.output.LayerNorm"))?,
                up: linear(t, &format!("{p}.intermediate.dense"), i, h)?,
                down: linear(t, &format!("{p}.output.dense"), h, i)?,
                out_norm: norm(t, &format!("{p}.output.LayerNorm"))?,
            });
        }
        let positions = format!("{prefix}embeddings.position_embeddings.weight");
        let token_type = format!("{prefix}embeddings.token_type_embeddings.weight");
        let type_rows = t
            .rows_of(&token_type)
            .filter(|&rows| rows > 0)
            .ok_or_else(|| format!("tensor {token_type:?} is missing or has no rows"))?;
        Ok(Encoder {
            word: t.matrix(
                &format!("{prefix}embeddings.word_embeddings.weight"),
                shape.vocab,
                h,
                Role::Embedding,
            )?,
            positions: t.vector_2d(&positions, shape.max_positions, h)?,
            // Every input is one segment: only type 0's row is used.
            token_type: t.vector_2d(&token_type, type_rows, h)?[..h].to_vec(),
            emb_norm: norm(t, "embeddings.LayerNorm")?,
            layers,
            shape,
            pool: rayon::ThreadPoolBuilder::new()
                .num_threads(rayon::current_num_threads())
                .build()
                .ok(),
        })
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The last layer's states of every token of every input (`[input][token][hidden]`).
    pub fn forward(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, String> {
        match &self.pool {
            Some(pool) => pool.install(|| self.run(batch)),
            None => self.run(batch),
        }
    }

    fn run(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, String> {
        let s = &self.shape;
        let h = s.hidden;
        let lens: Vec<usize> = batch.iter().map(Vec::len).collect();
        let n: usize = lens.iter().sum();
        if n == 0 {
            return Ok(batch.iter().map(|_| Vec::new()).collect());
        }
        let mut x = vec![0f32; n * h];
        let mut row = 0;
        for seq in batch {
            if seq.len() > s.max_positions {
                return Err(format!(
                    "input of {} tokens exceeds {}",
                    seq.len(),
                    s.max_positions
                ));
            }
            for (p, &t) in seq.iter().enumerate() {
                let t = t as usize;
                if t >= s.vocab {
                    return Err(format!("token {t} outside the vocabulary ({})", s.vocab));
                }
                let xr = &mut x[row * h..(row + 1) * h];
                self.word.row(t, xr);
                for ((v, pe), te) in xr
                    .iter_mut()
                    .zip(&self.positions[p * h..(p + 1) * h])
                    .zip(&self.token_type)
                {
                    *v += pe + te;
                }
                row += 1;
            }
        }
        layer_norm(&mut x, &self.emb_norm, s.eps);
        let (mut q, mut k, mut v) = (vec![0f32; n * h], vec![0f32; n * h], vec![0f32; n * h]);
        let mut att = vec![0f32; n * h];
        let mut proj = vec![0f32; n * h];
        let mut mid = vec![0f32; n * s.intermediate];
        for layer in &self.layers {
            match (&layer.q.w, &layer.k.w, &layer.v.w) {
                // Q, K and V read one input: prepared once for the row-major kernels.
                (Weights::Rows(wq), Weights::Rows(wk), Weights::Rows(wv)) => apply_group(
                    &mut Input::new(&x, h),
                    &mut [(wq, &mut q), (wk, &mut k), (wv, &mut v)],
                ),
                _ => {
                    for (lin, out) in [(&layer.q, &mut q), (&layer.k, &mut k), (&layer.v, &mut v)] {
                        lin.w.apply(&x, h, out);
                    }
                }
            }
            for (lin, out) in [(&layer.q, &mut q), (&layer.k, &mut k), (&layer.v, &mut v)] {
                lin.add_bias(out);
            }
            self_attention(s, &lens, &q, &k, &v, &mut att);
            layer.o.apply(&att, h, &mut proj);
            add_norm(&mut x, &proj, &layer.attn_norm, s.eps);
            layer.up.apply(&x, h, &mut mid);
            let act: fn(&mut [f32]) = match s.act {
                Act::Gelu => crate::kernels::activation::gelu_erf,
                Act::GeluTanh => |xs| xs.iter_mut().for_each(|v| *v = gelu_tanh(*v)),
                Act::Relu => |xs| xs.iter_mut().for_each(|v| *v = v.max(0.0)),
            };
            if mid.len() < SERIAL_ELEMENTS {
                act(&mut mid);
            } else {
                mid.par_chunks_mut(SERIAL_ELEMENTS / 4).for_each(act);
            }
            layer.down.apply(&mid, s.intermediate, &mut proj);
            add_norm(&mut x, &proj, &layer.out_norm, s.eps);
        }
        let mut out = Vec::with_capacity(batch.len());
        let mut at = 0;
        for len in lens {
            out.push(x[at * h..(at + len) * h].to_vec());
            at += len;
        }
        Ok(out)
    }
}

impl Weights {
    /// `y = x Wᵀ` for every `cols`-wide row of `x`.
    fn apply(&self, x: &[f32], cols: usize, y: &mut [f32]) {
        match self {
            Weights::Rows(m) => m.apply(&mut Input::new(x, cols), y),
            Weights::Packed(p) => p.apply(x, y),
        }
    }
}

impl Linear {
    /// `y = x Wᵀ + b` for every `cols`-wide row of `x`.
    fn apply(&self, x: &[f32], cols: usize, y: &mut [f32]) {
        self.w.apply(x, cols, y);
        self.add_bias(y);
    }

    fn add_bias(&self, y: &mut [f32]) {
        for row in y.chunks_exact_mut(self.b.len()) {
            for (v, b) in row.iter_mut().zip(&self.b) {
                *v += b;
            }
        }
    }
}

/// Bidirectional attention of every input over its own tokens (`lens` tokens each, packed).
fn self_attention(s: &Shape, lens: &[usize], q: &[f32], k: &[f32], v: &[f32], out: &mut [f32]) {
    let (h, heads) = (s.hidden, s.heads);
    let d = h / heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut starts = Vec::with_capacity(lens.len());
    let mut at = 0;
    for &len in lens {
        starts.push(at);
        at += len;
    }
    let tasks: Vec<(usize, usize, usize)> = lens
        .iter()
        .zip(&starts)
        .filter(|(&len, _)| len > 0)
        .flat_map(|(&len, &start)| (0..heads).map(move |head| (start, len, head)))
        .collect();
    let one = |&(start, len, head): &(usize, usize, usize)| {
        let col = head * d;
        let qs: Vec<f32> = (0..len)
            .flat_map(|t| q[(start + t) * h + col..(start + t) * h + col + d].iter())
            .map(|x| x * scale)
            .collect();
        // Keys transposed in blocks of KEYS positions (what the scores kernel reads).
        let blocks = len.div_ceil(KEYS);
        let mut kt = vec![0f32; blocks * d * KEYS];
        for t in 0..len {
            let (b, lane) = (t / KEYS, t % KEYS);
            for j in 0..d {
                kt[(b * d + j) * KEYS + lane] = k[(start + t) * h + col + j];
            }
        }
        let span = blocks * KEYS;
        let mut scores = vec![0f32; len * span];
        for b in 0..blocks {
            scores_block(
                &qs,
                d,
                &kt[b * d * KEYS..(b + 1) * d * KEYS],
                &mut scores[b * KEYS..],
                span,
            );
        }
        let mut inv = vec![0f32; len];
        for (row, inv) in scores.chunks_exact_mut(span).zip(inv.iter_mut()) {
            let max = row[..len].iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            let mut sum = 0f32;
            for v in &mut row[..len] {
                *v = (*v - max).exp();
                sum += *v;
            }
            row[len..].fill(0.0);
            *inv = 1.0 / sum;
        }
        let mut o = vec![0f32; len * d];
        weighted_sum(&scores, span, len, &v[start * h + col..], h, &mut o, d);
        for (row, k) in o.chunks_exact_mut(d).zip(&inv) {
            row.iter_mut().for_each(|v| *v *= k);
        }
        (start, len, col, o)
    };
    // Short inputs: cheaper on this thread than waking the pool for each head.
    let work: usize = lens.iter().map(|l| l * l).sum::<usize>() * h;
    let done: Vec<(usize, usize, usize, Vec<f32>)> = if work < 1 << 16 {
        tasks.iter().map(one).collect()
    } else {
        tasks.par_iter().map(one).collect()
    };
    for (start, len, col, o) in done {
        for t in 0..len {
            out[(start + t) * h + col..(start + t) * h + col + d]
                .copy_from_slice(&o[t * d..(t + 1) * d]);
        }
    }
}

/// `x = LayerNorm(x + y)`, row by row.
fn add_norm(x: &mut [f32], y: &[f32], norm: &Norm, eps: f32) {
    for (xi, yi) in x.iter_mut().zip(y) {
        *xi += yi;
    }
    layer_norm(x, norm, eps);
}

fn layer_norm(x: &mut [f32], norm: &Norm, eps: f32) {
    let h = norm.weight.len();
    let one = |row: &mut [f32]| {
        let mean = row.iter().sum::<f32>() / h as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, w), b) in row.iter_mut().zip(&norm.weight).zip(&norm.bias) {
            *v = (*v - mean) * inv * w + b;
        }
    };
    if x.len() < SERIAL_ELEMENTS {
        x.chunks_exact_mut(h).for_each(one);
    } else {
        x.par_chunks_exact_mut(h).for_each(one);
    }
}
