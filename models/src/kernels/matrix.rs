//! Weight matrices kept at run precision (f32, bf16, f16 — owned or straight from the verified
//! mapping — or block-quantized), and their products with f32 activations split across threads.

use half::f16;
use rayon::prelude::*;

use super::aligned::{is_line_aligned, Aligned};
use super::formats::{QActs, QKind, QMatrix, PANEL};
use super::{isa, Isa};

/// Prompt tokens per f32 tile: each weight vector loaded serves this many products (24
/// accumulators, four weight vectors and one activation vector fit the 32 registers). 16-bit
/// weights stay at four: their widening needs registers too, and six measured slower.
const F32_TOKENS_PER_TILE: usize = 6;

/// Bytes that outlive the matrix (a verified read-only mapping).
pub trait Bytes: Send + Sync {
    fn bytes(&self) -> &[u8];
}

/// Elements owned (line-aligned), or viewed in place in a mapping (when it starts on a line).
pub struct Elems<T: bytemuck::Pod> {
    owned: Aligned<T>,
    mapped: Option<Box<dyn Bytes>>,
}

impl<T: bytemuck::Pod> Elems<T> {
    /// A line-aligned copy of `v`.
    pub fn owned(v: Vec<T>) -> Self {
        Self::aligned(Aligned::copy_of(&v))
    }

    pub fn aligned(a: Aligned<T>) -> Self {
        Elems {
            owned: a,
            mapped: None,
        }
    }

    /// Uses the bytes in place if they are aligned for `T` and a whole number of `T`; else
    /// hands them back. (Whether in place is worth it is the loader's call: see
    /// [`crate::precision::in_place`].)
    pub fn mapped(bytes: Box<dyn Bytes>) -> Result<Self, Box<dyn Bytes>> {
        if bytemuck::try_cast_slice::<u8, T>(bytes.bytes()).is_err() {
            return Err(bytes);
        }
        Ok(Elems {
            owned: Aligned::zeroed(0),
            mapped: Some(bytes),
        })
    }

    pub fn get(&self) -> &[T] {
        match &self.mapped {
            // Checked at construction; the mapping does not move.
            Some(m) => bytemuck::cast_slice(m.bytes()),
            None => &self.owned,
        }
    }

    pub fn is_mapped(&self) -> bool {
        self.mapped.is_some()
    }
}

/// A weight type at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WeightType {
    F32,
    Bf16,
    F16,
    Q8_0,
    Q4_0,
    Q4K,
}

impl WeightType {
    pub fn name(self) -> &'static str {
        match self {
            WeightType::F32 => "f32",
            WeightType::Bf16 => "bf16",
            WeightType::F16 => "f16",
            WeightType::Q8_0 => "q8_0",
            WeightType::Q4_0 => "q4_0",
            WeightType::Q4K => "q4_k",
        }
    }

    pub fn quant(self) -> Option<QKind> {
        match self {
            WeightType::Q8_0 => Some(QKind::Q8_0),
            WeightType::Q4_0 => Some(QKind::Q4_0),
            WeightType::Q4K => Some(QKind::Q4K),
            _ => None,
        }
    }
}

enum Data {
    F32(Elems<f32>),
    Bf16(Elems<u16>),
    F16(Elems<u16>),
    Q(QMatrix),
}

/// A row-major `rows × cols` weight matrix (`y = W x`).
pub struct Matrix {
    rows: usize,
    cols: usize,
    data: Data,
}

/// Activations prepared once for every matrix that reads them (Q, K and V share one input):
/// the f32 rows (copied to a cache-line boundary if they do not start on one: see
/// [`super::aligned`]), and their 8-bit quantization made on first use by a quantized matrix.
pub struct Input<'a> {
    x: &'a [f32],
    copy: Option<Aligned<f32>>,
    cols: usize,
    quantized: Option<(usize, Vec<QActs>)>,
}

impl<'a> Input<'a> {
    /// `x` holds `x.len() / cols` rows.
    pub fn new(x: &'a [f32], cols: usize) -> Self {
        assert!(cols > 0 && x.len().is_multiple_of(cols), "input shape");
        Input {
            x,
            copy: (!is_line_aligned(x)).then(|| Aligned::copy_of(x)),
            cols,
            quantized: None,
        }
    }

    /// The rows, line-aligned.
    fn x(&self) -> &[f32] {
        self.copy.as_deref().unwrap_or(self.x)
    }

    pub fn rows(&self) -> usize {
        self.x.len() / self.cols
    }

    /// Quantizes the rows in `blocks` blocks (once per block count), for [`Input::acts`].
    fn quantize(&mut self, blocks: usize) {
        let stale = !matches!(&self.quantized, Some((b, _)) if *b == blocks);
        if stale && self.rows() == 1 {
            let mut a = QActs::default();
            a.quantize(self.x(), blocks);
            self.quantized = Some((blocks, vec![a]));
        } else if stale {
            let rows: Vec<QActs> = self
                .x()
                .par_chunks(self.cols)
                .map(|row| {
                    let mut a = QActs::default();
                    a.quantize(row, blocks);
                    a
                })
                .collect();
            self.quantized = Some((blocks, rows));
        }
    }

    /// The rows quantized by the last [`Input::quantize`] (none before).
    fn acts(&self) -> &[QActs] {
        self.quantized.as_ref().map_or(&[], |(_, a)| a)
    }
}

impl Matrix {
    pub fn f32(rows: usize, cols: usize, e: Elems<f32>) -> Self {
        assert_eq!(e.get().len(), rows * cols, "matrix shape");
        Matrix {
            rows,
            cols,
            data: Data::F32(e),
        }
    }

    pub fn bf16(rows: usize, cols: usize, e: Elems<u16>) -> Self {
        assert_eq!(e.get().len(), rows * cols, "matrix shape");
        Matrix {
            rows,
            cols,
            data: Data::Bf16(e),
        }
    }

    pub fn f16(rows: usize, cols: usize, e: Elems<u16>) -> Self {
        assert_eq!(e.get().len(), rows * cols, "matrix shape");
        Matrix {
            rows,
            cols,
            data: Data::F16(e),
        }
    }

    pub fn quantized(q: QMatrix) -> Self {
        Matrix {
            rows: q.rows,
            cols: q.cols,
            data: Data::Q(q),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn weight_type(&self) -> WeightType {
        match &self.data {
            Data::F32(_) => WeightType::F32,
            Data::Bf16(_) => WeightType::Bf16,
            Data::F16(_) => WeightType::F16,
            Data::Q(q) => match q.kind {
                QKind::Q8_0 => WeightType::Q8_0,
                QKind::Q4_0 => WeightType::Q4_0,
                QKind::Q4K => WeightType::Q4K,
            },
        }
    }

    /// Bytes of weights this matrix reads per product.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::F32(e) => 4 * e.get().len(),
            Data::Bf16(e) | Data::F16(e) => 2 * e.get().len(),
            Data::Q(q) => q.bytes(),
        }
    }

    /// Whether the weights are read in place from the model's mapping (not copied).
    pub fn is_mapped(&self) -> bool {
        match &self.data {
            Data::F32(e) => e.is_mapped(),
            Data::Bf16(e) | Data::F16(e) => e.is_mapped(),
            Data::Q(_) => false,
        }
    }

    /// Row `r` as f32 (embedding lookups).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() == self.cols, "row index");
        let range = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            Data::F32(e) => out.copy_from_slice(&e.get()[range]),
            Data::Bf16(e) => {
                for (o, &b) in out.iter_mut().zip(&e.get()[range]) {
                    *o = widen::<true>(b);
                }
            }
            Data::F16(e) => {
                for (o, &b) in out.iter_mut().zip(&e.get()[range]) {
                    *o = widen::<false>(b);
                }
            }
            Data::Q(q) => q.dequantize_row(r, out),
        }
    }

    /// `y = x Wᵀ` for every row of `input` (`y` is `[rows of input][self.rows]`). Every weight
    /// row is read once and applied to all input rows while in cache.
    pub fn apply(&self, input: &mut Input, y: &mut [f32]) {
        self.apply_with(isa(), input, y)
    }

    #[cfg(test)]
    pub(super) fn apply_with_isa(&self, isa: Isa, input: &mut Input, y: &mut [f32]) {
        self.apply_with(isa, input, y)
    }

    fn apply_with(&self, isa: Isa, input: &mut Input, y: &mut [f32]) {
        assert_eq!(input.cols, self.cols, "input width");
        let n = input.rows();
        assert_eq!(y.len(), n * self.rows, "output shape");
        let acts: &[QActs] = match &self.data {
            Data::Q(q) => {
                input.quantize(q.blocks);
                input.acts()
            }
            _ => &[],
        };
        let x = input.x();
        let per = self.rows_per_task();
        if n == 1 {
            y.par_chunks_mut(per).enumerate().for_each(|(i, ys)| {
                self.rows_dot(isa, i * per, x, acts.first(), ys);
            });
            return;
        }
        let blocks: Vec<(usize, Vec<f32>)> = (0..self.rows.div_ceil(per))
            .into_par_iter()
            .map(|b| (b * per, self.block(isa, b * per, per, x, acts)))
            .collect();
        for (start, out) in blocks {
            self.place(start, &out, y);
        }
    }

    /// Rows `start..start + per` (fewer at the end) times every row of `x`, as `[token][row]`.
    fn block(&self, isa: Isa, start: usize, per: usize, x: &[f32], acts: &[QActs]) -> Vec<f32> {
        let cols = self.cols;
        let n = x.len() / cols;
        let r = per.min(self.rows - start);
        let mut out = vec![0f32; n * r];
        // Rows a few hundred KiB at a time, each slice kept in cache while every token goes
        // over it (instead of streaming the task's rows once per token group).
        let sub = self.rows_in_cache();
        let mut done = 0;
        for s0 in (0..r).step_by(sub) {
            let s1 = (s0 + sub).min(r);
            done = self.prompt_rows(isa, start, s0..s1, r, x, acts, &mut out);
        }
        for t in done..n {
            self.rows_dot(
                isa,
                start,
                &x[t * cols..(t + 1) * cols],
                acts.get(t),
                &mut out[t * r..(t + 1) * r],
            );
        }
        out
    }

    /// Copies a [`Matrix::block`] from row `start` into `y` (`[token][rows]`).
    fn place(&self, start: usize, out: &[f32], y: &mut [f32]) {
        let n = y.len() / self.rows;
        let r = out.len() / n;
        for t in 0..n {
            y[t * self.rows + start..t * self.rows + start + r]
                .copy_from_slice(&out[t * r..(t + 1) * r]);
        }
    }

    /// The values, row-major, if the matrix holds f32 (for repacking: see [`super::packed`]).
    pub fn f32_values(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(e) => Some(e.get()),
            _ => None,
        }
    }

    /// Rows handed to one task: whole panels for quantized weights (a panel is computed whole).
    fn rows_per_task(&self) -> usize {
        let per = super::rows_per_task(self.rows, self.cols);
        match self.data {
            Data::Q(_) => per.next_multiple_of(PANEL),
            _ => per,
        }
    }

    /// Rows of about 256 KiB of weights (whole panels): what a prompt pass keeps in the cache.
    fn rows_in_cache(&self) -> usize {
        let row_bytes = (self.bytes() / self.rows.max(1)).max(1);
        ((256 << 10) / row_bytes).next_multiple_of(PANEL)
    }

    /// Rows `start + rows` of a task's block (`r` rows from `start`) times the prompt's tokens
    /// in groups of four, into `out` (`[token][r]`); returns how many tokens were done (the
    /// rest go one by one).
    #[allow(clippy::too_many_arguments)]
    fn prompt_rows(
        &self,
        isa: Isa,
        start: usize,
        rows: std::ops::Range<usize>,
        r: usize,
        x: &[f32],
        acts: &[QActs],
        out: &mut [f32],
    ) -> usize {
        let (cols, n) = (self.cols, out.len() / r);
        let mut t = 0;
        if let Data::Q(q) = &self.data {
            // Up to four tokens per panel: each code vector loaded serves them all.
            let mut tile = [[0f32; PANEL]; 4];
            while t < n {
                let k = (n - t).min(4);
                let group: Vec<&QActs> = acts[t..t + k].iter().collect();
                let (first, end) = (start + rows.start, start + rows.end);
                for p in first / PANEL..end.div_ceil(PANEL) {
                    panel_q(isa, q, p, &group, &mut tile[..k]);
                    let lanes = p * PANEL..((p + 1) * PANEL).min(end);
                    for (tt, v) in tile[..k].iter().enumerate() {
                        let o = (t + tt) * r + lanes.start - start;
                        out[o..o + lanes.len()].copy_from_slice(&v[..lanes.len()]);
                    }
                }
                t += k;
            }
        } else if self.has_tiles(isa) {
            // Six (f32) or four tokens at a time over tiles of four rows; rows left
            // over go one by one, as in a decode step (same sums, same bits).
            while matches!(self.data, Data::F32(_)) && t + F32_TOKENS_PER_TILE <= n {
                self.tiles::<F32_TOKENS_PER_TILE>(isa, start, &rows, r, t, x, out);
                t += F32_TOKENS_PER_TILE;
            }
            while t + 4 <= n {
                self.tiles::<4>(isa, start, &rows, r, t, x, out);
                t += 4;
            }
            // The tokens left over, for these rows only.
            for tt in t..n {
                self.rows_dot(
                    isa,
                    start + rows.start,
                    &x[tt * cols..(tt + 1) * cols],
                    None,
                    &mut out[tt * r + rows.start..tt * r + rows.end],
                );
            }
            t = n;
        }
        t
    }

    /// Tokens `t..t + T` over rows `start + rows` in tiles of four rows, into `out`
    /// (`[token][r]`).
    #[allow(clippy::too_many_arguments)]
    fn tiles<const T: usize>(
        &self,
        isa: Isa,
        start: usize,
        rows: &std::ops::Range<usize>,
        r: usize,
        t: usize,
        x: &[f32],
        out: &mut [f32],
    ) {
        let cols = self.cols;
        let xs = &x[t * cols..(t + T) * cols];
        let mut k = rows.start;
        while k + 4 <= rows.end {
            let tile = self.tile::<T>(start + k, xs);
            for (tt, row) in tile.iter().enumerate() {
                out[(t + tt) * r + k..(t + tt) * r + k + 4].copy_from_slice(row);
            }
            k += 4;
        }
        for tt in t..t + T {
            self.rows_dot(
                isa,
                start + k,
                &x[tt * cols..(tt + 1) * cols],
                None,
                &mut out[tt * r + k..tt * r + rows.end],
            );
        }
    }

    /// Whether four-by-four tiles run for this type on this CPU (float weights, AVX-512).
    fn has_tiles(&self, isa: Isa) -> bool {
        cfg!(target_arch = "x86_64") && isa == Isa::Avx512 && !matches!(self.data, Data::Q(_))
    }

    /// Rows `first..first + 4` times the `T` activation rows `xs`: `[token][row]`.
    fn tile<const T: usize>(&self, first: usize, xs: &[f32]) -> [[f32; 4]; T] {
        let cols = self.cols;
        let range = first * cols..(first + 4) * cols;
        assert_eq!(xs.len(), T * cols, "tile shape");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: only reached when `has_tiles` saw `Isa::Avx512` (avx512f detected); both
        // operands hold four rows of `cols` values (the range is inside the matrix: the caller
        // passes `first + 4 <= rows`, and slicing checks it).
        unsafe {
            match &self.data {
                Data::F32(e) => super::x86::tile_f32_avx512::<T>(&e.get()[range], xs),
                Data::Bf16(e) => super::x86::tile_16_avx512::<true, T>(&e.get()[range], xs),
                Data::F16(e) => super::x86::tile_16_avx512::<false, T>(&e.get()[range], xs),
                Data::Q(_) => unreachable!("no tiles for quantized weights"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("tiles are x86-64 only")
    }

    /// `ys[i] = row(first + i) · x`.
    fn rows_dot(&self, isa: Isa, first: usize, x: &[f32], acts: Option<&QActs>, ys: &mut [f32]) {
        let cols = self.cols;
        let range = first * cols..(first + ys.len()) * cols;
        match &self.data {
            Data::F32(e) => super::rows_dot(isa, &e.get()[range], x, ys),
            Data::Bf16(e) => rows_dot_16::<true>(isa, &e.get()[range], x, ys),
            Data::F16(e) => rows_dot_16::<false>(isa, &e.get()[range], x, ys),
            Data::Q(q) => {
                let a = acts.expect("quantized activations");
                let end = first + ys.len();
                let mut out = [[0f32; PANEL]];
                for p in first / PANEL..end.div_ceil(PANEL) {
                    panel_q(isa, q, p, &[a], &mut out);
                    let rows = (p * PANEL).max(first)..((p + 1) * PANEL).min(end);
                    ys[rows.start - first..rows.end - first]
                        .copy_from_slice(&out[0][rows.start - p * PANEL..rows.end - p * PANEL]);
                }
            }
        }
    }
}

/// Several matrices of the same input width applied to one input in one parallel region (Q, K
/// and V; gate and up): one dispatch instead of several, the activations quantized once.
pub fn apply_group(input: &mut Input, parts: &mut [(&Matrix, &mut [f32])]) {
    let isa = isa();
    if input.rows() != 1 {
        apply_group_rows(isa, input, parts);
        return;
    }
    let blocks = parts.iter().find_map(|(m, _)| match &m.data {
        Data::Q(q) => Some(q.blocks),
        _ => None,
    });
    if let Some(b) = blocks {
        input.quantize(b);
    }
    let acts: Option<&QActs> = blocks.and_then(|_| input.acts().first());
    let x = input.x();
    let mut tasks: Vec<(&Matrix, usize, &mut [f32])> = Vec::new();
    for (m, y) in parts.iter_mut() {
        assert_eq!(m.cols, x.len(), "input width");
        assert_eq!(y.len(), m.rows, "output shape");
        let per = m.rows_per_task();
        for (i, ys) in y.chunks_mut(per).enumerate() {
            tasks.push((*m, i * per, ys));
        }
    }
    tasks.into_par_iter().for_each(|(m, first, ys)| {
        let a = match &m.data {
            // Every quantized part has the same width, hence the same block count.
            Data::Q(_) => acts,
            _ => None,
        };
        m.rows_dot(isa, first, x, a, ys);
    });
}

/// [`apply_group`] for several rows: every part's blocks in one parallel pass (one wake-up of
/// the pool instead of one per matrix: a decode step of several sequences runs hundreds of
/// these), each block computed as [`Matrix::apply`] computes it, so the same bits.
fn apply_group_rows(isa: Isa, input: &mut Input, parts: &mut [(&Matrix, &mut [f32])]) {
    let n = input.rows();
    let blocks = parts.iter().find_map(|(m, _)| match &m.data {
        Data::Q(q) => Some(q.blocks),
        _ => None,
    });
    if let Some(b) = blocks {
        input.quantize(b);
    }
    let x = input.x();
    let acts: &[QActs] = if blocks.is_some() { input.acts() } else { &[] };
    let mut jobs = Vec::new();
    for (i, (m, y)) in parts.iter().enumerate() {
        assert_eq!(m.cols, input.cols, "input width");
        assert_eq!(y.len(), n * m.rows, "output shape");
        let per = m.rows_per_task();
        jobs.extend((0..m.rows.div_ceil(per)).map(|b| (i, b * per, per)));
    }
    let mats: Vec<&Matrix> = parts.iter().map(|(m, _)| *m).collect();
    let outs: Vec<(usize, usize, Vec<f32>)> = jobs
        .into_par_iter()
        .map(|(i, start, per)| {
            let m = mats[i];
            // Every quantized part has the same width, hence the same block count.
            let a = if matches!(m.data, Data::Q(_)) {
                acts
            } else {
                &[]
            };
            (i, start, m.block(isa, start, per, x, a))
        })
        .collect();
    for (i, start, out) in outs {
        mats[i].place(start, &out, parts[i].1);
    }
}

/// One 16-bit value widened to f32 (exact for both formats).
#[inline]
pub fn widen<const BF16: bool>(bits: u16) -> f32 {
    if BF16 {
        f32::from_bits((bits as u32) << 16)
    } else {
        f16::from_bits(bits).to_f32()
    }
}

/// The scalar reference for a 16-bit row · f32 `x`.
pub fn dot_16_scalar<const BF16: bool>(w: &[u16], x: &[f32]) -> f32 {
    w.iter()
        .zip(x)
        .fold(0f32, |acc, (&b, &v)| widen::<BF16>(b).mul_add(v, acc))
}

fn rows_dot_16<const BF16: bool>(isa: Isa, ws: &[u16], x: &[f32], ys: &mut [f32]) {
    let cols = x.len();
    let mut r = 0;
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        while r + 4 <= ys.len() {
            // SAFETY: `Isa::Avx512` is only used when the CPU reports avx512f; the slice holds
            // exactly four rows of `cols` values.
            let out =
                unsafe { super::x86::dot4_16_avx512::<BF16>(&ws[r * cols..(r + 4) * cols], x) };
            ys[r..r + 4].copy_from_slice(&out);
            r += 4;
        }
    }
    for (y, row) in ys[r..].iter_mut().zip(ws[r * cols..].chunks_exact(cols)) {
        *y = dot_16_with::<BF16>(isa, row, x);
    }
}

pub(super) fn dot_16_with<const BF16: bool>(isa: Isa, w: &[u16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot of unequal lengths");
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: avx512f detected; lengths equal.
        Isa::Avx512 => unsafe { super::x86::dot_16_avx512::<BF16>(w, x) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma if super::has_f16c() => {
            // SAFETY: avx2, fma and f16c detected; lengths equal.
            unsafe { super::x86::dot_16_avx2::<BF16>(w, x) }
        }
        _ => dot_16_scalar::<BF16>(w, x),
    }
}

/// Panel `p` of `q` times the activations of `acts.len()` (1 to 4) tokens: `out[t][i]` is row
/// `p * PANEL + i` · token `t` (rows past the matrix come out zero), on the best kernel this CPU
/// has.
pub(super) fn panel_q(isa: Isa, q: &QMatrix, p: usize, acts: &[&QActs], out: &mut [[f32; PANEL]]) {
    assert!(
        (1..=4).contains(&acts.len()) && out.len() == acts.len(),
        "tokens per panel"
    );
    assert!(
        acts.iter()
            .all(|a| a.d.len() == q.blocks && a.q.len() == q.blocks * super::formats::BLOCK),
        "activations quantized for another width"
    );
    #[cfg(target_arch = "x86_64")]
    {
        let (codes, scales, mins) = q.panel(p);
        // The kernels' contract, checked here (not only in debug builds): one panel of
        // `blocks` blocks; offsets stored for Q4_K only.
        let blocks = q.blocks;
        assert!(
            scales.len() == blocks * PANEL
                && codes.len() == blocks * PANEL * q.kind.code_bytes()
                && mins.len()
                    == if q.kind == QKind::Q4K {
                        blocks * PANEL
                    } else {
                        0
                    },
            "panel shape"
        );
        let vnni = isa == Isa::Avx512 && super::has_vnni();
        let avx2 = matches!(isa, Isa::Avx512 | Isa::Avx2Fma) && super::has_f16c();
        macro_rules! run {
            ($kernel:ident, $kind:expr) => {
                // SAFETY: the kernel's CPU features were detected (every AVX-512 CPU has AVX2,
                // FMA and F16C); `panel` returns one panel's codes, scales and offsets of
                // `blocks` blocks, and the activations have `blocks` blocks (checked above).
                unsafe {
                    match acts {
                        [a] => out.copy_from_slice(&$kernel::<$kind, 1>(codes, scales, mins, [a])),
                        [a, b] => {
                            out.copy_from_slice(&$kernel::<$kind, 2>(codes, scales, mins, [a, b]))
                        }
                        [a, b, c] => out.copy_from_slice(&$kernel::<$kind, 3>(
                            codes,
                            scales,
                            mins,
                            [a, b, c],
                        )),
                        [a, b, c, d] => out.copy_from_slice(&$kernel::<$kind, 4>(
                            codes,
                            scales,
                            mins,
                            [a, b, c, d],
                        )),
                        _ => unreachable!("checked above"),
                    }
                }
            };
        }
        use super::x86::{panel_q_avx2, panel_q_vnni};
        match q.kind {
            QKind::Q8_0 if vnni => return run!(panel_q_vnni, 0),
            QKind::Q4_0 if vnni => return run!(panel_q_vnni, 1),
            QKind::Q4K if vnni => return run!(panel_q_vnni, 2),
            QKind::Q8_0 if avx2 => return run!(panel_q_avx2, 0),
            QKind::Q4_0 if avx2 => return run!(panel_q_avx2, 1),
            QKind::Q4K if avx2 => return run!(panel_q_avx2, 2),
            _ => {}
        }
    }
    let _ = isa;
    for (o, a) in out.iter_mut().zip(acts) {
        for (i, v) in o.iter_mut().enumerate() {
            let r = p * PANEL + i;
            *v = if r < q.rows {
                super::formats::dot_q_scalar(q, r, a)
            } else {
                0.0
            };
        }
    }
}

/// One quantized row · activations on the given tier (tests compare every tier).
#[cfg(test)]
pub(super) fn dot_q_tier(tier: &str, q: &QMatrix, r: usize, a: &QActs) -> f32 {
    let isa = match tier {
        "scalar" => return super::formats::dot_q_scalar(q, r, a),
        "avx2" => Isa::Avx2Fma,
        _ => Isa::Avx512,
    };
    let mut out = [[0f32; PANEL]];
    panel_q(isa, q, r / PANEL, &[a], &mut out);
    out[0][r % PANEL]
}
