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
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support avx512f; `a` and `b` must have equal lengths.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY (all loads below): every index read is < n, the length of both slices; the
        // masked tail load touches only the lanes its mask enables.
        while i + 64 <= n {
            for (k, a_k) in acc.iter_mut().enumerate() {
                let o = i + k * 16;
                *a_k =
                    _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(o)), _mm512_loadu_ps(pb.add(o)), *a_k);
            }
            i += 64;
        }
        while i + 16 <= n {
            acc[0] = _mm512_fmadd_ps(
                _mm512_loadu_ps(pa.add(i)),
                _mm512_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 16;
        }
        if i < n {
            let mask: __mmask16 = (1u32 << (n - i)).wrapping_sub(1) as __mmask16;
            acc[1] = _mm512_fmadd_ps(
                _mm512_maskz_loadu_ps(mask, pa.add(i)),
                _mm512_maskz_loadu_ps(mask, pb.add(i)),
                acc[1],
            );
        }
        let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(sum)
    }

    /// Four dot products of consecutive rows of `w` (`4 * x.len()` values) with `x`.
    ///
    /// # Safety
    /// The CPU must support avx512f; `w.len()` must be `4 * x.len()`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot4_avx512(w: &[f32], x: &[f32]) -> [f32; 4] {
        let n = x.len();
        debug_assert_eq!(w.len(), 4 * n);
        let (pw, px) = (w.as_ptr(), x.as_ptr());
        let (mut a0, mut a1, mut a2, mut a3) = (
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
        );
        let mut i = 0;
        // SAFETY (all loads below): row k's index k*n + i + 15 < (k+1)*n while i + 16 <= n;
        // the masked tail touches only lanes below n.
        while i + 16 <= n {
            let xv = _mm512_loadu_ps(px.add(i));
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(pw.add(i)), xv, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(pw.add(n + i)), xv, a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(pw.add(2 * n + i)), xv, a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(pw.add(3 * n + i)), xv, a3);
            i += 16;
        }
        if i < n {
            let m: __mmask16 = (1u32 << (n - i)).wrapping_sub(1) as __mmask16;
            let xv = _mm512_maskz_loadu_ps(m, px.add(i));
            a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, pw.add(i)), xv, a0);
            a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, pw.add(n + i)), xv, a1);
            a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, pw.add(2 * n + i)), xv, a2);
            a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, pw.add(3 * n + i)), xv, a3);
        }
        [
            _mm512_reduce_add_ps(a0),
            _mm512_reduce_add_ps(a1),
            _mm512_reduce_add_ps(a2),
            _mm512_reduce_add_ps(a3),
        ]
    }

    /// # Safety
    /// The CPU must support avx2 and fma; `a` and `b` must have equal lengths.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY (all loads below): every index read is < n, the length of both slices.
        while i + 32 <= n {
            for (k, a_k) in acc.iter_mut().enumerate() {
                let o = i + k * 8;
                *a_k =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *a_k);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let hi = _mm256_extractf128_ps(s, 1);
        let lo = _mm256_castps256_ps128(s);
        let s4 = _mm_add_ps(hi, lo);
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        let mut sum = _mm_cvtss_f32(s1);
        while i < n {
            sum = (*pa.add(i)).mul_add(*pb.add(i), sum);
            i += 1;
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u32) -> Vec<f32> {
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
