//! x86-64 SIMD kernels (AVX-512, AVX-512 VNNI, AVX2/FMA/F16C). Every function here is `unsafe`
//! only because it needs CPU features the caller has detected; each is tested against the
//! scalar reference in `super::tests`.

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
            *a_k = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(o)), _mm512_loadu_ps(pb.add(o)), *a_k);
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
        // The next four rows (see `dot4_16_avx512`).
        for k in 4..8 {
            _mm_prefetch::<_MM_HINT_T0>(pw.wrapping_add(k * n + i) as *const i8);
        }
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
            *a_k = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *a_k);
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

/// Sum of the 8 lanes of a 256-bit vector.
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum256(s: __m256) -> f32 {
    let hi = _mm256_extractf128_ps(s, 1);
    let lo = _mm256_castps256_ps128(s);
    let s4 = _mm_add_ps(hi, lo);
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    _mm_cvtss_f32(s1)
}

/// 16 half-precision values at `p` widened to f32: bf16 (`BF16`) by a shift into the high half
/// (exact), IEEE f16 by `vcvtph2ps` (exact).
///
/// # Safety
/// avx512f; `p` must point at 16 readable `u16`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn load16_avx512<const BF16: bool>(p: *const u16) -> __m512 {
    let raw = _mm256_loadu_si256(p as *const __m256i);
    if BF16 {
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
    } else {
        _mm512_cvtph_ps(raw)
    }
}

/// Four dot products of consecutive 16-bit rows of `w` (`4 * x.len()` values) with f32 `x`.
///
/// # Safety
/// The CPU must support avx512f; `w.len()` must be `4 * x.len()`.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot4_16_avx512<const BF16: bool>(w: &[u16], x: &[f32]) -> [f32; 4] {
    let n = x.len();
    debug_assert_eq!(w.len(), 4 * n);
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all loads below): row k reads indices k*n + i .. k*n + i + 16 <= (k+1)*n.
    while i + 16 <= n {
        let xv = _mm512_loadu_ps(px.add(i));
        for (k, a) in acc.iter_mut().enumerate() {
            // The next four rows, while these are summed: more lines in flight than the
            // prefetcher starts for short rows. (A prefetch never faults; the address is
            // only computed, with wrapping arithmetic, never dereferenced.)
            _mm_prefetch::<_MM_HINT_T0>(pw.wrapping_add(4 * n + k * n + i) as *const i8);
            *a = _mm512_fmadd_ps(load16_avx512::<BF16>(pw.add(k * n + i)), xv, *a);
        }
        i += 16;
    }
    let mut out = [
        _mm512_reduce_add_ps(acc[0]),
        _mm512_reduce_add_ps(acc[1]),
        _mm512_reduce_add_ps(acc[2]),
        _mm512_reduce_add_ps(acc[3]),
    ];
    for (k, o) in out.iter_mut().enumerate() {
        for j in i..n {
            *o += super::widen::<BF16>(*pw.add(k * n + j)) * *px.add(j);
        }
    }
    out
}

/// One 16-bit row · f32 `x`.
///
/// # Safety
/// The CPU must support avx512f; `w.len() == x.len()`.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_16_avx512<const BF16: bool>(w: &[u16], x: &[f32]) -> f32 {
    let n = x.len();
    debug_assert_eq!(w.len(), n);
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    // SAFETY (all loads below): indices stay below n.
    while i + 32 <= n {
        a0 = _mm512_fmadd_ps(
            load16_avx512::<BF16>(pw.add(i)),
            _mm512_loadu_ps(px.add(i)),
            a0,
        );
        a1 = _mm512_fmadd_ps(
            load16_avx512::<BF16>(pw.add(i + 16)),
            _mm512_loadu_ps(px.add(i + 16)),
            a1,
        );
        i += 32;
    }
    if i + 16 <= n {
        a0 = _mm512_fmadd_ps(
            load16_avx512::<BF16>(pw.add(i)),
            _mm512_loadu_ps(px.add(i)),
            a0,
        );
        i += 16;
    }
    let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    for j in i..n {
        sum += super::widen::<BF16>(*pw.add(j)) * *px.add(j);
    }
    sum
}

/// One 16-bit row · f32 `x` with AVX2 (bf16 by shift, f16 by F16C).
///
/// # Safety
/// The CPU must support avx2, fma and f16c; `w.len() == x.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_16_avx2<const BF16: bool>(w: &[u16], x: &[f32]) -> f32 {
    let n = x.len();
    debug_assert_eq!(w.len(), n);
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let load = |p: *const u16| -> __m256 {
        // SAFETY: the callers below pass pointers with 8 readable values.
        let raw = unsafe { _mm_loadu_si128(p as *const __m128i) };
        if BF16 {
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
        } else {
            _mm256_cvtph_ps(raw)
        }
    };
    let mut i = 0;
    // SAFETY (all loads below): indices stay below n.
    while i + 16 <= n {
        a0 = _mm256_fmadd_ps(load(pw.add(i)), _mm256_loadu_ps(px.add(i)), a0);
        a1 = _mm256_fmadd_ps(load(pw.add(i + 8)), _mm256_loadu_ps(px.add(i + 8)), a1);
        i += 16;
    }
    if i + 8 <= n {
        a0 = _mm256_fmadd_ps(load(pw.add(i)), _mm256_loadu_ps(px.add(i)), a0);
        i += 8;
    }
    let mut sum = hsum256(_mm256_add_ps(a0, a1));
    for j in i..n {
        sum += super::widen::<BF16>(*pw.add(j)) * *px.add(j);
    }
    sum
}

/// One quantized row (see `super::formats`) · quantized activations, with AVX-512 VNNI:
/// `vpdpbusd` multiplies 64 unsigned codes (two blocks) by 64 signed activations per
/// instruction; each block's integer sum is scaled by its `s·dx` (permuted out of a vector of
/// 16 block scales) and the offsets are subtracted as one f32 dot product per 16 blocks.
///
/// # Safety
/// The CPU must support avx512f, avx512bw, avx512vl and avx512vnni. `scales`, `mins`, `xd`,
/// `xc` have the same even length `blocks`; `xq` has `32 * blocks` values; `codes` has
/// `32 * blocks` (Q8) or `16 * blocks` (Q4) bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn dot_q_vnni<const Q4: bool>(
    codes: &[u8],
    scales: &[u16],
    mins: &[u16],
    xq: &[i8],
    xd: &[f32],
    xc: &[f32],
) -> f32 {
    let blocks = scales.len();
    debug_assert!(blocks.is_multiple_of(2));
    debug_assert_eq!(xq.len(), 32 * blocks);
    debug_assert_eq!(codes.len(), if Q4 { 16 } else { 32 } * blocks);
    let (pc, pq) = (codes.as_ptr(), xq.as_ptr());
    let mut acc = _mm512_setzero_ps();
    let mut corr = _mm512_setzero_ps();
    // Lanes 0..8 take block 2p's scale, lanes 8..16 block 2p + 1's.
    let first = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let two = _mm512_set1_epi32(2);
    let nibble = _mm256_set1_epi8(0x0F);
    let mut g = 0;
    // SAFETY (all loads below): group loads are masked to the `n` blocks that remain; code and
    // activation loads read blocks b, b + 1 < blocks.
    while g < blocks {
        let n = (blocks - g).min(16);
        let mask = ((1u32 << n) - 1) as __mmask16;
        let dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
            mask,
            scales.as_ptr().add(g) as *const i16,
        ));
        let mw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
            mask,
            mins.as_ptr().add(g) as *const i16,
        ));
        let dx = _mm512_maskz_loadu_ps(mask, xd.as_ptr().add(g));
        let cx = _mm512_maskz_loadu_ps(mask, xc.as_ptr().add(g));
        corr = _mm512_fmadd_ps(mw, cx, corr);
        let s = _mm512_mul_ps(dw, dx);
        let mut idx = first;
        let mut p = 0;
        while p < n {
            let b = g + p;
            let wv = if Q4 {
                let v = _mm256_loadu_si256(pc.add(b * 16) as *const __m256i);
                let lo = _mm256_and_si256(v, nibble);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
                _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
            } else {
                _mm512_loadu_si512(pc.add(b * 32) as *const __m512i)
            };
            let xv = _mm512_loadu_si512(pq.add(b * 32) as *const __m512i);
            let dp = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), _mm512_permutexvar_ps(idx, s), acc);
            idx = _mm512_add_epi32(idx, two);
            p += 2;
        }
        g += 16;
    }
    _mm512_reduce_add_ps(acc) - _mm512_reduce_add_ps(corr)
}

/// The same product with AVX2: codes and activations widened to 16 bits and multiplied pairwise
/// (`vpmaddwd`, exact for 8-bit codes), one block at a time.
///
/// # Safety
/// The CPU must support avx2, fma and f16c; lengths as for [`dot_q_vnni`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q_avx2<const Q4: bool>(
    codes: &[u8],
    scales: &[u16],
    mins: &[u16],
    xq: &[i8],
    xd: &[f32],
    xc: &[f32],
) -> f32 {
    let blocks = scales.len();
    debug_assert!(blocks.is_multiple_of(2));
    let (pc, pq) = (codes.as_ptr(), xq.as_ptr());
    let nibble = _mm256_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    let mut corr = 0f32;
    let block_dot = |u: __m256i, x: __m256i| -> __m256i {
        let u0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(u));
        let u1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(u, 1));
        let x0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(x));
        let x1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(x, 1));
        _mm256_add_epi32(_mm256_madd_epi16(u0, x0), _mm256_madd_epi16(u1, x1))
    };
    let mut g = 0;
    // SAFETY (all loads below): blocks b, b + 1 < blocks; scale groups are copied into a
    // zero-padded stack buffer first.
    while g < blocks {
        let n = (blocks - g).min(8);
        let (mut sbits, mut mbits) = ([0u16; 8], [0u16; 8]);
        sbits[..n].copy_from_slice(&scales[g..g + n]);
        mbits[..n].copy_from_slice(&mins[g..g + n]);
        let (mut s, mut m) = ([0f32; 8], [0f32; 8]);
        _mm256_storeu_ps(
            s.as_mut_ptr(),
            _mm256_cvtph_ps(_mm_loadu_si128(sbits.as_ptr() as *const __m128i)),
        );
        _mm256_storeu_ps(
            m.as_mut_ptr(),
            _mm256_cvtph_ps(_mm_loadu_si128(mbits.as_ptr() as *const __m128i)),
        );
        let mut p = 0;
        while p < n {
            let b = g + p;
            let (u0, u1) = if Q4 {
                let v = _mm256_loadu_si256(pc.add(b * 16) as *const __m256i);
                (
                    _mm256_and_si256(v, nibble),
                    _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble),
                )
            } else {
                (
                    _mm256_loadu_si256(pc.add(b * 32) as *const __m256i),
                    _mm256_loadu_si256(pc.add(b * 32 + 32) as *const __m256i),
                )
            };
            let x0 = _mm256_loadu_si256(pq.add(b * 32) as *const __m256i);
            let x1 = _mm256_loadu_si256(pq.add(b * 32 + 32) as *const __m256i);
            let d0 = _mm256_set1_ps(s[p] * xd[b]);
            let d1 = _mm256_set1_ps(s[p + 1] * xd[b + 1]);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(u0, x0)), d0, acc);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(u1, x1)), d1, acc);
            corr += m[p] * xc[b] + m[p + 1] * xc[b + 1];
            p += 2;
        }
        g += 8;
    }
    hsum256(acc) - corr
}

/// [`dot_q_vnni`] for four consecutive rows at once: each activation load and each block of
/// scale setup serves four rows, and four weight streams are in flight.
///
/// # Safety
/// As [`dot_q_vnni`], with `codes`, `scales` and `mins` holding four rows each.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot4_q_vnni<const Q4: bool>(
    codes: &[u8],
    scales: &[u16],
    mins: &[u16],
    xq: &[i8],
    xd: &[f32],
    xc: &[f32],
) -> [f32; 4] {
    let blocks = xd.len();
    let row_bytes = blocks * if Q4 { 16 } else { 32 };
    debug_assert!(blocks.is_multiple_of(2));
    debug_assert_eq!(codes.len(), 4 * row_bytes);
    debug_assert_eq!(scales.len(), 4 * blocks);
    debug_assert_eq!(mins.len(), 4 * blocks);
    debug_assert_eq!(xq.len(), 32 * blocks);
    let (pc, pq) = (codes.as_ptr(), xq.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut corr = [_mm512_setzero_ps(); 4];
    let first = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let two = _mm512_set1_epi32(2);
    let nibble = _mm256_set1_epi8(0x0F);
    let mut g = 0;
    // SAFETY (all loads below): group loads are masked to the blocks that remain in each row;
    // code loads of row k stay within k*row_bytes .. (k+1)*row_bytes; activation loads read
    // blocks b, b + 1 < blocks.
    while g < blocks {
        let n = (blocks - g).min(16);
        let mask = ((1u32 << n) - 1) as __mmask16;
        let dx = _mm512_maskz_loadu_ps(mask, xd.as_ptr().add(g));
        let cx = _mm512_maskz_loadu_ps(mask, xc.as_ptr().add(g));
        let mut s = [_mm512_setzero_ps(); 4];
        for k in 0..4 {
            let dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                mask,
                scales.as_ptr().add(k * blocks + g) as *const i16,
            ));
            let mw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                mask,
                mins.as_ptr().add(k * blocks + g) as *const i16,
            ));
            corr[k] = _mm512_fmadd_ps(mw, cx, corr[k]);
            s[k] = _mm512_mul_ps(dw, dx);
        }
        let mut idx = first;
        let mut p = 0;
        while p < n {
            let b = g + p;
            let xv = _mm512_loadu_si512(pq.add(b * 32) as *const __m512i);
            for k in 0..4 {
                // The next four rows (see `dot4_16_avx512`).
                _mm_prefetch::<_MM_HINT_T0>(
                    pc.wrapping_add((k + 4) * row_bytes + b * if Q4 { 16 } else { 32 })
                        as *const i8,
                );
                let wv = if Q4 {
                    let v = _mm256_loadu_si256(pc.add(k * row_bytes + b * 16) as *const __m256i);
                    let lo = _mm256_and_si256(v, nibble);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
                    _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
                } else {
                    _mm512_loadu_si512(pc.add(k * row_bytes + b * 32) as *const __m512i)
                };
                let dp = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
                acc[k] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(dp),
                    _mm512_permutexvar_ps(idx, s[k]),
                    acc[k],
                );
            }
            idx = _mm512_add_epi32(idx, two);
            p += 2;
        }
        g += 16;
    }
    let mut out = [0f32; 4];
    for k in 0..4 {
        out[k] = _mm512_reduce_add_ps(acc[k]) - _mm512_reduce_add_ps(corr[k]);
    }
    out
}

/// A 4 × 4 tile of a matrix product: four weight rows (`w`, `4 * n` values) times four
/// activation rows (`x`, `4 * n` values): `out[t][k] = w_k · x_t`. Each weight and activation
/// vector loaded serves four products (a dot product per row loads two vectors per product).
/// Every product is summed in the same order as [`dot4_avx512`], so prompts and decode steps
/// give the same bits.
///
/// # Safety
/// The CPU must support avx512f; `w.len() == x.len()`, a multiple of 4.
#[target_feature(enable = "avx512f")]
pub unsafe fn tile4_f32_avx512(w: &[f32], x: &[f32]) -> [[f32; 4]; 4] {
    let n = w.len() / 4;
    debug_assert_eq!(x.len(), 4 * n);
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let mut i = 0;
    // SAFETY (all loads below): row k of either operand reads k*n + i .. k*n + i + 16 <= (k+1)*n;
    // the masked tail touches only lanes below n.
    while i + 16 <= n {
        let wv = [
            _mm512_loadu_ps(pw.add(i)),
            _mm512_loadu_ps(pw.add(n + i)),
            _mm512_loadu_ps(pw.add(2 * n + i)),
            _mm512_loadu_ps(pw.add(3 * n + i)),
        ];
        for (t, row) in acc.iter_mut().enumerate() {
            let xv = _mm512_loadu_ps(px.add(t * n + i));
            for k in 0..4 {
                row[k] = _mm512_fmadd_ps(wv[k], xv, row[k]);
            }
        }
        i += 16;
    }
    if i < n {
        let m: __mmask16 = (1u32 << (n - i)).wrapping_sub(1) as __mmask16;
        let wv = [
            _mm512_maskz_loadu_ps(m, pw.add(i)),
            _mm512_maskz_loadu_ps(m, pw.add(n + i)),
            _mm512_maskz_loadu_ps(m, pw.add(2 * n + i)),
            _mm512_maskz_loadu_ps(m, pw.add(3 * n + i)),
        ];
        for (t, row) in acc.iter_mut().enumerate() {
            let xv = _mm512_maskz_loadu_ps(m, px.add(t * n + i));
            for k in 0..4 {
                row[k] = _mm512_fmadd_ps(wv[k], xv, row[k]);
            }
        }
    }
    let mut out = [[0f32; 4]; 4];
    for t in 0..4 {
        for k in 0..4 {
            out[t][k] = _mm512_reduce_add_ps(acc[t][k]);
        }
    }
    out
}

/// [`tile4_f32_avx512`] for 16-bit weights (widened once per tile, not once per product), in
/// the order of [`dot4_16_avx512`].
///
/// # Safety
/// The CPU must support avx512f; `w.len() == x.len()`, a multiple of 4.
#[target_feature(enable = "avx512f")]
pub unsafe fn tile4_16_avx512<const BF16: bool>(w: &[u16], x: &[f32]) -> [[f32; 4]; 4] {
    let n = w.len() / 4;
    debug_assert_eq!(x.len(), 4 * n);
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let mut i = 0;
    // SAFETY (all loads below): row k of either operand reads k*n + i .. k*n + i + 16 <= (k+1)*n.
    while i + 16 <= n {
        let wv = [
            load16_avx512::<BF16>(pw.add(i)),
            load16_avx512::<BF16>(pw.add(n + i)),
            load16_avx512::<BF16>(pw.add(2 * n + i)),
            load16_avx512::<BF16>(pw.add(3 * n + i)),
        ];
        for (t, row) in acc.iter_mut().enumerate() {
            let xv = _mm512_loadu_ps(px.add(t * n + i));
            for k in 0..4 {
                row[k] = _mm512_fmadd_ps(wv[k], xv, row[k]);
            }
        }
        i += 16;
    }
    let mut out = [[0f32; 4]; 4];
    for t in 0..4 {
        for k in 0..4 {
            let mut o = _mm512_reduce_add_ps(acc[t][k]);
            for j in i..n {
                o += super::widen::<BF16>(*pw.add(k * n + j)) * *px.add(t * n + j);
            }
            out[t][k] = o;
        }
    }
    out
}

/// `out[p] = q · rows[p * stride ..][..q.len()]`: attention scores of one query against a run
/// of cached keys, four keys per step (one reduction each, no call per key).
///
/// # Safety
/// The CPU must support avx512f; `rows` must hold `(out.len() - 1) * stride + q.len()` values.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_strided_avx512(q: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
    let d = q.len();
    debug_assert!(out.is_empty() || rows.len() >= (out.len() - 1) * stride + d);
    let (pq, pr) = (q.as_ptr(), rows.as_ptr());
    let full = d / 16 * 16;
    let m: __mmask16 = ((1u32 << (d - full)) - 1) as __mmask16;
    // SAFETY (all loads below): row p reads p*stride .. p*stride + d <= rows.len(); the masked
    // loads touch only lanes below d.
    for (p, o) in out.iter_mut().enumerate() {
        let base = pr.add(p * stride);
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < full {
            acc = _mm512_fmadd_ps(
                _mm512_loadu_ps(pq.add(i)),
                _mm512_loadu_ps(base.add(i)),
                acc,
            );
            i += 16;
        }
        if full < d {
            acc = _mm512_fmadd_ps(
                _mm512_maskz_loadu_ps(m, pq.add(full)),
                _mm512_maskz_loadu_ps(m, base.add(full)),
                acc,
            );
        }
        *o = _mm512_reduce_add_ps(acc);
    }
}

/// `y += a · x`.
///
/// # Safety
/// The CPU must support avx512f; `x.len() == y.len()`.
#[target_feature(enable = "avx512f")]
pub unsafe fn axpy_avx512(a: f32, x: &[f32], y: &mut [f32]) {
    let n = y.len();
    debug_assert_eq!(x.len(), n);
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    let av = _mm512_set1_ps(a);
    let mut i = 0;
    // SAFETY (all accesses below): indices stay below n, the length of both slices.
    while i + 16 <= n {
        _mm512_storeu_ps(
            py.add(i),
            _mm512_fmadd_ps(av, _mm512_loadu_ps(px.add(i)), _mm512_loadu_ps(py.add(i))),
        );
        i += 16;
    }
    while i < n {
        *py.add(i) = a.mul_add(*px.add(i), *py.add(i));
        i += 1;
    }
}

/// One block of at most 32 activations quantized to signed bytes by llama.cpp's Q8_0 rule (the
/// rule and rounding of [`super::formats::QActs::quantize_block_scalar`], bit for bit):
/// returns the scale and the sum of the codes; `q` gets the 32 codes (zero past `x`).
///
/// # Safety
/// The CPU must support avx512f; `x.len() <= 32`.
#[target_feature(enable = "avx512f")]
pub unsafe fn quantize_block_avx512(x: &[f32], q: &mut [i8; 32]) -> (f32, i32) {
    let n = x.len();
    debug_assert!(n <= 32);
    let m0 = ((1u32 << n.min(16)) - 1) as __mmask16;
    let m1 = ((1u32 << n.saturating_sub(16)) - 1) as __mmask16;
    // SAFETY: the masks enable only lanes below n = x.len().
    let v0 = _mm512_maskz_loadu_ps(m0, x.as_ptr());
    let v1 = _mm512_maskz_loadu_ps(m1, x.as_ptr().wrapping_add(16));
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    let sign = _mm512_set1_epi32(i32::MIN);
    let half = _mm512_set1_ps(0.5);
    let round = |v: __m512| {
        let s = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, _mm512_set1_ps(id)), lo), hi);
        // Half away from zero: s + copysign(0.5, s), truncated.
        let h = _mm512_or_ps(
            _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(s), sign)),
            half,
        );
        _mm512_cvttps_epi32(_mm512_add_ps(s, h))
    };
    let (q0, q1) = (round(v0), round(v1));
    let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    // SAFETY: each store writes 16 bytes inside the 32-byte array.
    _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(
        q.as_mut_ptr().add(16) as *mut __m128i,
        _mm512_cvtepi32_epi8(q1),
    );
    (d, sum)
}

/// [`super::attention::scores_block`]: four queries at a time, each with two running sums
/// (even and odd dimensions) so eight independent FMA chains hide the latency; each key row
/// loaded serves every query of the group.
///
/// # Safety
/// The CPU must support avx512f; shapes as checked by the safe wrapper.
#[target_feature(enable = "avx512f")]
pub unsafe fn scores_block_avx512(
    qs: &[f32],
    d: usize,
    kt: &[f32],
    out: &mut [f32],
    stride: usize,
) {
    let m = qs.len() / d;
    let mut q = 0;
    while q < m {
        let (pq, po) = (qs.as_ptr().add(q * d), out.as_mut_ptr().add(q * stride));
        match m - q {
            1 => scores_tile::<1>(pq, d, kt.as_ptr(), po, stride),
            2 => scores_tile::<2>(pq, d, kt.as_ptr(), po, stride),
            3 => scores_tile::<3>(pq, d, kt.as_ptr(), po, stride),
            _ => scores_tile::<4>(pq, d, kt.as_ptr(), po, stride),
        }
        q += 4;
    }
}

/// # Safety
/// `qs` holds `M` rows of `d`, `kt` `d` rows of 16, `out` `M` rows at `stride` of at least 16.
// Register arrays are indexed by query: the index is the clearer name.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f")]
unsafe fn scores_tile<const M: usize>(
    qs: *const f32,
    d: usize,
    kt: *const f32,
    out: *mut f32,
    stride: usize,
) {
    let mut even = [_mm512_setzero_ps(); M];
    let mut odd = [_mm512_setzero_ps(); M];
    let mut j = 0;
    // SAFETY (all accesses below): j + 1 < d for the key rows and query elements read; the
    // stores write 16 values at q * stride, inside `out` by the caller's contract.
    while j + 2 <= d {
        let k0 = _mm512_loadu_ps(kt.add(j * 16));
        let k1 = _mm512_loadu_ps(kt.add((j + 1) * 16));
        for q in 0..M {
            even[q] = _mm512_fmadd_ps(_mm512_set1_ps(*qs.add(q * d + j)), k0, even[q]);
            odd[q] = _mm512_fmadd_ps(_mm512_set1_ps(*qs.add(q * d + j + 1)), k1, odd[q]);
        }
        j += 2;
    }
    if j < d {
        let k0 = _mm512_loadu_ps(kt.add(j * 16));
        for q in 0..M {
            even[q] = _mm512_fmadd_ps(_mm512_set1_ps(*qs.add(q * d + j)), k0, even[q]);
        }
    }
    for q in 0..M {
        _mm512_storeu_ps(out.add(q * stride), _mm512_add_ps(even[q], odd[q]));
    }
}

/// [`super::attention::weighted_sum`]: 64 dimensions of four queries at a time in sixteen
/// registers; each value row loaded serves the four queries, the sums never leave registers.
///
/// # Safety
/// The CPU must support avx512f; shapes as checked by the safe wrapper.
#[target_feature(enable = "avx512f")]
pub unsafe fn weighted_sum_avx512(
    ps: &[f32],
    stride: usize,
    keys: usize,
    v: &[f32],
    v_stride: usize,
    out: &mut [f32],
    d: usize,
) {
    let m = out.len() / d;
    let mut c = 0;
    while c < d {
        let w = (d - c).min(64);
        let mut q = 0;
        while q < m {
            let (pp, po) = (ps.as_ptr().add(q * stride), out.as_mut_ptr().add(q * d + c));
            let pv = v.as_ptr().add(c);
            match m - q {
                1 => weighted_tile::<1>(pp, stride, keys, pv, v_stride, po, d, w),
                2 => weighted_tile::<2>(pp, stride, keys, pv, v_stride, po, d, w),
                3 => weighted_tile::<3>(pp, stride, keys, pv, v_stride, po, d, w),
                _ => weighted_tile::<4>(pp, stride, keys, pv, v_stride, po, d, w),
            }
            q += 4;
        }
        c += 64;
    }
}

/// # Safety
/// `ps` holds `M` rows at `stride` of `keys` weights; `v` `keys` rows at `v_stride` of at
/// least `w` values; `out` `M` rows at `d` of at least `w` values; `w <= 64`.
// Register arrays are indexed by query: the index is the clearer name.
#[allow(clippy::needless_range_loop)]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_tile<const M: usize>(
    ps: *const f32,
    stride: usize,
    keys: usize,
    v: *const f32,
    v_stride: usize,
    out: *mut f32,
    d: usize,
    w: usize,
) {
    let mask = |k: usize| -> __mmask16 {
        let lanes = w.saturating_sub(k * 16).min(16);
        ((1u32 << lanes) - 1) as __mmask16
    };
    let masks = [mask(0), mask(1), mask(2), mask(3)];
    let vectors = w.div_ceil(16);
    let mut acc = [[_mm512_setzero_ps(); 4]; M];
    // SAFETY (all accesses below): masked loads and stores touch only the first w values of
    // each value and output row; weights are read at q * stride + i with i < keys.
    for i in 0..keys {
        let row = v.add(i * v_stride);
        let vs = [
            _mm512_maskz_loadu_ps(masks[0], row),
            _mm512_maskz_loadu_ps(masks[1], row.wrapping_add(16)),
            _mm512_maskz_loadu_ps(masks[2], row.wrapping_add(32)),
            _mm512_maskz_loadu_ps(masks[3], row.wrapping_add(48)),
        ];
        for q in 0..M {
            let p = _mm512_set1_ps(*ps.add(q * stride + i));
            for k in 0..vectors {
                acc[q][k] = _mm512_fmadd_ps(p, vs[k], acc[q][k]);
            }
        }
    }
    for q in 0..M {
        for k in 0..vectors {
            _mm512_mask_storeu_ps(out.add(q * d + k * 16), masks[k], acc[q][k]);
        }
    }
}
