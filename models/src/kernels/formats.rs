//! Block-quantized weight formats, produced at load from the verified f32/16-bit tensors and
//! repacked for the kernels, and the 8-bit activations they are multiplied with.
//!
//! Every format stores, per block of 32 weights of a row, unsigned codes `u` and a scale `s`
//! (f16), so that `w = s·u − m` with `m` either a fixed multiple of `s` (Q8_0: `u = q + 128`,
//! `m = 128 s`; Q4_0: `m = 8 s`) or a per-block minimum (Q4_K). A dot product with activations
//! quantized per block as `x = dx·q` is then
//!
//! ```text
//!   Σ_b s_b·dx_b·(Σ_i u_i·q_i)  −  Σ_b m_b·(dx_b·Σ_i q_i)
//! ```
//!
//! The first sum is what the integer dot-product instructions (AVX-512 VNNI `vpdpbusd`:
//! unsigned × signed bytes) compute; the second is a short f32 dot product with a per-activation
//! vector computed once per input. The values are those of llama.cpp's Q8_0 / Q4_0 / Q4_K (same
//! rounding rules, same 32- and 256-wide blocks); only the layout differs. Rows are stored in
//! panels of [`PANEL`] (16) rows, and within a panel block by block, each block's codes
//! interleaved four columns at a time: 64 bytes hold columns `4g..4g+4` of all sixteen rows, so
//! one `vpdpbusd` with four activation bytes broadcast adds those columns' products into sixteen
//! lanes, one per row. A block's eight such steps sum in integer lanes before one conversion and
//! one scale per row and block; no horizontal sums, no permutes, and every weight vector loaded
//! serves every token of a prompt tile. Q4 packs groups `h` and `h + 4` of a block as the low
//! and high nibbles of the same 64 bytes. Per panel and block the sixteen rows' scales (and
//! offsets) are adjacent, one f16 vector. Q4_K's six-bit sub-block scales and minima are
//! expanded at load into the per-block `s` and `m` (f16).

use half::f16;
use rayon::prelude::*;

/// Weights per block.
pub const BLOCK: usize = 32;
/// Rows per panel (one 512-bit register of per-row sums).
pub const PANEL: usize = 16;
/// Q4_K super-block (its scales are quantized per 256 weights).
pub const SUPER_BLOCK: usize = 256;

/// A quantized weight format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QKind {
    Q8_0,
    Q4_0,
    Q4K,
}

impl QKind {
    /// How many input columns a row must be a multiple of.
    pub fn tile(self) -> usize {
        match self {
            QKind::Q4K => SUPER_BLOCK,
            _ => BLOCK,
        }
    }

    /// Bytes of codes per block.
    pub fn code_bytes(self) -> usize {
        match self {
            QKind::Q8_0 => BLOCK,
            _ => BLOCK / 2,
        }
    }

    /// The offset as a multiple of the scale, for the kinds where it is fixed.
    pub fn fixed_offset(self) -> Option<f32> {
        match self {
            QKind::Q8_0 => Some(128.0),
            QKind::Q4_0 => Some(8.0),
            QKind::Q4K => None,
        }
    }
}

/// A quantized matrix in panels of [`PANEL`] rows (see the module docs); the last panel is
/// padded with zero rows.
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub kind: QKind,
    pub rows: usize,
    pub cols: usize,
    /// Blocks per row.
    pub blocks: usize,
    /// Codes: `blocks * PANEL * code_bytes` per panel.
    pub codes: Vec<u8>,
    /// Scales (f16 bits): per panel and block, the panel's rows'.
    pub scales: Vec<u16>,
    /// Per-block offsets `m` (f16 bits), laid out as the scales: Q4_K only. Empty for Q8_0 and
    /// Q4_0, whose offset is a fixed multiple of the scale (128 s, 8 s) that the kernels derive,
    /// so decode reads two bytes less per row and block.
    pub mins: Vec<u16>,
}

/// Blocks per row for `cols` columns.
pub fn padded_blocks(cols: usize) -> usize {
    cols.div_ceil(BLOCK)
}

/// Rows stored for `rows` rows (whole panels).
pub fn padded_rows(rows: usize) -> usize {
    rows.next_multiple_of(PANEL)
}

impl QMatrix {
    /// Quantizes a row-major f32 matrix. `cols` must be a multiple of `kind.tile()`.
    pub fn quantize(kind: QKind, w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "quantize length");
        let mut m = QMatrix::zeroed(kind, rows, cols);
        m.quantize_rows(0, w);
        m
    }

    /// A matrix of zeros, to be filled by [`QMatrix::quantize_rows`]. `cols` must be a multiple
    /// of `kind.tile()`.
    pub fn zeroed(kind: QKind, rows: usize, cols: usize) -> Self {
        assert!(
            cols > 0 && cols.is_multiple_of(kind.tile()),
            "quantize shape"
        );
        let blocks = padded_blocks(cols);
        let (cb, stored) = (kind.code_bytes(), padded_rows(rows));
        QMatrix {
            kind,
            rows,
            cols,
            blocks,
            codes: vec![0u8; stored * blocks * cb],
            scales: vec![0u16; stored * blocks],
            mins: match kind.fixed_offset() {
                Some(_) => Vec::new(),
                None => vec![0u16; stored * blocks],
            },
        }
    }

    /// Panels stored.
    pub fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL)
    }

    /// Panel `p`: its codes, scales and offsets.
    pub fn panel(&self, p: usize) -> (&[u8], &[u16], &[u16]) {
        let (cb, n) = (self.panel_code_bytes(), self.blocks * PANEL);
        let mins = match self.mins.is_empty() {
            true => &self.mins[..],
            false => &self.mins[p * n..(p + 1) * n],
        };
        (
            &self.codes[p * cb..(p + 1) * cb],
            &self.scales[p * n..(p + 1) * n],
            mins,
        )
    }

    fn panel_code_bytes(&self) -> usize {
        self.blocks * PANEL * self.kind.code_bytes()
    }

    /// Quantizes whole rows `first..` from `w` (a multiple of `cols` values), in parallel: a
    /// loader can stream a large tensor through in pieces instead of widening all of it first.
    pub fn quantize_rows(&mut self, first: usize, w: &[f32]) {
        let (kind, cols, blocks) = (self.kind, self.cols, self.blocks);
        assert!(w.len().is_multiple_of(cols), "quantize length");
        let n = w.len() / cols;
        assert!(first + n <= self.rows, "rows past the matrix");
        if n == 0 {
            return;
        }
        let (p0, p1) = (first / PANEL, (first + n).div_ceil(PANEL));
        let (cb, sb) = (self.panel_code_bytes(), blocks * PANEL);
        let mins: Vec<Option<&mut [u16]>> = match self.mins.is_empty() {
            true => (p0..p1).map(|_| None).collect(),
            false => self.mins[p0 * sb..p1 * sb]
                .chunks_mut(sb)
                .map(Some)
                .collect(),
        };
        let panels = self.codes[p0 * cb..p1 * cb]
            .par_chunks_mut(cb)
            .zip(self.scales[p0 * sb..p1 * sb].par_chunks_mut(sb))
            .zip(mins.into_par_iter())
            .enumerate();
        panels.for_each(|(i, ((codes, scales), mut mins))| {
            let p = p0 + i;
            let rows = (p * PANEL).max(first)..((p + 1) * PANEL).min(first + n);
            for r in rows {
                let row = &w[(r - first) * cols..(r - first + 1) * cols];
                let (u, s, m) = quantize_row(kind, row, blocks);
                let lane = r % PANEL;
                for b in 0..blocks {
                    scales[b * PANEL + lane] = s[b];
                    if let Some(mins) = &mut mins {
                        mins[b * PANEL + lane] = m[b];
                    }
                    for (j, &code) in u[b * BLOCK..(b + 1) * BLOCK].iter().enumerate() {
                        let (at, high) = code_position(kind, b, lane, j);
                        codes[at] = match (kind, high) {
                            (QKind::Q8_0, _) => code,
                            (_, false) => (codes[at] & 0xF0) | code,
                            (_, true) => (codes[at] & 0x0F) | (code << 4),
                        };
                    }
                }
            }
        });
    }

    /// Scale and offset of block `b` of row `r`.
    pub fn block_scale(&self, r: usize, b: usize) -> (f32, f32) {
        let at = (r / PANEL * self.blocks + b) * PANEL + r % PANEL;
        let s = f16::from_bits(self.scales[at]).to_f32();
        match self.kind.fixed_offset() {
            Some(o) => (s, s * o),
            None => (s, f16::from_bits(self.mins[at]).to_f32()),
        }
    }

    /// The unsigned code of column `c` of row `r`.
    pub fn code(&self, r: usize, c: usize) -> u8 {
        let (b, j) = (c / BLOCK, c % BLOCK);
        let (at, high) = code_position(self.kind, b, r % PANEL, j);
        let byte = self.codes[r / PANEL * self.panel_code_bytes() + at];
        match (self.kind, high) {
            (QKind::Q8_0, _) => byte,
            (_, false) => byte & 0x0F,
            (_, true) => byte >> 4,
        }
    }

    /// Row `r` as f32 values (embedding lookups).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() == self.cols, "row index");
        for (b, o) in out.chunks_mut(BLOCK).enumerate() {
            let (s, m) = self.block_scale(r, b);
            for (j, o) in o.iter_mut().enumerate() {
                *o = s * self.code(r, b * BLOCK + j) as f32 - m;
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.codes.len() + 2 * (self.scales.len() + self.mins.len())
    }
}

/// Where code `j` of block `b` of panel row `lane` lives in its panel: the byte, and for Q4
/// whether it is the high nibble.
fn code_position(kind: QKind, b: usize, lane: usize, j: usize) -> (usize, bool) {
    let (g, i) = (j / 4, j % 4);
    match kind {
        QKind::Q8_0 => (b * PANEL * BLOCK + g * 64 + lane * 4 + i, false),
        _ => (b * PANEL * BLOCK / 2 + (g % 4) * 64 + lane * 4 + i, g >= 4),
    }
}

/// One row: its unsigned codes (`blocks * BLOCK`), scales and offsets (f16 bits).
fn quantize_row(kind: QKind, row: &[f32], blocks: usize) -> (Vec<u8>, Vec<u16>, Vec<u16>) {
    let (mut scales, mut mins_out) = (vec![0u16; blocks], vec![0u16; blocks]);
    let mut u = vec![
        match kind {
            QKind::Q8_0 => 128u8,
            QKind::Q4_0 => 8,
            QKind::Q4K => 0,
        };
        blocks * BLOCK
    ];
    let mut s = vec![0f32; blocks];
    let mut mins = vec![0f32; blocks];
    match kind {
        QKind::Q8_0 => {
            for (b, x) in row.chunks_exact(BLOCK).enumerate() {
                s[b] = quantize_q8_block(x, &mut u[b * BLOCK..(b + 1) * BLOCK]);
            }
        }
        QKind::Q4_0 => {
            for (b, x) in row.chunks_exact(BLOCK).enumerate() {
                s[b] = quantize_q4_0_block(x, &mut u[b * BLOCK..(b + 1) * BLOCK]);
            }
        }
        QKind::Q4K => {
            let n = SUPER_BLOCK / BLOCK;
            for (sb, x) in row.chunks_exact(SUPER_BLOCK).enumerate() {
                let range = sb * n..(sb + 1) * n;
                quantize_q4k_super_block(
                    x,
                    &mut u[sb * SUPER_BLOCK..(sb + 1) * SUPER_BLOCK],
                    &mut s[range.clone()],
                    &mut mins[range],
                );
            }
        }
    }
    let off = kind.fixed_offset();
    for b in 0..blocks {
        // The stored scale is what the kernels multiply with; offsets derive from it.
        let sb = f16::from_f32(s[b]);
        scales[b] = sb.to_bits();
        let mb = match off {
            Some(o) => sb.to_f32() * o,
            None => mins[b],
        };
        mins_out[b] = f16::from_f32(mb).to_bits();
    }
    (u, scales, mins_out)
}

/// Rounds half away from zero, as `f32::round` — which is a libm call on baseline x86-64, and
/// quantizing a model calls it billions of times. Values past ±2^23 are already integers.
#[inline]
fn round(x: f32) -> f32 {
    if x.abs() >= 8_388_608.0 || x.is_nan() {
        return x;
    }
    // Truncation toward zero through an integer conversion (in range: |x| < 2^23).
    (x + 0.5f32.copysign(x)) as i32 as f32
}

/// Q8_0: `d = max|x| / 127`, `q = round(x / d)`; codes `q + 128`. Returns `d`.
fn quantize_q8_block(x: &[f32], u: &mut [u8]) -> f32 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (o, v) in u.iter_mut().zip(x) {
        *o = (round(v * id).clamp(-127.0, 127.0) as i32 + 128) as u8;
    }
    d
}

/// Q4_0: the value of largest magnitude maps to −8; `d = max / −8`, `q = x/d + 8` in 0..=15.
fn quantize_q4_0_block(x: &[f32], u: &mut [u8]) -> f32 {
    let mut max = 0f32;
    for &v in x {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (o, v) in u.iter_mut().zip(x) {
        *o = ((v * id + 8.5) as i32).clamp(0, 15) as u8;
    }
    d
}

/// Q4_K: per 32-weight sub-block a scale and minimum fitted by weighted least squares over a
/// small grid of candidate scales; the eight scales and eight minima of a super-block are then
/// quantized to six bits against two f16 super-scales, and the codes re-derived from those
/// quantized values (what llama.cpp's Q4_K stores). Writes codes, effective scales and minima.
fn quantize_q4k_super_block(x: &[f32], u: &mut [u8], s: &mut [f32], m: &mut [f32]) {
    let n = SUPER_BLOCK / BLOCK;
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for j in 0..n {
        let xb = &x[j * BLOCK..(j + 1) * BLOCK];
        let av = (xb.iter().map(|v| v * v).sum::<f32>() / BLOCK as f32).sqrt();
        let mut weights = [0f32; BLOCK];
        for (wi, v) in weights.iter_mut().zip(xb) {
            *wi = av + v.abs();
        }
        let (sc, mn) = fit_scale_min(xb, &weights, 15);
        scales[j] = sc;
        mins[j] = mn;
    }
    let max_scale = scales.iter().fold(0f32, |a, &v| a.max(v));
    let max_min = mins.iter().fold(0f32, |a, &v| a.max(v));
    let d = f16::from_f32(max_scale / 63.0).to_f32();
    let dmin = f16::from_f32(max_min / 63.0).to_f32();
    for j in 0..n {
        let ls = if max_scale > 0.0 {
            round(scales[j] * 63.0 / max_scale).clamp(0.0, 63.0)
        } else {
            0.0
        };
        let lm = if max_min > 0.0 {
            round(mins[j] * 63.0 / max_min).clamp(0.0, 63.0)
        } else {
            0.0
        };
        let (sj, mj) = (d * ls, dmin * lm);
        s[j] = sj;
        m[j] = mj;
        for (o, v) in u[j * BLOCK..(j + 1) * BLOCK]
            .iter_mut()
            .zip(&x[j * BLOCK..(j + 1) * BLOCK])
        {
            *o = if sj > 0.0 {
                round((v + mj) / sj).clamp(0.0, 15.0) as u8
            } else {
                0
            };
        }
    }
}

/// `t` rounded half up and clamped to `0..=nmax`: for values clamped first, the same as
/// rounding then clamping, and branch-free so the loops below vectorize (NaN becomes 0).
#[inline]
fn code_of(t: f32, nmax: f32) -> f32 {
    (t.clamp(0.0, nmax) + 0.5) as i32 as f32
}

/// Sums of eight-lane partial sums (the loops below keep eight independent chains so they
/// vectorize; `x.len()` is a multiple of 8).
const LANES: usize = 8;

/// Fits `x ≈ scale·q − min` with `q` in `0..=nmax` (`min ≥ 0`), minimizing the weighted squared
/// error over a grid of starting scales refined by least squares (llama.cpp's Q4_K search:
/// 21 candidate scales). Returns `(scale, min)`.
fn fit_scale_min(x: &[f32], w: &[f32], nmax: u8) -> (f32, f32) {
    debug_assert!(x.len().is_multiple_of(LANES));
    let nmax = nmax as f32;
    let lo = x.iter().fold(f32::INFINITY, |a, &v| a.min(v)).min(0.0);
    let hi = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    if hi <= lo {
        return (0.0, -lo);
    }
    let err = |scale: f32, min: f32| -> f32 {
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut acc = [0f32; LANES];
        for (xc, wc) in x.chunks_exact(LANES).zip(w.chunks_exact(LANES)) {
            for j in 0..LANES {
                let q = code_of((xc[j] - min) * inv, nmax);
                let e = scale * q + min - xc[j];
                acc[j] += wc[j] * e * e;
            }
        }
        acc.iter().sum()
    };
    let sw: f32 = w.iter().sum();
    let sx: f32 = x.iter().zip(w).map(|(v, wi)| wi * v).sum();
    let mut best = ((hi - lo) / nmax, lo);
    let mut best_err = err(best.0, best.1);
    for step in 0..=20 {
        let iscale = (-1.0 + 0.1 * step as f32 + nmax) / (hi - lo);
        let (mut sl, mut sl2, mut sxl) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
        for (xc, wc) in x.chunks_exact(LANES).zip(w.chunks_exact(LANES)) {
            for j in 0..LANES {
                let l = code_of(iscale * (xc[j] - lo), nmax);
                sl[j] += wc[j] * l;
                sl2[j] += wc[j] * l * l;
                sxl[j] += wc[j] * l * xc[j];
            }
        }
        let (sl, sl2, sxl): (f32, f32, f32) = (sl.iter().sum(), sl2.iter().sum(), sxl.iter().sum());
        let det = sw * sl2 - sl * sl;
        if det <= 0.0 {
            continue;
        }
        let mut scale = (sw * sxl - sx * sl) / det;
        let mut min = (sl2 * sx - sl * sxl) / det;
        if min > 0.0 {
            min = 0.0;
            scale = if sl2 > 0.0 { sxl / sl2 } else { 0.0 };
        }
        if scale <= 0.0 {
            continue;
        }
        let e = err(scale, min);
        if e < best_err {
            best_err = e;
            best = (scale, min);
        }
    }
    (best.0, -best.1)
}

/// Activations quantized per block of 32 to signed bytes (llama.cpp's Q8_0 rule), padded with
/// zero blocks to the matrix's block count.
#[derive(Debug, Clone, Default)]
pub struct QActs {
    pub q: Vec<i8>,
    /// Scale per block.
    pub d: Vec<f32>,
    /// `d·Σq` per block (multiplies the weights' per-block offsets).
    pub c: Vec<f32>,
    /// `Σq` per block (for kernels that compute `Σ(u − 128)·q`).
    pub sum: Vec<i32>,
}

impl QActs {
    /// Quantizes `x` into `blocks` blocks (reusing this buffer's allocations).
    pub fn quantize(&mut self, x: &[f32], blocks: usize) {
        assert!(x.len() <= blocks * BLOCK);
        self.q.clear();
        self.q.resize(blocks * BLOCK, 0);
        self.d.clear();
        self.d.resize(blocks, 0.0);
        self.c.clear();
        self.c.resize(blocks, 0.0);
        self.sum.clear();
        self.sum.resize(blocks, 0);
        #[cfg(target_arch = "x86_64")]
        let wide = super::isa() == super::Isa::Avx512;
        for (b, xb) in x.chunks(BLOCK).enumerate() {
            let q: &mut [i8; BLOCK] = (&mut self.q[b * BLOCK..(b + 1) * BLOCK])
                .try_into()
                .expect("one block");
            #[cfg(target_arch = "x86_64")]
            // SAFETY: avx512f detected; a chunk holds at most BLOCK values.
            let (d, sum) = if wide {
                unsafe { super::x86::quantize_block_avx512(xb, q) }
            } else {
                Self::quantize_block_scalar(xb, q)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (d, sum) = Self::quantize_block_scalar(xb, q);
            self.d[b] = d;
            self.sum[b] = sum;
            self.c[b] = d * sum as f32;
        }
    }

    /// One block (at most 32 values; `q` gets zeros past them): the scale and the codes' sum.
    pub fn quantize_block_scalar(xb: &[f32], q: &mut [i8; BLOCK]) -> (f32, i32) {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        q.fill(0);
        for (o, v) in q.iter_mut().zip(xb) {
            // Half away from zero, as `round` (which is a libm call on baseline x86-64).
            let s = (v * id).clamp(-127.0, 127.0);
            let c = (s + 0.5f32.copysign(s)) as i32;
            *o = c as i8;
            sum += c;
        }
        (d, sum)
    }
}

/// The scalar reference for one quantized row · activations (the kernels are tested against it).
pub fn dot_q_scalar(m: &QMatrix, r: usize, a: &QActs) -> f32 {
    let mut acc = 0f32;
    let mut corr = 0f32;
    for b in 0..m.blocks {
        let mut dp = 0i32;
        for i in 0..BLOCK {
            let c = b * BLOCK + i;
            let u = if c < m.cols { m.code(r, c) } else { 0 };
            dp += u as i32 * a.q[c] as i32;
        }
        let (s, mb) = m.block_scale(r, b);
        acc += s * a.d[b] * dp as f32;
        corr += mb * a.c[b];
    }
    acc - corr
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::values;

    #[test]
    fn activation_blocks_quantize_to_the_scalar_reference_bits() {
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::isa() == crate::kernels::Isa::Avx512 {
            let mut inputs: Vec<Vec<f32>> = (0..=32).map(|n| values(n, n as u32 + 7)).collect();
            inputs.push(vec![0.0; 32]);
            inputs.push(vec![-0.0, 1e-30, -1e-30, 3.0e38, -3.0e38, 0.5, -0.5, 127.0]);
            // Values that land exactly on halves after scaling (ties round away from zero).
            inputs.push((0..32).map(|i| i as f32 - 15.5).collect());
            for x in inputs {
                let (mut a, mut b) = ([1i8; BLOCK], [2i8; BLOCK]);
                let want = QActs::quantize_block_scalar(&x, &mut a);
                // SAFETY: avx512f detected; at most 32 values.
                let got = unsafe { crate::kernels::x86::quantize_block_avx512(&x, &mut b) };
                assert_eq!(want.0.to_bits(), got.0.to_bits(), "{x:?}");
                assert_eq!(want.1, got.1, "{x:?}");
                assert_eq!(a, b, "{x:?}");
            }
        }
    }

    fn rms(a: &[f32], b: &[f32]) -> f32 {
        let e: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let n: f32 = b.iter().map(|y| y * y).sum();
        (e / n).sqrt()
    }

    #[test]
    fn round_trip_error_is_what_each_format_allows() {
        let (rows, cols) = (8, 512);
        let w = values(rows * cols, 7);
        for (kind, bound) in [(QKind::Q8_0, 0.01), (QKind::Q4_0, 0.15), (QKind::Q4K, 0.12)] {
            let q = QMatrix::quantize(kind, &w, rows, cols);
            let mut back = vec![0f32; rows * cols];
            for r in 0..rows {
                q.dequantize_row(r, &mut back[r * cols..(r + 1) * cols]);
            }
            let e = rms(&back, &w);
            assert!(e < bound, "{kind:?}: relative RMS error {e}");
        }
    }

    #[test]
    fn q4k_fits_better_than_q4_0_on_skewed_rows() {
        // Rows that are not centred on zero are what the per-block minimum is for.
        let (rows, cols) = (4, 256);
        let w: Vec<f32> = values(rows * cols, 9)
            .iter()
            .map(|v| v * 0.5 + 0.7)
            .collect();
        let err = |kind| {
            let q = QMatrix::quantize(kind, &w, rows, cols);
            let mut back = vec![0f32; rows * cols];
            for r in 0..rows {
                q.dequantize_row(r, &mut back[r * cols..(r + 1) * cols]);
            }
            rms(&back, &w)
        };
        assert!(err(QKind::Q4K) < err(QKind::Q4_0));
    }

    #[test]
    fn the_scalar_dot_equals_the_dequantized_dot_up_to_activation_rounding() {
        let (rows, cols) = (19, 96); // a panel and three rows of the next
        let (w, x) = (values(rows * cols, 3), values(cols, 4));
        for kind in [QKind::Q8_0, QKind::Q4_0] {
            let q = QMatrix::quantize(kind, &w, rows, cols);
            assert_eq!((q.blocks, q.panels()), (3, 2));
            let mut a = QActs::default();
            a.quantize(&x, q.blocks);
            let xd: Vec<f32> = (0..cols).map(|i| a.d[i / BLOCK] * a.q[i] as f32).collect();
            for r in 0..rows {
                let mut row = vec![0f32; cols];
                q.dequantize_row(r, &mut row);
                let want: f32 = row.iter().zip(&xd).map(|(a, b)| a * b).sum();
                let got = dot_q_scalar(&q, r, &a);
                assert!(
                    (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "{got} {want}"
                );
            }
        }
    }

    #[test]
    fn hostile_values_quantize_without_panic() {
        let mut w = values(2 * 256, 5);
        for (i, v) in [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e30,
            -1e30,
            f32::MIN_POSITIVE / 4.0,
        ]
        .into_iter()
        .enumerate()
        {
            w[i * 37] = v;
        }
        for kind in [QKind::Q8_0, QKind::Q4_0, QKind::Q4K] {
            let q = QMatrix::quantize(kind, &w, 2, 256);
            let mut back = vec![0f32; 256];
            q.dequantize_row(1, &mut back);
            let mut a = QActs::default();
            a.quantize(&w[..256], q.blocks);
            let _ = dot_q_scalar(&q, 0, &a);
        }
    }

    #[test]
    fn zero_rows_quantize_to_zero() {
        for kind in [QKind::Q8_0, QKind::Q4_0, QKind::Q4K] {
            let q = QMatrix::quantize(kind, &[0.0; 256], 1, 256);
            let mut back = vec![1f32; 256];
            q.dequantize_row(0, &mut back);
            assert!(back.iter().all(|v| *v == 0.0), "{kind:?}");
        }
    }
}
