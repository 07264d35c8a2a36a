//! The decoder's numeric kernels: dot products and matrix–vector products over f32 weights,
//! split across threads, with AVX-512 and AVX2/FMA versions chosen at run time and a portable
//! fallback. Every `unsafe` SIMD block of the project lives here, each checked against the
//! scalar reference in the tests below across shape classes (tails, odd sizes, one and many
//! rows).
//!
//! Why hand-written: a one-row matrix–vector product is memory-bound, and candle sends it to a
//! GEMM that runs it on one thread without AVX-512 (about four fifths of a decode step). Here
//! each weight row is read once, by one thread, at full vector width.

use rayon::prelude::*;

pub mod activation;
pub mod aligned;
pub mod attention;
pub mod formats;
mod matrix;
pub mod packed;

pub use formats::{QActs, QKind, QMatrix};
pub use matrix::{apply_group, widen, Bytes, Elems, Input, Matrix, WeightType};
pub use packed::PackedF32;

/// What the CPU offers, detected once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2Fma,
    Portable,
}

/// The widest kernel set this CPU runs.
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2Fma;
            }
        }
        Isa::Portable
    })
}

/// Whether the CPU has AVX-512 VNNI (with BW and VL) for the quantized kernels.
pub fn has_vnni() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Whether the CPU converts f16 in hardware next to AVX2 (F16C).
pub fn has_f16c() -> bool {
    static F16C: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *F16C.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// `a · b`.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_with(isa(), a, b)
}

fn dot_with(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot of unequal lengths");
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only returned when the CPU reports avx512f; lengths are equal.
        Isa::Avx512 => unsafe { x86::dot_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2Fma` is only returned when the CPU reports avx2 and fma.
        Isa::Avx2Fma => unsafe { x86::dot_avx2(a, b) },
        _ => dot_scalar(a, b),
    }
}

/// `out[p] = q · rows[p * stride ..][..q.len()]` (attention scores over a run of cached keys).
pub fn dot_strided(q: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
    if out.is_empty() {
        return;
    }
    assert!(
        stride >= q.len() && rows.len() >= (out.len() - 1) * stride + q.len(),
        "dot_strided shape"
    );
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: avx512f detected; the shape is checked above.
        unsafe { x86::dot_strided_avx512(q, rows, stride, out) };
        return;
    }
    for (p, o) in out.iter_mut().enumerate() {
        *o = dot(q, &rows[p * stride..p * stride + q.len()]);
    }
}

/// `y += a · x`.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy of unequal lengths");
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        // SAFETY: avx512f detected; lengths equal.
        unsafe { x86::axpy_avx512(a, x, y) };
        return;
    }
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = a.mul_add(*xi, *yi);
    }
}

/// The reference: a plain sum of products, in four lanes like the vector versions.
pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 4];
    let chunks = a.len() / 4;
    for i in 0..chunks {
        for l in 0..4 {
            acc[l] = a[i * 4 + l].mul_add(b[i * 4 + l], acc[l]);
        }
    }
    let mut sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for i in chunks * 4..a.len() {
        sum = a[i].mul_add(b[i], sum);
    }
    sum
}

/// Rows handed to one task at a time: enough work to amortize scheduling, small enough that
/// every thread gets several pieces (and a preempted one does not hold up the rest for long).
fn rows_per_task(rows: usize, cols: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_threads = rows.div_ceil(threads * 4);
    // At least ~16 KiB of weights per task.
    let by_size = (4096 / cols.max(1)).max(1);
    by_threads.max(by_size).max(1)
}

/// `y = W x` for a row-major `W` of `y.len()` rows and `x.len()` columns.
pub fn matvec(w: &[f32], x: &[f32], y: &mut [f32]) {
    matvec_with(isa(), w, x, y)
}

fn matvec_with(isa: Isa, w: &[f32], x: &[f32], y: &mut [f32]) {
    let cols = x.len();
    assert_eq!(w.len(), y.len() * cols, "matvec shape");
    if cols == 0 {
        y.fill(0.0);
        return;
    }
    let per = rows_per_task(y.len(), cols);
    y.par_chunks_mut(per)
        .zip(w.par_chunks(per * cols))
        .for_each(|(ys, ws)| {
            rows_dot(isa, ws, x, ys);
        });
}

/// `ys[i] = ws_row_i · x` for consecutive rows: four rows at a time where the CPU has
/// AVX-512, so four weight streams are in flight at once (one stream cannot keep the memory
/// system busy) and each load of `x` serves four rows.
fn rows_dot(isa: Isa, ws: &[f32], x: &[f32], ys: &mut [f32]) {
    let cols = x.len();
    let mut r = 0;
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        while r + 4 <= ys.len() {
            let w4 = &ws[r * cols..(r + 4) * cols];
            // SAFETY: `Isa::Avx512` is only used when the CPU reports avx512f; `w4` holds
            // exactly four rows of `x.len()` values.
            let out = unsafe { x86::dot4_avx512(w4, x) };
            ys[r..r + 4].copy_from_slice(&out);
            r += 4;
        }
    }
    for (out, row) in ys[r..].iter_mut().zip(ws[r * cols..].chunks_exact(cols)) {
        *out = dot_with(isa, row, x);
    }
}

/// `Y = X Wᵀ` for `n` rows of `X` (`x.len() == n * cols`): every weight row is read once and
/// applied to all rows of `X` while it is in cache. For prompts (several tokens at once).
pub fn matmul_t(w: &[f32], x: &[f32], cols: usize, y: &mut [f32]) {
    let isa = isa();
    assert!(cols > 0 && x.len().is_multiple_of(cols), "matmul_t shape");
    let n = x.len() / cols;
    let rows = w.len() / cols;
    assert_eq!(w.len(), rows * cols, "matmul_t weight shape");
    assert_eq!(y.len(), n * rows, "matmul_t output shape");
    // Output row-major [n][rows]: tasks own ranges of weight rows; each writes a column block.
    let per = rows_per_task(rows, cols);
    let blocks: Vec<(usize, Vec<f32>)> = w
        .par_chunks(per * cols)
        .enumerate()
        .map(|(b, ws)| {
            let r = ws.len() / cols;
            let mut out = vec![0f32; n * r];
            for (t, xt) in x.chunks_exact(cols).enumerate() {
                rows_dot(isa, ws, xt, &mut out[t * r..(t + 1) * r]);
            }
            (b * per, out)
        })
        .collect();
    for (start, out) in blocks {
        let r = out.len() / n.max(1);
        for t in 0..n {
            y[t * rows + start..t * rows + start + r].copy_from_slice(&out[t * r..(t + 1) * r]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    pub(crate) fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 20000) as f32 / 10000.0 - 1.0
            })
            .collect()
    }

    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                v.push(Isa::Avx2Fma);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
        }
        v
    }

    fn close(a: f32, b: f32, n: usize) -> bool {
        (a - b).abs() <= 1e-5 * (n as f32).sqrt().max(1.0) * (1.0 + a.abs().max(b.abs()))
    }

    #[test]
    fn dot_matches_the_scalar_reference_for_every_length_class() {
        for n in [
            0, 1, 3, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 127, 576, 1536, 2049,
        ] {
            let (a, b) = (values(n, 1), values(n, 2));
            let reference = dot_scalar(&a, &b);
            for isa in isas() {
                let got = dot_with(isa, &a, &b);
                assert!(
                    close(got, reference, n),
                    "{isa:?} n={n}: {got} vs {reference}"
                );
            }
        }
    }

    #[test]
    fn matvec_matches_the_scalar_reference_for_one_and_many_rows() {
        for (rows, cols) in [
            (1, 1),
            (1, 576),
            (3, 17),
            (64, 64),
            (577, 33),
            (1536, 576),
            (49152 / 64, 576),
        ] {
            let (w, x) = (values(rows * cols, 3), values(cols, 4));
            let reference: Vec<f32> = w.chunks_exact(cols).map(|r| dot_scalar(r, &x)).collect();
            for isa in isas() {
                let mut y = vec![f32::NAN; rows];
                matvec_with(isa, &w, &x, &mut y);
                for (i, (g, r)) in y.iter().zip(&reference).enumerate() {
                    assert!(
                        close(*g, *r, cols),
                        "{isa:?} {rows}x{cols} row {i}: {g} vs {r}"
                    );
                }
            }
        }
    }

    const SHAPES: &[(usize, usize)] =
        &[(1, 32), (3, 96), (5, 576), (17, 256), (64, 1536), (9, 2048)];

    #[test]
    fn sixteen_bit_rows_match_the_scalar_reference() {
        for &(rows, cols) in SHAPES.iter().chain(&[(4, 1), (7, 17), (4, 33), (6, 47)]) {
            let w = values(rows * cols, 11);
            let x = values(cols, 12);
            let bf: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
            let hf: Vec<u16> = w
                .iter()
                .map(|v| half::f16::from_f32(*v).to_bits())
                .collect();
            for isa in isas() {
                for (bits, is_bf16) in [(&bf, true), (&hf, false)] {
                    let m = if is_bf16 {
                        Matrix::bf16(rows, cols, Elems::owned(bits.clone()))
                    } else {
                        Matrix::f16(rows, cols, Elems::owned(bits.clone()))
                    };
                    let mut y = vec![f32::NAN; rows];
                    m.apply_with_isa(isa, &mut Input::new(&x, cols), &mut y);
                    for (r, got) in y.iter().enumerate() {
                        let row = &bits[r * cols..(r + 1) * cols];
                        let want = if is_bf16 {
                            matrix::dot_16_scalar::<true>(row, &x)
                        } else {
                            matrix::dot_16_scalar::<false>(row, &x)
                        };
                        assert!(
                            close(*got, want, cols),
                            "{isa:?} bf16={is_bf16} {rows}x{cols} row {r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn quantized_rows_match_the_scalar_reference_on_every_tier() {
        for &(rows, cols) in SHAPES {
            let w = values(rows * cols, 13);
            let x = values(cols, 14);
            for kind in [QKind::Q8_0, QKind::Q4_0, QKind::Q4K] {
                if !cols.is_multiple_of(kind.tile()) {
                    continue;
                }
                let q = QMatrix::quantize(kind, &w, rows, cols);
                let mut a = QActs::default();
                a.quantize(&x, q.blocks);
                for r in 0..rows {
                    let want = formats::dot_q_scalar(&q, r, &a);
                    for tier in ["scalar", "avx2", "avx512"] {
                        let got = matrix::dot_q_tier(tier, &q, r, &a);
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()) * (cols as f32).sqrt(),
                            "{kind:?} {tier} {rows}x{cols} row {r}: {got} vs {want}"
                        );
                    }
                }
                // The threaded product over many rows equals the per-row kernel.
                let m = Matrix::quantized(q.clone());
                let mut y = vec![f32::NAN; rows];
                m.apply(&mut Input::new(&x, cols), &mut y);
                for (r, got) in y.iter().enumerate() {
                    assert_eq!(
                        *got,
                        matrix::dot_q_tier("best", &q, r, &a),
                        "{kind:?} row {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn prompt_tiles_give_the_bits_of_decode_steps() {
        for (n, rows, cols) in [(4, 4, 16), (9, 37, 576), (5, 130, 47), (8, 1536, 576)] {
            let w = values(rows * cols, 21);
            let x = values(n * cols, 22);
            let bf: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
            let hf: Vec<u16> = w
                .iter()
                .map(|v| half::f16::from_f32(*v).to_bits())
                .collect();
            for m in [
                Matrix::f32(rows, cols, Elems::owned(w.clone())),
                Matrix::bf16(rows, cols, Elems::owned(bf.clone())),
                Matrix::f16(rows, cols, Elems::owned(hf.clone())),
            ] {
                let mut y = vec![f32::NAN; n * rows];
                m.apply(&mut Input::new(&x, cols), &mut y);
                for t in 0..n {
                    let mut one = vec![f32::NAN; rows];
                    m.apply(
                        &mut Input::new(&x[t * cols..(t + 1) * cols], cols),
                        &mut one,
                    );
                    assert_eq!(
                        &y[t * rows..(t + 1) * rows],
                        &one[..],
                        "{:?} {n}x{rows}x{cols} token {t}",
                        m.weight_type()
                    );
                }
            }
        }
    }

    #[test]
    fn several_input_rows_equal_one_product_per_row_at_every_precision() {
        let (n, rows, cols) = (5, 37, 256);
        let w = values(rows * cols, 15);
        let x = values(n * cols, 16);
        let bf: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        let mats = [
            Matrix::f32(rows, cols, Elems::owned(w.clone())),
            Matrix::bf16(rows, cols, Elems::owned(bf)),
            Matrix::quantized(QMatrix::quantize(QKind::Q8_0, &w, rows, cols)),
            Matrix::quantized(QMatrix::quantize(QKind::Q4_0, &w, rows, cols)),
            Matrix::quantized(QMatrix::quantize(QKind::Q4K, &w, rows, cols)),
        ];
        for m in &mats {
            let mut y = vec![f32::NAN; n * rows];
            m.apply(&mut Input::new(&x, cols), &mut y);
            for t in 0..n {
                let mut one = vec![f32::NAN; rows];
                m.apply(
                    &mut Input::new(&x[t * cols..(t + 1) * cols], cols),
                    &mut one,
                );
                assert_eq!(
                    &y[t * rows..(t + 1) * rows],
                    &one[..],
                    "{:?}",
                    m.weight_type()
                );
            }
        }
    }

    /// Q, K and V (or gate and up) read one input in one grouped pass: each part's outputs are
    /// the bits its own product gives, for one row and for several, at every precision and
    /// with parts of different heights.
    #[test]
    fn a_grouped_product_equals_each_matrix_alone() {
        let cols = 256;
        for n in [1, 3, 7] {
            let x = values(n * cols, 40 + n as u32);
            for kind in ["f32", "bf16", "q8_0", "q4_k"] {
                let make = |rows: usize, seed: u32| {
                    let w = values(rows * cols, seed);
                    match kind {
                        "f32" => Matrix::f32(rows, cols, Elems::owned(w)),
                        "bf16" => Matrix::bf16(
                            rows,
                            cols,
                            Elems::owned(w.iter().map(|v| (v.to_bits() >> 16) as u16).collect()),
                        ),
                        "q8_0" => Matrix::quantized(QMatrix::quantize(QKind::Q8_0, &w, rows, cols)),
                        _ => Matrix::quantized(QMatrix::quantize(QKind::Q4K, &w, rows, cols)),
                    }
                };
                let mats = [make(96, 1), make(32, 2), make(33, 3)];
                let mut outs: Vec<Vec<f32>> =
                    mats.iter().map(|m| vec![f32::NAN; n * m.rows()]).collect();
                {
                    let [a, b, c] = &mut outs[..] else {
                        unreachable!()
                    };
                    apply_group(
                        &mut Input::new(&x, cols),
                        &mut [(&mats[0], a), (&mats[1], b), (&mats[2], c)],
                    );
                }
                for (m, got) in mats.iter().zip(&outs) {
                    let mut alone = vec![f32::NAN; n * m.rows()];
                    m.apply(&mut Input::new(&x, cols), &mut alone);
                    assert!(
                        got.iter()
                            .zip(&alone)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{kind} n={n} rows={}",
                        m.rows()
                    );
                }
            }
        }
    }

    #[test]
    fn attention_helpers_match_the_scalar_reference() {
        for (d, stride, count) in [(64, 192, 37), (128, 128, 5), (17, 40, 9), (64, 64, 0)] {
            let q = values(d, 31);
            let rows = values(count.max(1) * stride, 32);
            let mut out = vec![f32::NAN; count];
            dot_strided(&q, &rows, stride, &mut out);
            for (p, got) in out.iter().enumerate() {
                let want = dot_scalar(&q, &rows[p * stride..p * stride + d]);
                assert!(close(*got, want, d), "d={d} p={p}: {got} vs {want}");
            }
            let (x, mut y) = (values(d, 33), values(d, 34));
            let want: Vec<f32> = y
                .iter()
                .zip(&x)
                .map(|(y, x)| 0.37f32.mul_add(*x, *y))
                .collect();
            axpy(0.37, &x, &mut y);
            assert_eq!(y, want, "axpy d={d}");
        }
    }

    #[test]
    fn matmul_t_equals_one_matvec_per_row() {
        for (n, rows, cols) in [(1, 5, 7), (3, 64, 576), (17, 129, 65)] {
            let (w, x) = (values(rows * cols, 5), values(n * cols, 6));
            let mut y = vec![f32::NAN; n * rows];
            matmul_t(&w, &x, cols, &mut y);
            for t in 0..n {
                let mut one = vec![0f32; rows];
                matvec(&w, &x[t * cols..(t + 1) * cols], &mut one);
                assert_eq!(&y[t * rows..(t + 1) * rows], &one[..], "n={n} row {t}");
            }
        }
    }
}
