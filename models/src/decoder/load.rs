//! Reads a decoder's tensors from the verified source at the run precision: float tensors whose
//! type is the run type are used in place from the read-only mapping; others are converted (or
//! quantized) once, and their mapped pages released.

use std::sync::Arc;

use rayon::prelude::*;

use crate::kernels::aligned::Aligned;
use crate::kernels::{Bytes, Elems, Matrix, QMatrix, WeightType};
use crate::precision::{self, Precision, Role};
use crate::source::ModelSource;
use crate::strict_safetensors::{Dtype, TensorInfo};

/// A tensor's bytes inside the model's mapping, kept alive by the source.
struct MappedTensor {
    source: Arc<ModelSource>,
    file: usize,
    info: TensorInfo,
}

impl Bytes for MappedTensor {
    fn bytes(&self) -> &[u8] {
        self.source.weight_files()[self.file].tensor_bytes(&self.info)
    }
}

/// Loads tensors by name at a precision; records what each matrix became.
pub struct TensorLoader {
    source: Arc<ModelSource>,
    precision: Precision,
    /// The user asked for `auto` (16-bit files keep their own type).
    auto: bool,
    /// (tensor, type it runs at, bytes held, read in place).
    pub report: Vec<(String, WeightType, usize, bool)>,
}

impl TensorLoader {
    pub fn new(source: Arc<ModelSource>, precision: Precision) -> Self {
        TensorLoader {
            source,
            precision: precision.resolve(),
            auto: precision == Precision::Auto,
            report: Vec::new(),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.source.tensor(name).is_some()
    }

    fn find(&self, name: &str, shape: &[usize]) -> Result<(usize, TensorInfo), String> {
        let (file, info) = self
            .source
            .tensor_in_file(name)
            .ok_or_else(|| format!("tensor {name:?} is missing from the model"))?;
        if info.shape != shape {
            return Err(format!(
                "tensor {name:?} has shape {:?}, the configuration expects {shape:?}",
                info.shape
            ));
        }
        if !matches!(info.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            return Err(format!(
                "tensor {name:?} has dtype {}; weights must be f32, bf16 or f16",
                info.dtype
            ));
        }
        Ok((file, info.clone()))
    }

    /// The tensor widened to f32 (a copy); its mapped pages are released afterwards.
    fn read_f32(&self, file: usize, info: &TensorInfo) -> Vec<f32> {
        let f = &self.source.weight_files()[file];
        let out = widen_bytes(info.dtype, f.tensor_bytes(info));
        f.release_pages(info);
        out
    }

    /// Calls `each(first_row, values)` on pieces of about [`PIECE_BYTES`] of the tensor widened
    /// to f32, releasing each piece's mapped pages once it is done: peak memory during load is
    /// the weights at run precision plus one piece, not plus a widened copy of the largest
    /// tensor and its mapped pages.
    fn stream_rows(
        &self,
        file: usize,
        info: &TensorInfo,
        cols: usize,
        mut each: impl FnMut(usize, Vec<f32>),
    ) {
        let f = &self.source.weight_files()[file];
        let bytes = f.tensor_bytes(info);
        let row_bytes = cols * info.dtype.size() as usize;
        let rows_per_piece = (PIECE_BYTES / row_bytes.max(1)).max(1);
        for (i, piece) in bytes.chunks(rows_per_piece * row_bytes).enumerate() {
            f.populate_range(info, i * rows_per_piece * row_bytes, piece.len());
            each(i * rows_per_piece, widen_bytes(info.dtype, piece));
            f.release_range(info, i * rows_per_piece * row_bytes, piece.len());
        }
    }

    /// A norm or bias: always f32.
    pub fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>, String> {
        let (file, info) = self.find(name, &[len])?;
        Ok(self.read_f32(file, &info))
    }

    /// A `[rows, cols]` table kept in f32 (position embeddings and the like).
    pub fn vector_2d(&mut self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>, String> {
        let (file, info) = self.find(name, &[rows, cols])?;
        Ok(self.read_f32(file, &info))
    }

    /// The number of rows of a two-dimensional tensor, if the model has it.
    pub fn rows_of(&self, name: &str) -> Option<usize> {
        let (_, info) = self.source.tensor(name)?;
        (info.shape.len() == 2).then(|| info.shape[0])
    }

    /// A `[rows, cols]` weight matrix at the type the precision plans for `role`.
    pub fn matrix(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        role: Role,
    ) -> Result<Matrix, String> {
        let (file, info) = self.find(name, &[rows, cols])?;
        let t = self.weight_type(role, cols, info.dtype);
        let m = self.build(file, info, rows, cols, t);
        self.report
            .push((name.to_string(), t, m.bytes(), m.is_mapped()));
        Ok(m)
    }

    /// Rows `rows` of a `[total, cols]` tensor (one part of a fused projection, as Phi-3's
    /// `qkv_proj`), as a matrix of its own: read in place from the mapping when the type
    /// allows, as a whole tensor would be.
    pub fn matrix_rows(
        &mut self,
        name: &str,
        total: usize,
        cols: usize,
        rows: std::ops::Range<usize>,
        role: Role,
    ) -> Result<Matrix, String> {
        let (file, info) = self.find(name, &[total, cols])?;
        if rows.start >= rows.end || rows.end > total {
            return Err(format!(
                "rows {rows:?} outside tensor {name:?} of {total} rows"
            ));
        }
        let row_bytes = (cols * info.dtype.size() as usize) as u64;
        let part = TensorInfo {
            name: format!("{name}[{}..{}]", rows.start, rows.end),
            shape: vec![rows.len(), cols],
            begin: info.begin + rows.start as u64 * row_bytes,
            end: info.begin + rows.end as u64 * row_bytes,
            ..info
        };
        let t = self.weight_type(role, cols, part.dtype);
        let label = part.name.clone();
        let m = self.build(file, part, rows.len(), cols, t);
        self.report.push((label, t, m.bytes(), m.is_mapped()));
        Ok(m)
    }

    /// The type a `cols`-wide matrix of `role` runs at, stored as `dtype` in the file.
    fn weight_type(&self, role: Role, cols: usize, dtype: Dtype) -> WeightType {
        let t = self.precision.weight_type(role, cols);
        if self.auto && t == WeightType::Bf16 && dtype == Dtype::F16 {
            // `auto` keeps an f16 file's own 16-bit type (read in place, nothing rounded).
            return WeightType::F16;
        }
        t
    }

    fn build(
        &self,
        file: usize,
        info: TensorInfo,
        rows: usize,
        cols: usize,
        t: WeightType,
    ) -> Matrix {
        let f = &self.source.weight_files()[file];
        if precision::in_place(info.dtype, t, f.tensor_bytes(&info)) {
            // Read in place for the whole run: its pages are mapped in now, at load, rather
            // than by faults during the first tokens.
            f.populate_range(&info, 0, (info.end - info.begin) as usize);
            let mapped = Box::new(MappedTensor {
                source: self.source.clone(),
                file,
                info: info.clone(),
            });
            let built = match t {
                WeightType::F32 => Elems::<f32>::mapped(mapped).map(|e| Matrix::f32(rows, cols, e)),
                WeightType::Bf16 => {
                    Elems::<u16>::mapped(mapped).map(|e| Matrix::bf16(rows, cols, e))
                }
                _ => Elems::<u16>::mapped(mapped).map(|e| Matrix::f16(rows, cols, e)),
            };
            if let Ok(m) = built {
                return m;
            }
        }
        if precision::same_type(info.dtype, t) {
            // The file's own type, but not starting on a cache line: copied to one, piece by
            // piece, each piece's mapped pages released once copied.
            return match t {
                WeightType::F32 => Matrix::f32(rows, cols, self.copy_rows(file, &info)),
                WeightType::Bf16 => Matrix::bf16(rows, cols, self.copy_rows(file, &info)),
                _ => Matrix::f16(rows, cols, self.copy_rows(file, &info)),
            };
        }
        let mut m = match t {
            WeightType::F32 => Target::F32(Aligned::zeroed(rows * cols)),
            WeightType::Bf16 | WeightType::F16 => Target::U16(Aligned::zeroed(rows * cols)),
            q => Target::Q(QMatrix::zeroed(
                q.quant().expect("quantized type"),
                rows,
                cols,
            )),
        };
        let bf16 = t == WeightType::Bf16;
        self.stream_rows(file, &info, cols, |first, v| match &mut m {
            Target::F32(out) => out[first * cols..first * cols + v.len()].copy_from_slice(&v),
            Target::U16(out) => out[first * cols..first * cols + v.len()]
                .par_chunks_mut(CONVERT_CHUNK)
                .zip(v.par_chunks(CONVERT_CHUNK))
                .for_each(|(o, x)| {
                    if bf16 {
                        o.iter_mut().zip(x).for_each(|(o, x)| *o = bf16_bits(*x));
                    } else {
                        o.iter_mut()
                            .zip(x)
                            .for_each(|(o, x)| *o = half::f16::from_f32(*x).to_bits());
                    }
                }),
            Target::Q(q) => q.quantize_rows(first, &v),
        });
        match (m, t) {
            (Target::F32(v), _) => Matrix::f32(rows, cols, Elems::aligned(v)),
            (Target::U16(v), WeightType::Bf16) => Matrix::bf16(rows, cols, Elems::aligned(v)),
            (Target::U16(v), _) => Matrix::f16(rows, cols, Elems::aligned(v)),
            (Target::Q(q), _) => Matrix::quantized(q),
        }
    }

    /// The tensor's bytes as they are, in a line-aligned buffer of `T`, copied in pieces of
    /// about [`PIECE_BYTES`] whose mapped pages are released as it goes.
    fn copy_rows<T: bytemuck::Pod>(&self, file: usize, info: &TensorInfo) -> Elems<T> {
        let f = &self.source.weight_files()[file];
        let bytes = f.tensor_bytes(info);
        let mut out = Aligned::<T>::zeroed(bytes.len() / std::mem::size_of::<T>());
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut out[..]);
        // Little-endian in the file, as on every target the kernels run on.
        for (i, (piece, d)) in bytes
            .chunks(PIECE_BYTES)
            .zip(dst.chunks_mut(PIECE_BYTES))
            .enumerate()
        {
            f.populate_range(info, i * PIECE_BYTES, piece.len());
            d.copy_from_slice(piece);
            f.release_range(info, i * PIECE_BYTES, piece.len());
        }
        Elems::aligned(out)
    }
}

/// About how much of a tensor is widened at a time while converting it.
const PIECE_BYTES: usize = 8 << 20;

/// What a converted tensor is built into.
enum Target {
    F32(Aligned<f32>),
    U16(Aligned<u16>),
    Q(QMatrix),
}

/// Elements one pool task converts at load: per-element tasks cost more in hand-offs than
/// the conversion itself (the loader's time was mostly rayon's plumbing).
const CONVERT_CHUNK: usize = 1 << 14;

/// `x` rounded to bf16 (nearest, ties to even; a NaN stays a quiet NaN): the bits of
/// `half::bf16::from_f32`, written without branches so the loop over a tensor vectorizes (the
/// 135M model's bf16 load was mostly this conversion).
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) | 0x40) as u16;
    if x.is_nan() {
        nan
    } else {
        rounded
    }
}

/// Little-endian f32/bf16/f16 bytes widened to f32, in parallel.
fn widen_bytes(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    let size = dtype.size() as usize;
    let mut out = vec![0f32; bytes.len() / size];
    out.par_chunks_mut(CONVERT_CHUNK)
        .zip(bytes.par_chunks(CONVERT_CHUNK * size))
        .for_each(|(o, b)| match dtype {
            Dtype::F32 => {
                for (o, b) in o.iter_mut().zip(b.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Dtype::BF16 => {
                for (o, b) in o.iter_mut().zip(b.chunks_exact(2)) {
                    *o = crate::kernels::widen::<true>(u16::from_le_bytes([b[0], b[1]]));
                }
            }
            _ => {
                for (o, b) in o.iter_mut().zip(b.chunks_exact(2)) {
                    *o = crate::kernels::widen::<false>(u16::from_le_bytes([b[0], b[1]]));
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_matches_the_half_crate() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001), // signalling NaN
            f32::from_bits(0x3f80_8000), // a tie, rounds to even
            f32::from_bits(0x3f81_8000), // a tie, rounds up
            f32::from_bits(0x7f7f_ffff), // rounds to infinity
            f32::from_bits(0x0000_0001), // subnormal
        ];
        let mut s = 0x9e37_79b9u32;
        let random = (0..200_000).map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            f32::from_bits(s)
        });
        for x in specials.into_iter().chain(random) {
            assert_eq!(
                bf16_bits(x),
                half::bf16::from_f32(x).to_bits(),
                "{:#010x}",
                x.to_bits()
            );
        }
    }
}
