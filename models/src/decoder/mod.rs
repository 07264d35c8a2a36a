//! The project's own decoder forward pass for llama-style models (RMSNorm, rotary positions,
//! grouped-query attention, gated MLP), on the [`crate::kernels`].
//!
//! Why not candle-transformers' forward: per decode token it sends every projection to a GEMM on
//! one thread, concatenates the KV cache and repeats KV heads, and allocates per op. Here the
//! weights are read once per token by all threads, the KV cache grows in place (keys transposed
//! in blocks of 16 positions, see [`cache`]), the heads sharing a KV head are scored together
//! instead of repeating it, and prompts go through the kernels' multi-token tiles.
//! candle-transformers stays the reference the tests compare against.
//!
//! Families: llama, mistral, qwen2, qwen3, phi3, gemma2 (one small file each states what differs;
//! what goes beyond llama's layer is a [`Variant`] switch of the shared pass). Weights are
//! [`Matrix`]es at the run precision (f32, bf16, f16 in place from the mapping; Q8_0, Q4_0, Q4_K
//! repacked at load). The layout leaves room for several sequences per weight read
//! ([`Matrix::apply`] already applies each weight row to many input rows).

mod attention;
mod cache;
pub mod gemma2;
pub mod llama;
pub mod load;
pub mod mistral;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
pub mod tensor;

use rayon::prelude::*;

use crate::kernels::aligned::Aligned;
use crate::kernels::{self, Input, Matrix};
use crate::precision::Role;
use cache::KvCache;
use load::TensorLoader;

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
    /// Attention sees only the last this-many positions (Mistral, Qwen with sliding windows).
    pub sliding_window: Option<usize>,
}

/// What a family changes in the shared forward pass.
#[derive(Debug, Clone)]
pub struct Spec {
    pub shape: Shape,
    /// Q, K and V projections have biases (Qwen2).
    pub qkv_bias: bool,
    /// Per-head RMSNorm of Q and K before rotary (Qwen3).
    pub qk_norm: bool,
    /// The output head is the embedding matrix.
    pub tied: bool,
    pub variant: Variant,
}

/// Changes to llama's layer that some families make (all off by default).
#[derive(Debug, Clone, Default)]
pub struct Variant {
    /// Q, K and V in one `qkv_proj`, gate and up in one `gate_up_proj` (Phi-3): split by rows
    /// at load.
    pub fused_projections: bool,
    /// The MLP gate's activation is GELU (tanh approximation) instead of SiLU (Gemma 2).
    pub gelu_gate: bool,
    /// Norms multiply by `1 + w` (Gemma): folded into the weights at load.
    pub norm_plus_one: bool,
    /// The attention and MLP outputs are normed again before their residual adds, and the
    /// MLP's input norm is `pre_feedforward_layernorm` (Gemma 2).
    pub sandwich_norms: bool,
    /// Embeddings are multiplied by √hidden (Gemma).
    pub scale_embeddings: bool,
    /// Only even layers use the sliding window; odd ones see the whole context (Gemma 2).
    pub window_on_even_layers: bool,
    /// `tanh(s / c) · c` on attention scores (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// `tanh(l / c) · c` on the output logits (Gemma 2).
    pub final_softcap: Option<f32>,
    /// Queries scaled by this instead of 1/√head_dim (Gemma 2's `query_pre_attn_scalar`).
    pub query_scale: Option<f32>,
}

impl Spec {
    /// Whether the shared forward pass can run this shape.
    pub fn valid(&self) -> bool {
        let s = &self.shape;
        s.heads > 0
            && s.kv_heads > 0
            && s.heads.is_multiple_of(s.kv_heads)
            && s.head_dim > 0
            && s.head_dim.is_multiple_of(2)
            && s.sliding_window != Some(0)
    }
}

/// One layer's weights (`[out][in]` as stored in safetensors), at run precision.
pub struct Layer {
    pub input_norm: Vec<f32>,
    pub q: Matrix,
    pub k: Matrix,
    pub v: Matrix,
    pub qkv_bias: Option<[Vec<f32>; 3]>,
    pub qk_norm: Option<[Vec<f32>; 2]>,
    pub o: Matrix,
    /// The attention output's own norm, before the residual add (sandwich norms).
    pub attn_out_norm: Option<Vec<f32>>,
    /// The MLP's input norm.
    pub post_norm: Vec<f32>,
    /// The MLP output's own norm, before the residual add (sandwich norms).
    pub mlp_out_norm: Option<Vec<f32>>,
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
}

pub struct Weights {
    pub embed: Matrix,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    /// `None`: tied to `embed`.
    pub lm_head: Option<Matrix>,
}

/// Whether `config.json` asks for scaled rotary positions (not in the shared forward pass).
fn has_rope_scaling(raw: &serde_json::Value) -> bool {
    raw.get("rope_scaling").is_some_and(|v| !v.is_null())
}

/// `tie_word_embeddings` from `config.json` (absent: not tied).
fn tied(raw: &serde_json::Value) -> bool {
    raw.get("tie_word_embeddings")
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
}

/// Reads a llama-style decoder's weights (the Hugging Face names every supported family shares).
pub fn load_weights(spec: &Spec, t: &mut TensorLoader) -> Result<Weights, String> {
    let s = &spec.shape;
    let var = &spec.variant;
    let (hid, inter) = (s.hidden, s.intermediate);
    let (q_out, kv_out) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let norm = |t: &mut TensorLoader, name: &str| -> Result<Vec<f32>, String> {
        let mut w = t.vector(name, hid)?;
        if var.norm_plus_one {
            w.iter_mut().for_each(|v| *v += 1.0);
        }
        Ok(w)
    };
    let mut layers = Vec::with_capacity(s.layers);
    for i in 0..s.layers {
        let p = format!("model.layers.{i}");
        let a = format!("{p}.self_attn");
        let mlp = format!("{p}.mlp");
        let ([q, k, v], [gate, up]) = if var.fused_projections {
            let qkv = format!("{a}.qkv_proj.weight");
            let all = q_out + 2 * kv_out;
            let gu = format!("{mlp}.gate_up_proj.weight");
            (
                [
                    t.matrix_rows(&qkv, all, hid, 0..q_out, Role::Linear)?,
                    t.matrix_rows(&qkv, all, hid, q_out..q_out + kv_out, Role::Linear)?,
                    t.matrix_rows(&qkv, all, hid, q_out + kv_out..all, Role::Linear)?,
                ],
                [
                    t.matrix_rows(&gu, 2 * inter, hid, 0..inter, Role::Linear)?,
                    t.matrix_rows(&gu, 2 * inter, hid, inter..2 * inter, Role::Linear)?,
                ],
            )
        } else {
            (
                [
                    t.matrix(&format!("{a}.q_proj.weight"), q_out, hid, Role::Linear)?,
                    t.matrix(&format!("{a}.k_proj.weight"), kv_out, hid, Role::Linear)?,
                    t.matrix(&format!("{a}.v_proj.weight"), kv_out, hid, Role::Linear)?,
                ],
                [
                    t.matrix(&format!("{mlp}.gate_proj.weight"), inter, hid, Role::Linear)?,
                    t.matrix(&format!("{mlp}.up_proj.weight"), inter, hid, Role::Linear)?,
                ],
            )
        };
        let post_attention = norm(t, &format!("{p}.post_attention_layernorm.weight"))?;
        let (attn_out_norm, post_norm, mlp_out_norm) = if var.sandwich_norms {
            (
                Some(post_attention),
                norm(t, &format!("{p}.pre_feedforward_layernorm.weight"))?,
                Some(norm(t, &format!("{p}.post_feedforward_layernorm.weight"))?),
            )
        } else {
            (None, post_attention, None)
        };
        layers.push(Layer {
            input_norm: norm(t, &format!("{p}.input_layernorm.weight"))?,
            q,
            k,
            v,
            qkv_bias: if spec.qkv_bias {
                Some([
                    t.vector(&format!("{a}.q_proj.bias"), q_out)?,
                    t.vector(&format!("{a}.k_proj.bias"), kv_out)?,
                    t.vector(&format!("{a}.v_proj.bias"), kv_out)?,
                ])
            } else {
                None
            },
            qk_norm: if spec.qk_norm {
                Some([
                    t.vector(&format!("{a}.q_norm.weight"), s.head_dim)?,
                    t.vector(&format!("{a}.k_norm.weight"), s.head_dim)?,
                ])
            } else {
                None
            },
            o: t.matrix(&format!("{a}.o_proj.weight"), hid, q_out, Role::Linear)?,
            attn_out_norm,
            post_norm,
            mlp_out_norm,
            gate,
            up,
            down: t.matrix(&format!("{mlp}.down_proj.weight"), hid, inter, Role::Linear)?,
        });
    }
    let embed_role = if spec.tied {
        Role::Head
    } else {
        Role::Embedding
    };
    Ok(Weights {
        embed: t.matrix("model.embed_tokens.weight", s.vocab, hid, embed_role)?,
        layers,
        norm: norm(t, "model.norm.weight")?,
        lm_head: if spec.tied {
            None
        } else {
            Some(t.matrix("lm_head.weight", s.vocab, hid, Role::Head)?)
        },
    })
}

/// One sequence's state: its KV cache and how many positions it holds. A decoder runs any
/// number of them; each is fed only through [`Decoder::forward_batch`] (or the decoder's own,
/// for [`Decoder::forward`]).
pub struct Sequence {
    cache: KvCache,
    len: usize,
}

impl Sequence {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position (the cache's memory is kept for the next use).
    pub fn clear(&mut self) {
        self.cache.truncate(0);
        self.len = 0;
    }

    /// Holds the first `len` positions of `other` (a sequence of the same decoder), nothing
    /// else.
    pub fn copy_prefix(&mut self, other: &Sequence, len: usize) {
        assert!(len <= other.len, "{len} positions of {}", other.len);
        self.cache.copy_prefix(&other.cache, len);
        self.len = len;
    }
}

/// One part of a batched forward pass: `tokens` fed to `seq` at positions `pos..` (`pos` ≤
/// what the sequence holds; a smaller `pos` forgets the rest). A prompt chunk and a decode
/// step are the same thing with different lengths.
pub struct Chunk<'a, S = Sequence> {
    pub seq: &'a mut S,
    pub tokens: &'a [u32],
    pub pos: usize,
}

/// A decoder: the weights, and one sequence of its own for the single-stream calls.
pub struct Decoder {
    spec: Spec,
    w: Weights,
    inv_freq: Vec<f32>,
    own: Sequence,
    /// The decoder's own threads: a forward pass runs on one of them, so each of its parallel
    /// products is shared with threads that are already awake instead of being handed from the
    /// caller's thread to sleeping ones and back (about a sixth of a decode step otherwise).
    pool: Option<std::sync::Arc<rayon::ThreadPool>>,
}

impl Decoder {
    pub fn new(spec: Spec, w: Weights) -> Self {
        let s = &spec.shape;
        let d = s.head_dim;
        let inv_freq = (0..d)
            .step_by(2)
            .map(|i| 1f32 / s.rope_theta.powf(i as f32 / d as f32))
            .collect();
        let own = Sequence {
            cache: KvCache::new(s.layers, s.kv_heads, d),
            len: 0,
        };
        Decoder {
            spec,
            w,
            inv_freq,
            own,
            // Without a pool (threads refused), passes run on the global one.
            pool: rayon::ThreadPoolBuilder::new()
                .num_threads(rayon::current_num_threads())
                .build()
                .ok()
                .map(std::sync::Arc::new),
        }
    }

    pub fn shape(&self) -> &Shape {
        &self.spec.shape
    }

    /// An empty sequence for [`Decoder::forward_batch`].
    pub fn new_sequence(&self) -> Sequence {
        let s = &self.spec.shape;
        Sequence {
            cache: KvCache::new(s.layers, s.kv_heads, s.head_dim),
            len: 0,
        }
    }

    pub fn reset(&mut self) {
        self.own.clear();
    }

    /// Feeds `tokens` at positions `pos..` of the decoder's own sequence, returns the logits of
    /// the last one. Positions must continue the cache (`pos` ≤ what is cached; a smaller `pos`
    /// forgets the rest).
    pub fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, String> {
        self.own_pass(tokens, pos, false)
    }

    /// As [`Decoder::forward`], with the logits of every position (`[tokens][vocab]`): for
    /// scoring a text (perplexity, agreement between precisions).
    pub fn forward_all(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, String> {
        self.own_pass(tokens, pos, true)
    }

    fn own_pass(&mut self, tokens: &[u32], pos: usize, all: bool) -> Result<Vec<f32>, String> {
        let placeholder = Sequence {
            cache: KvCache::new(0, 0, 0),
            len: 0,
        };
        let mut own = std::mem::replace(&mut self.own, placeholder);
        let out = self.in_pool(
            &mut [Chunk {
                seq: &mut own,
                tokens,
                pos,
            }],
            all,
        );
        self.own = own;
        out.map(|mut v| v.pop().unwrap_or_default())
    }

    /// One forward pass over several sequences at once: every weight is read once for all
    /// their tokens (a decode step of many sequences costs about what one costs while reading
    /// the weights, not the arithmetic, bounds it); attention runs per sequence over its own
    /// cache. Returns each chunk's last-position logits, in order. Each token's numbers are
    /// those of the same token run alone: the kernels keep a row's sums in one order whatever
    /// else is in the batch, so batching never changes an output (tested).
    ///
    /// Every chunk is checked before anything changes: on an error no sequence has moved.
    pub fn forward_batch(&self, chunks: &mut [Chunk]) -> Result<Vec<Vec<f32>>, String> {
        self.in_pool(chunks, false)
    }

    fn in_pool(&self, chunks: &mut [Chunk], all: bool) -> Result<Vec<Vec<f32>>, String> {
        match &self.pool {
            Some(pool) => pool.install(|| self.run(chunks, all)),
            None => self.run(chunks, all),
        }
    }

    fn check(&self, chunks: &[Chunk]) -> Result<(), String> {
        check_chunks(
            &self.spec.shape,
            chunks.iter().map(|c| (c.pos, c.seq.len, c.tokens)),
        )
    }

    /// `all`: every position's logits, in one vector per chunk (`[tokens][vocab]`).
    fn run(&self, chunks: &mut [Chunk], all: bool) -> Result<Vec<Vec<f32>>, String> {
        self.check(chunks)?;
        let s = &self.spec.shape;
        let kv_row = s.kv_heads * s.head_dim;
        let (hid, q_row) = (s.hidden, s.heads * s.head_dim);
        // Chunk i is rows starts[i]..starts[i + 1] of the batch; row r sits at positions[r].
        let mut starts = Vec::with_capacity(chunks.len() + 1);
        let mut positions = Vec::new();
        let mut tokens = Vec::new();
        for c in chunks.iter_mut() {
            c.seq.cache.truncate(c.pos);
            starts.push(tokens.len());
            positions.extend(c.pos..c.pos + c.tokens.len());
            tokens.extend_from_slice(c.tokens);
        }
        starts.push(tokens.len());
        let n = tokens.len();
        let mut x = vec![0f32; n * hid];
        for (&t, xr) in tokens.iter().zip(x.chunks_exact_mut(hid)) {
            self.w.embed.row(t as usize, xr);
        }
        let var = &self.spec.variant;
        if var.scale_embeddings {
            let scale = (hid as f32).sqrt();
            x.iter_mut().for_each(|v| *v *= scale);
        }
        // The matrices' inputs start on cache lines, so `Input` need not copy them.
        let mut h = Aligned::<f32>::zeroed(n * hid);
        let mut q = vec![0f32; n * q_row];
        let mut k = vec![0f32; n * kv_row];
        let mut v = vec![0f32; n * kv_row];
        let mut att = Aligned::<f32>::zeroed(n * q_row);
        let mut proj = vec![0f32; n * hid];
        let mut gate = Aligned::<f32>::zeroed(n * s.intermediate);
        let mut up = vec![0f32; n * s.intermediate];
        for l in 0..s.layers {
            let layer = &self.w.layers[l];
            rms_norm(&x, &layer.input_norm, s.rms_eps, &mut h);
            kernels::apply_group(
                &mut Input::new(&h, hid),
                &mut [(&layer.q, &mut q), (&layer.k, &mut k), (&layer.v, &mut v)],
            );
            if let Some([bq, bk, bv]) = &layer.qkv_bias {
                add_rows(&mut q, bq);
                add_rows(&mut k, bk);
                add_rows(&mut v, bv);
            }
            if let Some([nq, nk]) = &layer.qk_norm {
                rms_norm_in_place(&mut q, nq, s.rms_eps);
                rms_norm_in_place(&mut k, nk, s.rms_eps);
            }
            // Rows are independent: spread over the pool (the same function per row, so the
            // same bits as a decode step).
            q.par_chunks_mut(q_row)
                .zip(k.par_chunks_mut(kv_row))
                .zip(positions.par_iter())
                .with_min_len(ROWS_PER_TASK)
                .for_each(|((qr, kr), &p)| {
                    rope(qr, s.head_dim, p, &self.inv_freq);
                    rope(kr, s.head_dim, p, &self.inv_freq);
                });
            for (i, c) in chunks.iter_mut().enumerate() {
                let rows = starts[i] * kv_row..starts[i + 1] * kv_row;
                c.seq.cache.append(l, c.pos, &k[rows.clone()], &v[rows]);
            }
            let params = attention::Params {
                scale: var.query_scale.unwrap_or(1.0 / (s.head_dim as f32).sqrt()),
                window: match var.window_on_even_layers && l % 2 == 1 {
                    true => None,
                    false => s.sliding_window,
                },
                softcap: var.attn_softcap,
            };
            // Each sequence attends over its own cache; sequences side by side on the pool.
            let mut outs: Vec<&mut [f32]> = Vec::with_capacity(chunks.len());
            let mut rest = &mut att[..];
            for i in 0..chunks.len() {
                let (mine, tail) = rest.split_at_mut((starts[i + 1] - starts[i]) * q_row);
                outs.push(mine);
                rest = tail;
            }
            let seqs: Vec<(&Sequence, usize)> = chunks.iter().map(|c| (&*c.seq, c.pos)).collect();
            outs.into_par_iter()
                .zip(seqs.par_iter())
                .enumerate()
                .for_each(|(i, (out, (seq, pos)))| {
                    let qs = &q[starts[i] * q_row..starts[i + 1] * q_row];
                    attention::attention(s, &params, qs, seq.cache.layer(l), *pos, out);
                });
            layer.o.apply(&mut Input::new(&att, q_row), &mut proj);
            if let Some(n) = &layer.attn_out_norm {
                rms_norm_in_place(&mut proj, n, s.rms_eps);
            }
            for (xi, pi) in x.iter_mut().zip(&proj) {
                *xi += pi;
            }
            rms_norm(&x, &layer.post_norm, s.rms_eps, &mut h);
            kernels::apply_group(
                &mut Input::new(&h, hid),
                &mut [(&layer.gate, &mut gate), (&layer.up, &mut up)],
            );
            let act = if var.gelu_gate { gelu_tanh } else { silu };
            gate.par_chunks_mut(s.intermediate)
                .zip(up.par_chunks(s.intermediate))
                .with_min_len(ROWS_PER_TASK)
                .for_each(|(gr, ur)| {
                    for (g, u) in gr.iter_mut().zip(ur) {
                        *g = act(*g) * u;
                    }
                });
            layer
                .down
                .apply(&mut Input::new(&gate, s.intermediate), &mut proj);
            if let Some(n) = &layer.mlp_out_norm {
                rms_norm_in_place(&mut proj, n, s.rms_eps);
            }
            for (xi, pi) in x.iter_mut().zip(&proj) {
                *xi += pi;
            }
        }
        for c in chunks.iter_mut() {
            c.seq.len = c.pos + c.tokens.len();
        }
        // Generation needs only each chunk's last position; the head reads its weights once
        // for all of them.
        let rows: Vec<std::ops::Range<usize>> = (0..chunks.len())
            .map(|i| match all {
                true => starts[i]..starts[i + 1],
                false => starts[i + 1] - 1..starts[i + 1],
            })
            .collect();
        let mut picked = Vec::with_capacity(rows.iter().map(|r| r.len()).sum::<usize>() * hid);
        for r in &rows {
            picked.extend_from_slice(&x[r.start * hid..r.end * hid]);
        }
        let mut normed = Aligned::<f32>::zeroed(picked.len());
        rms_norm(&picked, &self.w.norm, s.rms_eps, &mut normed);
        let head = self.w.lm_head.as_ref().unwrap_or(&self.w.embed);
        let mut logits = vec![0f32; picked.len() / hid * s.vocab];
        head.apply(&mut Input::new(&normed, hid), &mut logits);
        if let Some(c) = self.spec.variant.final_softcap {
            logits.iter_mut().for_each(|l| *l = (*l / c).tanh() * c);
        }
        let mut out = Vec::with_capacity(rows.len());
        let mut at = 0;
        for r in &rows {
            let len = r.len() * s.vocab;
            out.push(logits[at..at + len].to_vec());
            at += len;
        }
        Ok(out)
    }
}

/// Checks a pass's chunks, each `(pos, positions its sequence holds, tokens)`, before anything
/// changes: tokens in the vocabulary, positions continuing the cache and within the context.
pub(crate) fn check_chunks<'a>(
    s: &Shape,
    chunks: impl ExactSizeIterator<Item = (usize, usize, &'a [u32])>,
) -> Result<(), String> {
    if chunks.len() == 0 {
        return Err("no sequences".into());
    }
    for (pos, held, tokens) in chunks {
        let n = tokens.len();
        if n == 0 {
            return Err("no tokens".into());
        }
        if pos > held {
            return Err(format!("position {pos} is past the cache ({held})"));
        }
        if pos + n > s.max_context {
            return Err(format!(
                "context of {} tokens exceeds {}",
                pos + n,
                s.max_context
            ));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= s.vocab) {
            return Err(format!("token {t} outside the vocabulary ({})", s.vocab));
        }
    }
    Ok(())
}

/// Adds `bias` to every row of `x`.
fn add_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// RMSNorm of every `weight.len()`-wide piece of `x` (per head), in place.
fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    for xr in x.chunks_exact_mut(d) {
        let mean = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for (v, w) in xr.iter_mut().zip(weight) {
            *v = *v * scale * w;
        }
    }
}

/// Rows of a prompt one pool task handles in the element-wise steps (norms, rotary, the gate):
/// enough to outweigh the hand-off.
const ROWS_PER_TASK: usize = 4;

/// Row-wise RMSNorm (f32, as the reference), rows spread over the pool.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    x.par_chunks_exact(d)
        .zip(out.par_chunks_exact_mut(d))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(xr, or)| rms_norm_row(xr, weight, eps, or));
}

fn rms_norm_row(xr: &[f32], weight: &[f32], eps: f32, or: &mut [f32]) {
    let mean = xr.iter().map(|v| v * v).sum::<f32>() / weight.len() as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, v), w) in or.iter_mut().zip(xr).zip(weight) {
        *o = v * scale * w;
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU, tanh approximation (PyTorch's `gelu(approximate="tanh")`: Gemma's activation, and
/// BERT's `gelu_new`).
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x)).tanh())
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
