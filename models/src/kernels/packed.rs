//! f32 weights packed for products with many activation rows at once (an encoder's batch).
//!
//! Why another layout: the row-major kernels ([`super::Matrix`]) take dot products along a
//! weight row, so every output ends in a horizontal sum, and a prompt product computes blocks
//! of outputs that are then copied into place; an encoder spends nearly all its time in such
//! products. Here the weights are stored in panels of [`PANEL_ROWS`] rows interleaved by column
//! (`panel[k * 64 + j] = W[64 p + j][k]`), and a product broadcasts one activation at a time
//! against a whole panel row: no horizontal sums, and each task writes its own tokens' outputs
//! in place.
//!
//! Why not the `gemm` crate: its blocking follows the problem's size, so a token's sums could
//! change with how many other tokens share the call, and an embedding must not depend on whose
//! requests it was batched with. Here every output is one FMA chain in column order from zero,
//! whatever the batch and however the work is split (tested bit for bit).

use rayon::prelude::*;

use super::aligned::Aligned;
use super::{isa, Isa};

/// Weight rows per panel (four 16-lane vectors).
pub const PANEL_ROWS: usize = 64;

/// Activation rows per kernel call: 6 × 4 accumulators, four weight vectors and a broadcast
/// fit the 32 vector registers.
pub const TILE_ROWS: usize = 6;

/// A `rows × cols` f32 weight matrix (`y = W x`) in column-interleaved panels.
pub struct PackedF32 {
    rows: usize,
    cols: usize,
    panels: Aligned<f32>,
}

impl std::fmt::Debug for PackedF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedF32({} × {})", self.rows, self.cols)
    }
}

impl PackedF32 {
    /// Whether this CPU runs packed products with vector kernels (AVX-512). Elsewhere the
    /// row-major kernels are the faster choice, and callers keep those.
    pub fn available() -> bool {
        isa() == Isa::Avx512
    }

    /// Packs row-major `w` (`rows × cols`); rows past the last panel's end are zero.
    pub fn pack(w: &[f32], rows: usize, cols: usize) -> Self {
        assert!(cols > 0 && w.len() == rows * cols, "packed matrix shape");
        let mut panels = Aligned::zeroed(rows.div_ceil(PANEL_ROWS) * cols * PANEL_ROWS);
        for (r, row) in w.chunks_exact(cols).enumerate() {
            let base = (r / PANEL_ROWS) * cols * PANEL_ROWS + r % PANEL_ROWS;
            for (k, v) in row.iter().enumerate() {
                panels[base + k * PANEL_ROWS] = *v;
            }
        }
        PackedF32 { rows, cols, panels }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.panels.len() * 4
    }

    fn panel_count(&self) -> usize {
        self.rows.div_ceil(PANEL_ROWS)
    }

    /// `y[t] = W x[t]` for every row `t` of `x` (`n × cols` in, `n × rows` out), split across
    /// the current rayon pool.
    pub fn apply(&self, x: &[f32], y: &mut [f32]) {
        self.apply_with(isa(), rayon::current_num_threads().max(1), x, y)
    }

    fn apply_with(&self, isa: Isa, tasks: usize, x: &[f32], y: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        assert!(x.len().is_multiple_of(cols), "input width");
        let n = x.len() / cols;
        assert_eq!(y.len(), n * rows, "output shape");
        if n == 0 || rows == 0 {
            return;
        }
        let panels = self.panel_count();
        if n >= tasks * TILE_ROWS {
            // Enough tokens: each task takes its own tokens through every panel, writing its
            // rows of `y` in place (a panel is read once per task and reused by all its tiles).
            let per = n.div_ceil(tasks);
            y.par_chunks_mut(per * rows)
                .zip(x.par_chunks(per * cols))
                .for_each(|(ys, xs)| self.product(isa, xs, ys, rows, 0..panels));
            return;
        }
        // Few tokens: the panels are shared out instead, each task filling a block of its own
        // (`[token][its rows]`) that is then copied into place; small, as `n` is.
        let per = panels.div_ceil(tasks);
        let blocks: Vec<(usize, usize, Vec<f32>)> = (0..panels.div_ceil(per))
            .into_par_iter()
            .map(|b| {
                let range = b * per..((b + 1) * per).min(panels);
                let first = range.start * PANEL_ROWS;
                let width = (range.end * PANEL_ROWS).min(rows) - first;
                let mut out = vec![0f32; n * width];
                self.product(isa, x, &mut out, width, range);
                (first, width, out)
            })
            .collect();
        for (first, width, out) in blocks {
            for (t, block) in out.chunks_exact(width).enumerate() {
                y[t * rows + first..t * rows + first + width].copy_from_slice(block);
            }
        }
    }

    /// Every row of `x` times panels `panels`, into `y` (`[token][stride]`, the first panel's
    /// first output at column 0).
    fn product(
        &self,
        isa: Isa,
        x: &[f32],
        y: &mut [f32],
        stride: usize,
        panels: std::ops::Range<usize>,
    ) {
        let cols = self.cols;
        let n = x.len() / cols;
        let offset = panels.start * PANEL_ROWS;
        for p in panels {
            let panel = &self.panels[p * cols * PANEL_ROWS..(p + 1) * cols * PANEL_ROWS];
            let first = p * PANEL_ROWS;
            let valid = (self.rows - first).min(PANEL_ROWS);
            let col = first - offset;
            let mut t = 0;
            while t < n {
                let k = (n - t).min(TILE_ROWS);
                panel_product(
                    isa,
                    k,
                    panel,
                    &x[t * cols..(t + k) * cols],
                    &mut y[t * stride + col..],
                    stride,
                    valid,
                );
                t += k;
            }
        }
    }
}

/// `rows` activation rows (`x`, `rows × cols`) times one panel: the first `valid` sums of row
/// `t` go to `y[t * stride..]`.
fn panel_product(
    isa: Isa,
    rows: usize,
    panel: &[f32],
    x: &[f32],
    y: &mut [f32],
    stride: usize,
    valid: usize,
) {
    let cols = panel.len() / PANEL_ROWS;
    assert!(
        (1..=TILE_ROWS).contains(&rows)
            && x.len() == rows * cols
            && valid <= PANEL_ROWS
            && valid <= stride
            && y.len() >= (rows - 1) * stride + valid,
        "panel product shape"
    );
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        use super::x86::panel_f32_avx512 as kernel;
        // SAFETY: `Isa::Avx512` means avx512f was detected; the shapes are checked above
        // (the panel holds `cols` rows of 64, x `rows` rows of `cols`, y the strided sums).
        unsafe {
            match rows {
                1 => kernel::<1>(panel, x, cols, y, stride, valid),
                2 => kernel::<2>(panel, x, cols, y, stride, valid),
                3 => kernel::<3>(panel, x, cols, y, stride, valid),
                4 => kernel::<4>(panel, x, cols, y, stride, valid),
                5 => kernel::<5>(panel, x, cols, y, stride, valid),
                _ => kernel::<6>(panel, x, cols, y, stride, valid),
            }
        }
        return;
    }
    let _ = isa;
    panel_scalar(panel, x, cols, y, stride, valid);
}

/// The reference: each sum one `mul_add` chain in column order from zero, as the kernel.
fn panel_scalar(panel: &[f32], x: &[f32], cols: usize, y: &mut [f32], stride: usize, valid: usize) {
    for (t, xs) in x.chunks_exact(cols).enumerate() {
        for (j, out) in y[t * stride..t * stride + valid].iter_mut().enumerate() {
            *out = xs.iter().enumerate().fold(0f32, |acc, (k, v)| {
                v.mul_add(panel[k * PANEL_ROWS + j], acc)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::values;

    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        if PackedF32::available() {
            v.push(Isa::Avx512);
        }
        v
    }

    /// `W x` in f64, for closeness.
    fn reference(w: &[f32], x: &[f32], cols: usize) -> Vec<f32> {
        x.chunks_exact(cols)
            .flat_map(|xs| {
                w.chunks_exact(cols).map(move |r| {
                    r.iter()
                        .zip(xs)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum::<f64>() as f32
                })
            })
            .collect()
    }

    /// Every shape class (a partial last panel, fewer tokens than a tile, more tokens than the
    /// tasks take in tiles, one column) on every kernel: close to the f64 product, and the
    /// vector kernel bit-identical to the scalar reference.
    #[test]
    fn packed_products_match_the_reference_bit_for_bit() {
        for (rows, cols) in [(1, 1), (64, 16), (100, 37), (384, 384), (130, 1536)] {
            let w = values(rows * cols, rows as u32 + 7);
            let m = PackedF32::pack(&w, rows, cols);
            for n in [1, 5, 6, 7, 13, 40] {
                let x = values(n * cols, n as u32 + 3);
                let want = reference(&w, &x, cols);
                let mut first: Option<Vec<f32>> = None;
                for isa in isas() {
                    for tasks in [1, 2, 3] {
                        let mut y = vec![f32::NAN; n * rows];
                        m.apply_with(isa, tasks, &x, &mut y);
                        for (a, b) in y.iter().zip(&want) {
                            assert!(
                                (a - b).abs() <= 1e-4 * (cols as f32).sqrt(),
                                "{rows}x{cols} n={n} {isa:?}: {a} vs {b}"
                            );
                        }
                        match &first {
                            None => first = Some(y),
                            Some(f) => assert!(
                                f.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{rows}x{cols} n={n} {isa:?} tasks={tasks}: bits differ"
                            ),
                        }
                    }
                }
            }
        }
    }

    /// A row's outputs are the same bits alone as inside any batch: what lets an embedding
    /// ignore whose requests it was batched with.
    #[test]
    fn a_rows_product_does_not_depend_on_the_batch() {
        let (rows, cols) = (200, 96);
        let w = values(rows * cols, 11);
        let m = PackedF32::pack(&w, rows, cols);
        let n = 29;
        let x = values(n * cols, 5);
        let mut all = vec![0f32; n * rows];
        m.apply(&x, &mut all);
        for t in [0, 6, 17, 28] {
            let mut alone = vec![0f32; rows];
            m.apply(&x[t * cols..(t + 1) * cols], &mut alone);
            assert!(alone
                .iter()
                .zip(&all[t * rows..(t + 1) * rows])
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }
}
