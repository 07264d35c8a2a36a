//! The shared decoder pass ([`super::Spec`]: every llama-style family and its variants) written
//! on candle tensors, for the devices the own kernels do not run on (a GPU): the same batched
//! interface as [`super::Decoder`] — several sequences per pass, each with its own KV cache,
//! prompts in chunks — so continuous batching ([`crate::batch`]) and prefix reuse serve GPU
//! models too. Matrix products go to the device's BLAS (cuBLAS) with every sequence's rows in
//! one product, so a decode step of many sequences reads the weights once; attention runs per
//! sequence over its own cache. On the CPU it is what tests hold against the own decoder.
//!
//! Precision: weights and KV caches at the run dtype (bf16 on a GPU), or weights in candle's
//! block formats (`q8_0`, `q4_0`, `q4_k`, by the precision's per-role plan) with KV caches in
//! f32; norms, rotary positions, attention scores, softmax, activations and the residual
//! stream in f32. Unlike the own
//! decoder, a row's sums may depend on how many rows share a product (BLAS picks its kernels
//! by shape), so a batched request's tokens are equal to its unbatched ones within floating
//! tolerance, not bit for bit.
//!
//! Why a cache of its own and not `candle_nn::kv_cache::KvCache`: that one only appends, and
//! batching needs to continue a sequence at any position it holds (a kept cache reused for a
//! shorter shared prefix) and to copy a prefix into another sequence.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::{Chunk, Shape, Spec};
use crate::kernels::WeightType;
use crate::precision::{Precision, Role};
use crate::source::ModelSource;

/// A weight matrix on the device (`[out][in]`), with its bias (f32) if it has one: dense at the
/// run dtype, or in a block format (candle's quantized kernels). Takes and gives f32 rows.
enum Weight {
    Dense(Tensor, Option<Tensor>),
    Blocks(QMatMul, Option<Tensor>),
}

impl Weight {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (y, bias) = match self {
            Weight::Dense(w, b) => (
                x.to_dtype(w.dtype())?
                    .matmul(&w.t()?)?
                    .to_dtype(DType::F32)?,
                b,
            ),
            Weight::Blocks(w, b) => (w.forward(&x.contiguous()?)?, b),
        };
        match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// One layer's weights on the device: matrices at the run precision, norms in f32.
struct Layer {
    input_norm: Tensor,
    q: Weight,
    k: Weight,
    v: Weight,
    qk_norm: Option<[Tensor; 2]>,
    o: Weight,
    attn_out_norm: Option<Tensor>,
    post_norm: Tensor,
    mlp_out_norm: Option<Tensor>,
    gate: Weight,
    up: Weight,
    down: Weight,
}

/// Reads matrices at a precision: float ones through a `VarBuilder` at the run dtype on the
/// device; block formats (`--dtype q8_0|q4_0|q4_k`, the plan of [`Precision::weight_type`])
/// read at f32 on the host one matrix at a time, quantized there and moved to the device.
struct Matrices {
    precision: Precision,
    on_device: candle_nn::VarBuilder<'static>,
    host_f32: candle_nn::VarBuilder<'static>,
    device: Device,
}

impl Matrices {
    /// Rows `rows` of the `[all][cols]` matrix `name` (all of them: `0..all`).
    fn get(
        &self,
        name: &str,
        all: usize,
        cols: usize,
        rows: std::ops::Range<usize>,
        role: Role,
        bias: Option<Tensor>,
    ) -> candle_core::Result<Weight> {
        let whole = rows.start == 0 && rows.end == all;
        let pick = |t: Tensor| -> candle_core::Result<Tensor> {
            match whole {
                true => Ok(t),
                // A copy of its own: a narrowed view is "contiguous" at an offset, which
                // candle's quantizer does not honour (it reads from the storage's start).
                false => t.narrow(0, rows.start, rows.len())?.force_contiguous(),
            }
        };
        if self.precision.is_float() {
            return Ok(Weight::Dense(
                pick(self.on_device.get((all, cols), name)?)?,
                bias,
            ));
        }
        let host = pick(self.host_f32.get((all, cols), name)?)?;
        let block = match self.precision.weight_type(role, cols) {
            WeightType::Q8_0 => GgmlDType::Q8_0,
            WeightType::Q4_0 => GgmlDType::Q4_0,
            WeightType::Q4K => GgmlDType::Q4K,
            // A shape the block formats do not tile: f16, as the own decoder keeps it.
            _ => {
                return Ok(Weight::Dense(
                    host.to_dtype(DType::F16)?.to_device(&self.device)?,
                    bias,
                ))
            }
        };
        let q = QTensor::quantize_onto(&host, block, &self.device)?;
        Ok(Weight::Blocks(QMatMul::from_qtensor(q)?, bias))
    }
}

/// One sequence's KV cache on the device: per layer, keys and values `[kv_heads][capacity]
/// [head_dim]` at the run dtype, grown in steps as positions come (never past the model's
/// context), and how many positions are held.
pub struct TensorSequence {
    layers: Vec<(Tensor, Tensor)>,
    capacity: usize,
    len: usize,
}

impl TensorSequence {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Positions a cache grows by (so a decode reallocates once every this many steps).
const GROW: usize = 256;

/// The decoder pass on candle tensors, on one device.
pub struct TensorDecoder {
    spec: Spec,
    device: Device,
    /// KV caches (and dense weights of a float run) are held at this dtype.
    dtype: DType,
    /// Embedding rows, dense (a block-format run keeps them at f16).
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    head: Weight,
    /// `[head_dim / 2]` rotary frequencies, f32 on the device.
    inv_freq: Tensor,
    own: TensorSequence,
}

impl TensorDecoder {
    /// Reads the weights of `source` onto `device`: at `precision`'s block formats, or (a float
    /// precision) at `dtype`. Norms and biases are f32.
    pub fn load(
        spec: Spec,
        source: &Arc<ModelSource>,
        precision: Precision,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let s = &spec.shape;
        let var = &spec.variant;
        let (hid, inter) = (s.hidden, s.intermediate);
        let (q_out, kv_out) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        // A block-format run computes and caches in f32, as candle's quantized kernels do.
        let dtype = if precision.is_float() {
            dtype
        } else {
            DType::F32
        };
        let vb =
            |dtype, device: &Device| crate::weights::var_builder(source.clone(), dtype, device);
        let vectors = vb(DType::F32, device);
        let m = Matrices {
            precision,
            on_device: vb(dtype, device),
            host_f32: vb(DType::F32, &Device::Cpu),
            device: device.clone(),
        };
        let norm = |name: &str, width: usize| -> candle_core::Result<Tensor> {
            let w = vectors.get(width, name)?;
            if var.norm_plus_one {
                w + 1.0
            } else {
                Ok(w)
            }
        };
        let linear = |name: &str, rows: usize, cols: usize, bias: Option<String>| {
            let b = bias.map(|b| vectors.get(rows, &b)).transpose()?;
            m.get(name, rows, cols, 0..rows, Role::Linear, b)
        };
        let mut layers = Vec::with_capacity(s.layers);
        for i in 0..s.layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let mlp = format!("{p}.mlp");
            let bias = |x: &str| spec.qkv_bias.then(|| format!("{a}.{x}_proj.bias"));
            let ([q, k, v], [gate, up]) = if var.fused_projections {
                let qkv = format!("{a}.qkv_proj.weight");
                let all = q_out + 2 * kv_out;
                let gu = format!("{mlp}.gate_up_proj.weight");
                let part = |name: &str, all: usize, rows: std::ops::Range<usize>| {
                    m.get(name, all, hid, rows, Role::Linear, None)
                };
                (
                    [
                        part(&qkv, all, 0..q_out)?,
                        part(&qkv, all, q_out..q_out + kv_out)?,
                        part(&qkv, all, q_out + kv_out..all)?,
                    ],
                    [
                        part(&gu, 2 * inter, 0..inter)?,
                        part(&gu, 2 * inter, inter..2 * inter)?,
                    ],
                )
            } else {
                (
                    [
                        linear(&format!("{a}.q_proj.weight"), q_out, hid, bias("q"))?,
                        linear(&format!("{a}.k_proj.weight"), kv_out, hid, bias("k"))?,
                        linear(&format!("{a}.v_proj.weight"), kv_out, hid, bias("v"))?,
                    ],
                    [
                        linear(&format!("{mlp}.gate_proj.weight"), inter, hid, None)?,
                        linear(&format!("{mlp}.up_proj.weight"), inter, hid, None)?,
                    ],
                )
            };
            let post_attention = norm(&format!("{p}.post_attention_layernorm.weight"), hid)?;
            let (attn_out_norm, post_norm, mlp_out_norm) = if var.sandwich_norms {
                (
                    Some(post_attention),
                    norm(&format!("{p}.pre_feedforward_layernorm.weight"), hid)?,
                    Some(norm(
                        &format!("{p}.post_feedforward_layernorm.weight"),
                        hid,
                    )?),
                )
            } else {
                (None, post_attention, None)
            };
            layers.push(Layer {
                input_norm: norm(&format!("{p}.input_layernorm.weight"), hid)?,
                q,
                k,
                v,
                qk_norm: if spec.qk_norm {
                    Some([
                        vectors.get(s.head_dim, &format!("{a}.q_norm.weight"))?,
                        vectors.get(s.head_dim, &format!("{a}.k_norm.weight"))?,
                    ])
                } else {
                    None
                },
                o: linear(&format!("{a}.o_proj.weight"), hid, q_out, None)?,
                attn_out_norm,
                post_norm,
                mlp_out_norm,
                gate,
                up,
                down: linear(&format!("{mlp}.down_proj.weight"), hid, inter, None)?,
            });
        }
        let embed_name = "model.embed_tokens.weight";
        let embed = if precision.is_float() {
            m.on_device.get((s.vocab, hid), embed_name)?
        } else {
            m.host_f32
                .get((s.vocab, hid), embed_name)?
                .to_dtype(DType::F16)?
                .to_device(device)?
        };
        let head = match (spec.tied, precision.is_float()) {
            // The embedding itself, shared.
            (true, true) => Weight::Dense(embed.clone(), None),
            (true, false) => m.get(embed_name, s.vocab, hid, 0..s.vocab, Role::Head, None)?,
            (false, _) => m.get("lm_head.weight", s.vocab, hid, 0..s.vocab, Role::Head, None)?,
        };
        let d = s.head_dim;
        let inv_freq: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| 1f32 / s.rope_theta.powf(i as f32 / d as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, d / 2, device)?;
        let norm = norm("model.norm.weight", hid)?;
        Ok(TensorDecoder {
            own: TensorSequence {
                layers: Vec::new(),
                capacity: 0,
                len: 0,
            },
            spec,
            device: device.clone(),
            dtype,
            embed,
            layers,
            norm,
            head,
            inv_freq,
        })
    }

    pub fn shape(&self) -> &Shape {
        &self.spec.shape
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty sequence (no device memory until it is fed).
    pub fn new_sequence(&self) -> TensorSequence {
        TensorSequence {
            layers: Vec::new(),
            capacity: 0,
            len: 0,
        }
    }

    /// `dst` holds the first `len` positions of `src`, nothing else.
    pub fn copy_prefix(
        &self,
        dst: &mut TensorSequence,
        src: &TensorSequence,
        len: usize,
    ) -> candle_core::Result<()> {
        if len > src.len {
            candle_core::bail!("{len} positions of {}", src.len);
        }
        dst.len = 0;
        if len > 0 {
            self.reserve(dst, len)?;
            for ((dk, dv), (sk, sv)) in dst.layers.iter_mut().zip(&src.layers) {
                dk.slice_set(&sk.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                dv.slice_set(&sv.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
            }
        }
        dst.len = len;
        Ok(())
    }

    /// Forgets the decoder's own sequence (the single-stream calls').
    pub fn reset(&mut self) {
        self.own.len = 0;
    }

    /// Feeds the decoder's own sequence; the last position's logits (`all`: every one's).
    pub fn forward_own(
        &mut self,
        tokens: &[u32],
        pos: usize,
        all: bool,
    ) -> candle_core::Result<Vec<f32>> {
        let empty = self.new_sequence();
        let mut own = std::mem::replace(&mut self.own, empty);
        let out = self.run(
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

    /// One forward pass over several sequences; each chunk's last-position logits, in order.
    /// Every chunk is checked before anything changes; on an error the sequences' positions
    /// have not moved (their caches may hold partial writes past those positions, which the
    /// next pass overwrites).
    pub fn forward_batch(
        &self,
        chunks: &mut [Chunk<TensorSequence>],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        self.run(chunks, false)
    }

    fn check(&self, chunks: &[Chunk<TensorSequence>]) -> candle_core::Result<()> {
        super::check_chunks(
            &self.spec.shape,
            chunks.iter().map(|c| (c.pos, c.seq.len, c.tokens)),
        )
        .map_err(candle_core::Error::Msg)
    }

    /// Room for `positions` in `seq`, keeping what it holds below `seq.len`.
    fn reserve(&self, seq: &mut TensorSequence, positions: usize) -> candle_core::Result<()> {
        if positions <= seq.capacity && !seq.layers.is_empty() {
            return Ok(());
        }
        let s = &self.spec.shape;
        // Linear steps, not doubling: a cache never holds more than 255 positions past what
        // it needs, so the device memory check's full-length cache per sequence holds.
        let capacity = positions
            .next_multiple_of(GROW)
            .min(s.max_context)
            .max(positions);
        let keep = seq.len.min(seq.capacity);
        let mut layers = Vec::with_capacity(s.layers);
        for l in 0..s.layers {
            let fresh =
                || Tensor::zeros((s.kv_heads, capacity, s.head_dim), self.dtype, &self.device);
            let (k, v) = (fresh()?, fresh()?);
            if keep > 0 {
                let (ok, ov) = &seq.layers[l];
                k.slice_set(&ok.narrow(1, 0, keep)?.contiguous()?, 1, 0)?;
                v.slice_set(&ov.narrow(1, 0, keep)?.contiguous()?, 1, 0)?;
            }
            layers.push((k, v));
        }
        seq.layers = layers;
        seq.capacity = capacity;
        Ok(())
    }

    /// `all`: every position's logits, in one vector per chunk (`[tokens][vocab]`).
    fn run(
        &self,
        chunks: &mut [Chunk<TensorSequence>],
        all: bool,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        self.check(chunks)?;
        let s = &self.spec.shape;
        let var = &self.spec.variant;
        let (hid, d) = (s.hidden, s.head_dim);
        let group = s.heads / s.kv_heads;
        // Chunk i is rows starts[i]..starts[i + 1] of the batch; row r sits at positions[r].
        let mut starts = Vec::with_capacity(chunks.len() + 1);
        let mut positions: Vec<f32> = Vec::new();
        let mut tokens = Vec::new();
        for c in chunks.iter_mut() {
            // A smaller `pos` forgets the rest.
            c.seq.len = c.seq.len.min(c.pos);
            self.reserve(c.seq, c.pos + c.tokens.len())?;
            starts.push(tokens.len());
            positions.extend((c.pos..c.pos + c.tokens.len()).map(|p| p as f32));
            tokens.extend_from_slice(c.tokens);
        }
        starts.push(tokens.len());
        let n = tokens.len();
        let ids = Tensor::from_vec(tokens, n, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?.to_dtype(DType::F32)?;
        if var.scale_embeddings {
            x = (x * (hid as f64).sqrt())?;
        }
        // Rotary tables for these rows: angle = position × frequency (as the own decoder).
        let angles = Tensor::from_vec(positions, (n, 1), &self.device)?
            .broadcast_mul(&self.inv_freq.unsqueeze(0)?)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let masks = self.masks(chunks)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.input_norm, s.rms_eps)?;
            let project = |w: &Weight, heads: usize| -> candle_core::Result<Tensor> {
                w.forward(&h)?.reshape((n, heads, d))
            };
            let (mut q, mut k) = (project(&layer.q, s.heads)?, project(&layer.k, s.kv_heads)?);
            let v = project(&layer.v, s.kv_heads)?;
            if let Some([nq, nk]) = &layer.qk_norm {
                q = rms_norm(&q, nq, s.rms_eps)?;
                k = rms_norm(&k, nk, s.rms_eps)?;
            }
            // `[1][heads][rows][head_dim]`, as candle's rope wants; rows are the "time" axis,
            // each with its own position's table row.
            let rotate = |t: Tensor| -> candle_core::Result<Tensor> {
                let t = t.transpose(0, 1)?.unsqueeze(0)?.contiguous()?;
                candle_nn::rotary_emb::rope(&t, &cos, &sin)?.squeeze(0)
            };
            let (q, k) = (rotate(q)?, rotate(k)?);
            let v = v.transpose(0, 1)?;
            let window = match var.window_on_even_layers && l % 2 == 1 {
                true => None,
                false => s.sliding_window,
            };
            let scale = var.query_scale.unwrap_or(1.0 / (d as f32).sqrt()) as f64;
            let mut outs = Vec::with_capacity(chunks.len());
            for (i, c) in chunks.iter_mut().enumerate() {
                let (start, len) = (starts[i], starts[i + 1] - starts[i]);
                let total = c.pos + len;
                let (kc, vc) = &c.seq.layers[l];
                let to_cache =
                    |t: &Tensor| t.narrow(1, start, len)?.to_dtype(self.dtype)?.contiguous();
                kc.slice_set(&to_cache(&k)?, 1, c.pos)?;
                vc.slice_set(&to_cache(&v)?, 1, c.pos)?;
                let keys = kc.narrow(1, 0, total)?.to_dtype(DType::F32)?.contiguous()?;
                let values = vc.narrow(1, 0, total)?.to_dtype(DType::F32)?.contiguous()?;
                // The heads sharing a KV head are scored together: `[kv][group × rows][d]`.
                let qs =
                    q.narrow(1, start, len)?
                        .contiguous()?
                        .reshape((s.kv_heads, group * len, d))?;
                let mut scores = (qs.matmul(&keys.t()?)? * scale)?;
                if let Some(cap) = var.attn_softcap {
                    scores = ((scores / cap as f64)?.tanh()? * cap as f64)?;
                }
                if let Some(mask) = masks[i].as_ref().and_then(|m| m.get(&window)) {
                    scores = scores
                        .reshape((s.kv_heads, group, len, total))?
                        .broadcast_add(mask)?
                        .reshape((s.kv_heads, group * len, total))?;
                }
                let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                let out = probs
                    .matmul(&values)?
                    .reshape((s.heads, len, d))?
                    .transpose(0, 1)?
                    .reshape((len, s.heads * d))?;
                outs.push(out);
            }
            let att = Tensor::cat(&outs, 0)?;
            let mut proj = layer.o.forward(&att)?;
            if let Some(w) = &layer.attn_out_norm {
                proj = rms_norm(&proj, w, s.rms_eps)?;
            }
            x = (x + proj)?;
            let h = rms_norm(&x, &layer.post_norm, s.rms_eps)?;
            let gate = layer.gate.forward(&h)?;
            let up = layer.up.forward(&h)?;
            let act = if var.gelu_gate {
                gate.gelu()?
            } else {
                gate.silu()?
            };
            let mut proj = layer.down.forward(&(act * up)?)?;
            if let Some(w) = &layer.mlp_out_norm {
                proj = rms_norm(&proj, w, s.rms_eps)?;
            }
            x = (x + proj)?;
        }
        for c in chunks.iter_mut() {
            c.seq.len = c.pos + c.tokens.len();
        }
        // Only the rows whose logits are wanted go through the head.
        let rows: Vec<std::ops::Range<usize>> = (0..chunks.len())
            .map(|i| match all {
                true => starts[i]..starts[i + 1],
                false => starts[i + 1] - 1..starts[i + 1],
            })
            .collect();
        let picked: Vec<u32> = rows
            .iter()
            .flat_map(|r| r.clone())
            .map(|r| r as u32)
            .collect();
        let count = picked.len();
        let picked = Tensor::from_vec(picked, count, &self.device)?;
        let normed = rms_norm(&x.index_select(&picked, 0)?, &self.norm, s.rms_eps)?;
        let mut logits = self.head.forward(&normed)?;
        if let Some(c) = var.final_softcap {
            logits = ((logits / c as f64)?.tanh()? * c as f64)?;
        }
        let flat = logits.flatten_all()?.to_vec1::<f32>()?;
        let mut out = Vec::with_capacity(rows.len());
        let mut at = 0;
        for r in &rows {
            let len = r.len() * s.vocab;
            out.push(flat[at..at + len].to_vec());
            at += len;
        }
        Ok(out)
    }

    /// Per chunk, the additive masks (`[rows][positions]`: 0 where a row may look, −∞ where
    /// not) its attention needs, by window: none for a single row that sees every position.
    #[allow(clippy::type_complexity)]
    fn masks(
        &self,
        chunks: &[Chunk<TensorSequence>],
    ) -> candle_core::Result<Vec<Option<std::collections::HashMap<Option<usize>, Tensor>>>> {
        let s = &self.spec.shape;
        let var = &self.spec.variant;
        let mut windows = vec![s.sliding_window];
        if var.window_on_even_layers && s.sliding_window.is_some() {
            windows.push(None);
        }
        chunks
            .iter()
            .map(|c| {
                let (len, total) = (c.tokens.len(), c.pos + c.tokens.len());
                let mut by_window = std::collections::HashMap::new();
                for &w in &windows {
                    let sees_all = len == 1 && w.is_none_or(|w| total <= w);
                    if sees_all {
                        continue;
                    }
                    let mut m = vec![0f32; len * total];
                    for (r, row) in m.chunks_exact_mut(total).enumerate() {
                        let p = c.pos + r;
                        for (j, v) in row.iter_mut().enumerate() {
                            if j > p || w.is_some_and(|w| p - j >= w) {
                                *v = f32::NEG_INFINITY;
                            }
                        }
                    }
                    by_window.insert(w, Tensor::from_vec(m, (len, total), &self.device)?);
                }
                Ok((!by_window.is_empty()).then_some(by_window))
            })
            .collect()
    }
}

/// RMSNorm over the last dimension (f32 in, f32 out).
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps)
}
