//! The KV cache of one sequence. Keys are kept transposed in blocks of [`KEYS`] positions
//! (`[block][kv_head][head_dim][KEYS]`) so that one register holds a key block's values for one
//! dimension and the scores of sixteen positions come out of one chain of FMAs; values stay in
//! rows (`[position][kv_head][head_dim]`), which is what the weighted sum reads. Both grow in
//! place as positions are added (amortized; a large buffer grows by remapping, not copying).

use crate::kernels::attention::KEYS;

/// The cache of one layer.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// One sequence's cache over every layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    kv_heads: usize,
    head_dim: usize,
    layers: Vec<LayerKv>,
}

impl KvCache {
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        KvCache {
            kv_heads,
            head_dim,
            layers: vec![LayerKv::default(); layers],
        }
    }

    fn kv_row(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        let (kv_row, block) = (self.kv_row(), self.kv_row() * KEYS);
        for l in &mut self.layers {
            l.keys.truncate(len.div_ceil(KEYS) * block);
            l.values.truncate(len * kv_row);
        }
    }

    /// Makes this cache hold the first `len` positions of `other` (of the same shape), and
    /// nothing after them; its own memory is reused.
    pub fn copy_prefix(&mut self, other: &KvCache, len: usize) {
        assert_eq!(
            (self.kv_heads, self.head_dim, self.layers.len()),
            (other.kv_heads, other.head_dim, other.layers.len()),
            "caches of one model"
        );
        let (kv_row, block) = (self.kv_row(), self.kv_row() * KEYS);
        for (to, from) in self.layers.iter_mut().zip(&other.layers) {
            assert!(from.values.len() >= len * kv_row, "the prefix is held");
            to.keys.clear();
            to.keys
                .extend_from_slice(&from.keys[..len.div_ceil(KEYS) * block]);
            to.values.clear();
            to.values.extend_from_slice(&from.values[..len * kv_row]);
        }
    }

    /// Stores the keys and values (`[token][kv_head][head_dim]` each) of the positions
    /// `at..` of layer `layer`; `at` must be the number of positions that layer holds.
    pub fn append(&mut self, layer: usize, at: usize, k: &[f32], v: &[f32]) {
        let (d, kv_row) = (self.head_dim, self.kv_row());
        let block = kv_row * KEYS;
        let l = &mut self.layers[layer];
        assert_eq!(l.values.len(), at * kv_row, "append continues the cache");
        assert_eq!(k.len(), v.len(), "as many keys as values");
        let n = k.len() / kv_row;
        l.values.extend_from_slice(v);
        l.keys.resize((at + n).div_ceil(KEYS) * block, 0.0);
        for (t, row) in k.chunks_exact(kv_row).enumerate() {
            let p = at + t;
            let base = p / KEYS * block + p % KEYS;
            for (h, head) in row.chunks_exact(d).enumerate() {
                for (j, &x) in head.iter().enumerate() {
                    l.keys[base + (h * d + j) * KEYS] = x;
                }
            }
        }
    }

    pub fn layer(&self, layer: usize) -> &LayerKv {
        &self.layers[layer]
    }
}

impl LayerKv {
    /// The transposed keys (`[head_dim][KEYS]`) of KV head `head` at positions
    /// `block * KEYS ..`; positions not yet written read as stale values (callers mask them).
    pub fn key_block(&self, block: usize, head: usize, head_dim: usize, kv_heads: usize) -> &[f32] {
        let start = (block * kv_heads + head) * head_dim * KEYS;
        &self.keys[start..start + head_dim * KEYS]
    }

    /// The value rows, `[position][kv_head][head_dim]`.
    pub fn values(&self) -> &[f32] {
        &self.values
    }
}
