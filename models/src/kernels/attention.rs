//! The two products of attention over a KV cache, for several queries at once (the heads that
//! share a KV head, and in a prompt several tokens): scores against keys kept transposed in
//! blocks of [`KEYS`] positions, and the probability-weighted sum of value rows. Each query's
//! sums run in the same order whatever else is computed with it, so a prompt and decode steps
//! give the same bits.

use super::{isa, Isa};

/// Positions per block of the transposed key cache (one 512-bit register of scores).
pub const KEYS: usize = 16;

/// `out[q * stride + i] = Σ_j qs[q][j] · kt[j][i]`: the scores of the `qs.len() / d` queries
/// against the [`KEYS`] keys of one transposed block (`kt` is `[d][KEYS]`).
pub fn scores_block(qs: &[f32], d: usize, kt: &[f32], out: &mut [f32], stride: usize) {
    assert!(d > 0 && qs.len().is_multiple_of(d), "queries shape");
    assert_eq!(kt.len(), d * KEYS, "key block shape");
    let m = qs.len() / d;
    assert!(
        stride >= KEYS && (m == 0 || out.len() >= (m - 1) * stride + KEYS),
        "scores shape"
    );
    scores_block_with(isa(), qs, d, kt, out, stride)
}

fn scores_block_with(isa: Isa, qs: &[f32], d: usize, kt: &[f32], out: &mut [f32], stride: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: avx512f detected; the shapes are checked by the caller.
        Isa::Avx512 => unsafe { super::x86::scores_block_avx512(qs, d, kt, out, stride) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: avx2 and fma detected; the shapes are checked by the caller.
        Isa::Avx2Fma => unsafe { super::x86::scores_block_avx2(qs, d, kt, out, stride) },
        _ => scores_block_scalar(qs, d, kt, out, stride),
    }
}

/// The reference: per query and key, even and odd dimensions summed apart, then added (the
/// order the vector kernel keeps).
pub fn scores_block_scalar(qs: &[f32], d: usize, kt: &[f32], out: &mut [f32], stride: usize) {
    for (q, qv) in qs.chunks_exact(d).enumerate() {
        for i in 0..KEYS {
            let (mut even, mut odd) = (0f32, 0f32);
            let mut j = 0;
            while j + 2 <= d {
                even = qv[j].mul_add(kt[j * KEYS + i], even);
                odd = qv[j + 1].mul_add(kt[(j + 1) * KEYS + i], odd);
                j += 2;
            }
            if j < d {
                even = qv[j].mul_add(kt[j * KEYS + i], even);
            }
            out[q * stride + i] = even + odd;
        }
    }
}

/// `out[q] = Σ_i ps[q * stride + i] · v[i * v_stride ..][..d]` over `keys` value rows, for the
/// `out.len() / d` queries.
pub fn weighted_sum(
    ps: &[f32],
    stride: usize,
    keys: usize,
    v: &[f32],
    v_stride: usize,
    out: &mut [f32],
    d: usize,
) {
    assert!(d > 0 && out.len().is_multiple_of(d), "output shape");
    let m = out.len() / d;
    assert!(
        keys == 0 || v.len() >= (keys - 1) * v_stride + d,
        "value rows shape"
    );
    assert!(
        m == 0 || (stride >= keys && ps.len() >= (m - 1) * stride + keys),
        "weights shape"
    );
    weighted_sum_with(isa(), ps, stride, keys, v, v_stride, out, d)
}

#[allow(clippy::too_many_arguments)]
fn weighted_sum_with(
    isa: Isa,
    ps: &[f32],
    stride: usize,
    keys: usize,
    v: &[f32],
    v_stride: usize,
    out: &mut [f32],
    d: usize,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: avx512f detected; the shapes are checked by the caller.
        Isa::Avx512 => unsafe {
            super::x86::weighted_sum_avx512(ps, stride, keys, v, v_stride, out, d)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: avx2 and fma detected; the shapes are checked by the caller.
        Isa::Avx2Fma => unsafe {
            super::x86::weighted_sum_avx2(ps, stride, keys, v, v_stride, out, d)
        },
        _ => weighted_sum_scalar(ps, stride, keys, v, v_stride, out, d),
    }
}

/// The reference: per query and dimension, one running sum over the keys in order.
pub fn weighted_sum_scalar(
    ps: &[f32],
    stride: usize,
    keys: usize,
    v: &[f32],
    v_stride: usize,
    out: &mut [f32],
    d: usize,
) {
    for (q, o) in out.chunks_exact_mut(d).enumerate() {
        o.fill(0.0);
        for i in 0..keys {
            let p = ps[q * stride + i];
            for (oj, vj) in o.iter_mut().zip(&v[i * v_stride..i * v_stride + d]) {
                *oj = p.mul_add(*vj, *oj);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::values;

    /// Every kernel tier this CPU runs.
    fn tiers() -> Vec<Isa> {
        let mut t = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                t.push(Isa::Avx2Fma);
            }
            if isa() == Isa::Avx512 {
                t.push(Isa::Avx512);
            }
        }
        t
    }

    #[test]
    fn scores_match_the_scalar_reference_bit_for_bit() {
        for d in [1, 2, 7, 16, 33, 64, 96, 128, 256] {
            let kt = values(d * KEYS, d as u32);
            for m in [1, 2, 3, 4, 5, 9, 12] {
                let qs = values(m * d, (m * 31 + d) as u32);
                let stride = KEYS + 5;
                let mut want = vec![7f32; m * stride];
                scores_block_scalar(&qs, d, &kt, &mut want, stride);
                for isa in tiers() {
                    let mut got = vec![7f32; m * stride];
                    scores_block_with(isa, &qs, d, &kt, &mut got, stride);
                    assert_eq!(want, got, "{isa:?} d {d} m {m}");
                }
                let mut got = want.clone();
                scores_block(&qs, d, &kt, &mut got, stride);
                // One query alone gets the bits it gets among others.
                let mut alone = vec![0f32; KEYS];
                scores_block(&qs[(m - 1) * d..], d, &kt, &mut alone, KEYS);
                assert_eq!(&alone[..], &got[(m - 1) * stride..(m - 1) * stride + KEYS]);
            }
        }
    }

    #[test]
    fn weighted_sums_match_the_scalar_reference_bit_for_bit() {
        for d in [1, 5, 16, 17, 64, 96, 128, 200, 256] {
            for keys in [0, 1, 3, 16, 37] {
                let v_stride = d + 3;
                let v = values(keys.max(1) * v_stride, (d + keys) as u32);
                for m in [1, 2, 3, 4, 6, 12] {
                    let stride = keys + 2;
                    let ps = values(m * stride, (m * 7 + keys) as u32);
                    let mut want = vec![9f32; m * d];
                    weighted_sum_scalar(&ps, stride, keys, &v, v_stride, &mut want, d);
                    for isa in tiers() {
                        let mut got = vec![-9f32; m * d];
                        weighted_sum_with(isa, &ps, stride, keys, &v, v_stride, &mut got, d);
                        assert_eq!(want, got, "{isa:?} d {d} keys {keys} m {m}");
                    }
                }
            }
        }
    }
}
