//! x86-64 SIMD kernels (AVX-512, AVX-512 VNNI, AVX2/FMA/F16C). Every function here is `unsafe`
//! only because it needs CPU features the caller has detected; each is tested against the
//! scalar reference in `super::tests`.

use std::arch::x86_64::*;

use super::formats::QActs;

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

/// One panel of sixteen quantized rows (see `super::formats`) times the 8-bit activations of
/// `T` tokens, with AVX-512 VNNI: per block, eight `vpdpbusd` (64 codes of the panel each,
/// four activation bytes broadcast) sum every row's 32 products in its own integer lane; one
/// conversion, one multiply by the rows' scales times the token's, and one offset correction
/// per block. Every code vector loaded serves the `T` tokens; each token's sums run in the
/// same order whatever `T` is, so a prompt gives the bits of decode steps.
///
/// `KIND`: 0 Q8_0, 1 Q4_0, 2 Q4_K (the only one with stored offsets).
///
/// # Safety
/// The CPU must support avx512f, avx512bw, avx512vl and avx512vnni. `scales` holds `16 * blocks`
/// values and `mins` as many for Q4_K (none otherwise), `codes` `512 * blocks` (Q8) or
/// `256 * blocks` (Q4) bytes; each activation set has `blocks` scales and sums and `32 * blocks`
/// codes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
// Register arrays are indexed by token: the index is the clearer name.
#[allow(clippy::needless_range_loop)]
pub unsafe fn panel_q_vnni<const KIND: u8, const T: usize>(
    codes: &[u8],
    scales: &[u16],
    mins: &[u16],
    acts: [&QActs; T],
) -> [[f32; 16]; T] {
    let q4 = KIND != 0;
    let blocks = scales.len() / 16;
    debug_assert_eq!(codes.len(), blocks * if q4 { 256 } else { 512 });
    debug_assert_eq!(mins.len(), if KIND == 2 { 16 * blocks } else { 0 });
    debug_assert!(acts
        .iter()
        .all(|a| a.d.len() == blocks && a.q.len() == 32 * blocks));
    let pc = codes.as_ptr();
    let nibble = _mm512_set1_epi8(0x0F);
    // Four activation bytes as one broadcast lane.
    let four = |t: usize, at: usize| -> __m512i {
        _mm512_set1_epi32(std::ptr::read_unaligned(
            acts[t].q.as_ptr().add(at) as *const i32
        ))
    };
    let mut acc = [[_mm512_setzero_ps(); 2]; T];
    // SAFETY (all accesses below): block b < blocks reads codes b*256.. or b*512.. plus 64 per
    // step within the block, 16 scales and offsets at b*16, activation codes b*32 + 0..32 and
    // the activation scale and sum of block b: inside the lengths above.
    for b in 0..blocks {
        let ws = _mm512_cvtph_ps(_mm256_loadu_si256(
            scales.as_ptr().add(b * 16) as *const __m256i
        ));
        // Q8_0 and Q4_0 offsets are 128 and 8 times the scale (exact in f32).
        let ms = match KIND {
            0 => _mm512_mul_ps(ws, _mm512_set1_ps(128.0)),
            1 => _mm512_mul_ps(ws, _mm512_set1_ps(8.0)),
            _ => _mm512_cvtph_ps(_mm256_loadu_si256(
                mins.as_ptr().add(b * 16) as *const __m256i
            )),
        };
        let mut sums = [[_mm512_setzero_si512(); 2]; T];
        if q4 {
            let base = pc.add(b * 256);
            for h in 0..4 {
                let v = _mm512_loadu_si512(base.add(h * 64) as *const __m512i);
                let lo = _mm512_and_si512(v, nibble);
                let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
                for t in 0..T {
                    let x = b * 32 + 4 * h;
                    sums[t][0] = _mm512_dpbusd_epi32(sums[t][0], lo, four(t, x));
                    sums[t][1] = _mm512_dpbusd_epi32(sums[t][1], hi, four(t, x + 16));
                }
            }
        } else {
            let base = pc.add(b * 512);
            for g in 0..8 {
                let v = _mm512_loadu_si512(base.add(g * 64) as *const __m512i);
                for t in 0..T {
                    sums[t][g % 2] =
                        _mm512_dpbusd_epi32(sums[t][g % 2], v, four(t, b * 32 + 4 * g));
                }
            }
        }
        let k = b % 2;
        for t in 0..T {
            let dp = _mm512_cvtepi32_ps(_mm512_add_epi32(sums[t][0], sums[t][1]));
            let dx = _mm512_set1_ps(*acts[t].d.get_unchecked(b));
            let cx = _mm512_set1_ps(*acts[t].c.get_unchecked(b));
            acc[t][k] = _mm512_fmadd_ps(dp, _mm512_mul_ps(ws, dx), acc[t][k]);
            acc[t][k] = _mm512_fnmadd_ps(ms, cx, acc[t][k]);
        }
    }
    let mut out = [[0f32; 16]; T];
    for t in 0..T {
        _mm512_storeu_ps(out[t].as_mut_ptr(), _mm512_add_ps(acc[t][0], acc[t][1]));
    }
    out
}

/// [`panel_q_vnni`] with AVX2 (no 8-bit dot-product instruction): codes made signed by their
/// fixed offset (`KIND` 0: Q8_0, 128; 1: Q4_0, 8; 2: Q4_K, none — its per-block offsets are
/// subtracted as in the VNNI kernel), multiplied with `vpmaddubsw` by the sign trick (|code| ×
/// activation with the code's sign: pair sums stay within 16 bits), eight rows per register.
///
/// # Safety
/// The CPU must support avx2, fma and f16c; lengths as for [`panel_q_vnni`].
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)]
pub unsafe fn panel_q_avx2<const KIND: u8, const T: usize>(
    codes: &[u8],
    scales: &[u16],
    mins: &[u16],
    acts: [&QActs; T],
) -> [[f32; 16]; T] {
    let q4 = KIND != 0;
    let blocks = scales.len() / 16;
    debug_assert_eq!(codes.len(), blocks * if q4 { 256 } else { 512 });
    let pc = codes.as_ptr();
    let nibble = _mm256_set1_epi8(0x0F);
    let offset = _mm256_set1_epi8(match KIND {
        0 => i8::MIN,
        1 => 8,
        _ => 0,
    });
    let ones = _mm256_set1_epi16(1);
    let four = |t: usize, at: usize| -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned(
            acts[t].q.as_ptr().add(at) as *const i32
        ))
    };
    // Signed codes · activations, summed per row (eight rows, four codes each).
    let dot = |c: __m256i, x: __m256i| -> __m256i {
        let q = if KIND == 2 {
            c
        } else {
            _mm256_sub_epi8(c, offset)
        };
        _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q)),
            ones,
        )
    };
    let mut acc = [[_mm256_setzero_ps(); 2]; T];
    // SAFETY (all accesses below): as in `panel_q_vnni`, in 32-byte halves.
    for b in 0..blocks {
        let mut sums = [[_mm256_setzero_si256(); 2]; T];
        for h in 0..2 {
            // Rows 8h .. 8h + 8: bytes 32h .. 32h + 32 of every 64-byte group.
            if q4 {
                for g in 0..4 {
                    let v = _mm256_loadu_si256(pc.add(b * 256 + g * 64 + h * 32) as *const __m256i);
                    let lo = _mm256_and_si256(v, nibble);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
                    for t in 0..T {
                        let x = b * 32 + 4 * g;
                        sums[t][h] = _mm256_add_epi32(sums[t][h], dot(lo, four(t, x)));
                        sums[t][h] = _mm256_add_epi32(sums[t][h], dot(hi, four(t, x + 16)));
                    }
                }
            } else {
                for g in 0..8 {
                    let v = _mm256_loadu_si256(pc.add(b * 512 + g * 64 + h * 32) as *const __m256i);
                    for t in 0..T {
                        sums[t][h] = _mm256_add_epi32(sums[t][h], dot(v, four(t, b * 32 + 4 * g)));
                    }
                }
            }
        }
        for h in 0..2 {
            let at = b * 16 + h * 8;
            let ws = _mm256_cvtph_ps(_mm_loadu_si128(scales.as_ptr().add(at) as *const __m128i));
            for t in 0..T {
                let dx = _mm256_set1_ps(*acts[t].d.get_unchecked(b));
                let dp = _mm256_cvtepi32_ps(sums[t][h]);
                acc[t][h] = _mm256_fmadd_ps(dp, _mm256_mul_ps(ws, dx), acc[t][h]);
                if KIND == 2 {
                    // Only Q4_K stores offsets (the others' codes were made signed above).
                    let ms =
                        _mm256_cvtph_ps(_mm_loadu_si128(mins.as_ptr().add(at) as *const __m128i));
                    let cx = _mm256_set1_ps(*acts[t].c.get_unchecked(b));
                    acc[t][h] = _mm256_fnmadd_ps(ms, cx, acc[t][h]);
                }
            }
        }
    }
    let mut out = [[0f32; 16]; T];
    for t in 0..T {
        _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t][0]);
        _mm256_storeu_ps(out[t].as_mut_ptr().add(8), acc[t][1]);
    }
    out
}

/// A T × 4 tile of a matrix product: four weight rows (`w`, `4 * n` values) times `T`
/// activation rows (`x`, `T * n` values): `out[t][k] = w_k · x_t`. Each weight vector loaded
/// serves `T` products and each activation vector four. Every product is summed in the same
/// order as [`dot4_avx512`], so prompts and decode steps give the same bits.
///
/// # Safety
/// The CPU must support avx512f; `w.len()` is a multiple of 4 and `x.len() == T * w.len() / 4`.
#[target_feature(enable = "avx512f")]
pub unsafe fn tile_f32_avx512<const T: usize>(w: &[f32], x: &[f32]) -> [[f32; 4]; T] {
    let n = w.len() / 4;
    debug_assert_eq!(x.len(), T * n);
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 4]; T];
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
    reduce_rows(&acc)
}

/// One output panel of a packed f32 product (see `super::packed`): for each of `T` activation
/// rows `x[t * cols..][..cols]`, the 64 sums `Σ_k x[t][k] · panel[k * 64 + j]`, each one FMA
/// chain in `k` order from zero (so a row's sums never depend on `T` or on the other rows),
/// stored to `y[t * stride + j]` for `j < valid`.
///
/// # Safety
/// The CPU must support avx512f; `panel.len() >= cols * 64`, `x.len() >= T * cols`,
/// `valid <= 64`, and `y.len() >= (T - 1) * stride + valid` when `T > 0`.
#[target_feature(enable = "avx512f")]
pub unsafe fn panel_f32_avx512<const T: usize>(
    panel: &[f32],
    x: &[f32],
    cols: usize,
    y: &mut [f32],
    stride: usize,
    valid: usize,
) {
    debug_assert!(panel.len() >= cols * 64 && x.len() >= T * cols && valid <= 64);
    let (pw, px) = (panel.as_ptr(), x.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 4]; T];
    for k in 0..cols {
        // SAFETY: k < cols, so the panel's row k (64 values at k * 64) and each x[t][k]
        // (t < T) are inside the slices, per the caller's contract.
        let w = [
            _mm512_loadu_ps(pw.add(k * 64)),
            _mm512_loadu_ps(pw.add(k * 64 + 16)),
            _mm512_loadu_ps(pw.add(k * 64 + 32)),
            _mm512_loadu_ps(pw.add(k * 64 + 48)),
        ];
        for (t, row) in acc.iter_mut().enumerate() {
            let xv = _mm512_set1_ps(*px.add(t * cols + k));
            for (a, wv) in row.iter_mut().zip(&w) {
                *a = _mm512_fmadd_ps(xv, *wv, *a);
            }
        }
    }
    let py = y.as_mut_ptr();
    for (t, row) in acc.iter().enumerate() {
        for (v, a) in row.iter().enumerate() {
            let first = v * 16;
            if first >= valid {
                break;
            }
            let m: __mmask16 = if valid - first >= 16 {
                0xffff
            } else {
                ((1u32 << (valid - first)) - 1) as __mmask16
            };
            // SAFETY: lanes first.. first + 16 masked to below `valid`; the caller guarantees
            // y holds t * stride + valid values.
            _mm512_mask_storeu_ps(py.add(t * stride + first), m, *a);
        }
    }
}

/// The sums of a T × 4 tile: four tokens at a time through [`reduce_tile`], the rest one by
/// one (the same pairing of lanes either way).
#[target_feature(enable = "avx512f")]
unsafe fn reduce_rows<const T: usize>(acc: &[[__m512; 4]; T]) -> [[f32; 4]; T] {
    let mut out = [[0f32; 4]; T];
    let mut t = 0;
    while t + 4 <= T {
        let four: &[[__m512; 4]; 4] = acc[t..t + 4].try_into().expect("four tokens");
        out[t..t + 4].copy_from_slice(&reduce_tile(four));
        t += 4;
    }
    for (o, a) in out[t..].iter_mut().zip(&acc[t..]) {
        for (o, a) in o.iter_mut().zip(a) {
            *o = _mm512_reduce_add_ps(*a);
        }
    }
    out
}

/// The sixteen sums of a 4 × 4 tile (`acc[t][k]`) reduced together: four rounds of shuffles
/// and adds fold every accumulator with the same pairing of lanes as `_mm512_reduce_add_ps`
/// (lane i with i + 8, then i + 4, then (0, 2) and (1, 3), then the two left), so each sum has
/// the bits of a decode step's reduction, at a quarter of the shuffles.
#[target_feature(enable = "avx512f")]
unsafe fn reduce_tile(acc: &[[__m512; 4]; 4]) -> [[f32; 4]; 4] {
    // Ordered by row then token, the result comes out ordered by token then row (see below).
    let mut v = [_mm512_setzero_ps(); 16];
    for (t, row) in acc.iter().enumerate() {
        for (k, a) in row.iter().enumerate() {
            v[k * 4 + t] = *a;
        }
    }
    // Lane i + lane i + 8: two accumulators per vector, eight lanes each.
    let mut s1 = [_mm512_setzero_ps(); 8];
    for (p, o) in s1.iter_mut().enumerate() {
        let (a, b) = (v[2 * p], v[2 * p + 1]);
        *o = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
        );
    }
    // Lane i + lane i + 4: four accumulators per vector, one per 128-bit quarter.
    let mut s2 = [_mm512_setzero_ps(); 4];
    for (p, o) in s2.iter_mut().enumerate() {
        let (a, b) = (s1[2 * p], s1[2 * p + 1]);
        *o = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
        );
    }
    // Lanes (0 + 2, 1 + 3) of each quarter: two accumulators per quarter.
    let mut s3 = [_mm512_setzero_ps(); 2];
    for (p, o) in s3.iter_mut().enumerate() {
        let (a, b) = (s2[2 * p], s2[2 * p + 1]);
        *o = _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(a, b),
            _mm512_shuffle_ps::<0b11_10_11_10>(a, b),
        );
    }
    // The last pair: lane 4q + m ends up holding v[4m + q], which (v ordered [k][t]) is
    // acc[q][m]: lane 4t + k is acc[t][k].
    let r = _mm512_add_ps(
        _mm512_shuffle_ps::<0b10_00_10_00>(s3[0], s3[1]),
        _mm512_shuffle_ps::<0b11_01_11_01>(s3[0], s3[1]),
    );
    let mut lanes = [0f32; 16];
    // SAFETY: 16 lanes into a 16-value array.
    _mm512_storeu_ps(lanes.as_mut_ptr(), r);
    let mut out = [[0f32; 4]; 4];
    for (t, o) in out.iter_mut().enumerate() {
        o.copy_from_slice(&lanes[4 * t..4 * t + 4]);
    }
    out
}

/// [`tile4_f32_avx512`] for 16-bit weights (widened once per tile, not once per product), in
/// the order of [`dot4_16_avx512`].
///
/// # Safety
/// The CPU must support avx512f; `w.len() == x.len()`, a multiple of 4.
#[target_feature(enable = "avx512f")]
pub unsafe fn tile_16_avx512<const BF16: bool, const T: usize>(
    w: &[u16],
    x: &[f32],
) -> [[f32; 4]; T] {
    let n = w.len() / 4;
    debug_assert_eq!(x.len(), T * n);
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 4]; T];
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
    let mut out = reduce_rows(&acc);
    for (t, o) in out.iter_mut().enumerate() {
        for (k, o) in o.iter_mut().enumerate() {
            for j in i..n {
                *o += super::widen::<BF16>(*pw.add(k * n + j)) * *px.add(t * n + j);
            }
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

/// [`super::attention::scores_block`] with AVX2: two queries at a time, each with even and odd
/// running sums over two 8-key halves (eight chains in the sixteen registers), in the order of
/// the scalar reference.
///
/// # Safety
/// The CPU must support avx2 and fma; shapes as checked by the safe wrapper.
#[target_feature(enable = "avx2,fma")]
// Register arrays are indexed by query: the index is the clearer name.
#[allow(clippy::needless_range_loop)]
pub unsafe fn scores_block_avx2(qs: &[f32], d: usize, kt: &[f32], out: &mut [f32], stride: usize) {
    let m = qs.len() / d;
    let pk = kt.as_ptr();
    let mut q = 0;
    while q < m {
        let count = (m - q).min(2);
        let mut even = [[_mm256_setzero_ps(); 2]; 2];
        let mut odd = [[_mm256_setzero_ps(); 2]; 2];
        let pq = qs.as_ptr().add(q * d);
        let mut j = 0;
        // SAFETY (all accesses below): key rows j, j + 1 < d (16 values each); query elements
        // (q + c) * d + j (+ 1) with q + c < m; the stores write 16 values at (q + c) * stride.
        while j + 2 <= d {
            let k0 = [
                _mm256_loadu_ps(pk.add(j * 16)),
                _mm256_loadu_ps(pk.add(j * 16 + 8)),
            ];
            let k1 = [
                _mm256_loadu_ps(pk.add((j + 1) * 16)),
                _mm256_loadu_ps(pk.add((j + 1) * 16 + 8)),
            ];
            for c in 0..count {
                let (a, b) = (
                    _mm256_set1_ps(*pq.add(c * d + j)),
                    _mm256_set1_ps(*pq.add(c * d + j + 1)),
                );
                for h in 0..2 {
                    even[c][h] = _mm256_fmadd_ps(a, k0[h], even[c][h]);
                    odd[c][h] = _mm256_fmadd_ps(b, k1[h], odd[c][h]);
                }
            }
            j += 2;
        }
        if j < d {
            let k0 = [
                _mm256_loadu_ps(pk.add(j * 16)),
                _mm256_loadu_ps(pk.add(j * 16 + 8)),
            ];
            for c in 0..count {
                let a = _mm256_set1_ps(*pq.add(c * d + j));
                for h in 0..2 {
                    even[c][h] = _mm256_fmadd_ps(a, k0[h], even[c][h]);
                }
            }
        }
        for c in 0..count {
            let po = out.as_mut_ptr().add((q + c) * stride);
            for h in 0..2 {
                _mm256_storeu_ps(po.add(h * 8), _mm256_add_ps(even[c][h], odd[c][h]));
            }
        }
        q += 2;
    }
}

/// [`super::attention::weighted_sum`] with AVX2: 32 dimensions of two queries at a time in
/// eight registers, one running sum per lane over the keys in order (as the scalar reference).
///
/// # Safety
/// The CPU must support avx2 and fma; shapes as checked by the safe wrapper.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn weighted_sum_avx2(
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
        let w = (d - c).min(32);
        let vectors = w / 8;
        let mut q = 0;
        while q < m {
            let count = (m - q).min(2);
            let mut acc = [[_mm256_setzero_ps(); 4]; 2];
            let mut tail = [[0f32; 8]; 2];
            // SAFETY (all accesses below): value row i < keys reads columns c .. c + w < d of a
            // row at i * v_stride; weights (q + k) * stride + i with i < keys; outputs
            // (q + k) * d + c .. + w.
            for i in 0..keys {
                let row = v.as_ptr().add(i * v_stride + c);
                for k in 0..count {
                    let p = *ps.as_ptr().add((q + k) * stride + i);
                    let pv = _mm256_set1_ps(p);
                    for (x, a) in acc[k].iter_mut().enumerate().take(vectors) {
                        *a = _mm256_fmadd_ps(pv, _mm256_loadu_ps(row.add(x * 8)), *a);
                    }
                    for (l, t) in tail[k].iter_mut().enumerate().take(w - vectors * 8) {
                        *t = p.mul_add(*row.add(vectors * 8 + l), *t);
                    }
                }
            }
            for k in 0..count {
                let po = out.as_mut_ptr().add((q + k) * d + c);
                for (x, a) in acc[k].iter().enumerate().take(vectors) {
                    _mm256_storeu_ps(po.add(x * 8), *a);
                }
                for (l, t) in tail[k].iter().enumerate().take(w - vectors * 8) {
                    *po.add(vectors * 8 + l) = *t;
                }
            }
            q += 2;
        }
        c += 32;
    }
}
