//! The precision a model runs at, chosen at load (`--dtype`), and which type each weight matrix
//! gets under it: some shapes cannot be tiled by a format, and the output head keeps more bits
//! than 4-bit formats give (as llama.cpp does), so a precision is a plan, not one type.

use crate::kernels::WeightType;
use crate::strict_safetensors::Dtype;

/// What the user asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// The fastest precision that keeps quality on this CPU ([`Precision::resolve`]).
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
    Q8_0,
    Q4_0,
    Q4K,
}

/// Every accepted spelling, in the order `--help` lists them.
pub const PRECISIONS: &[(&str, Precision)] = &[
    ("auto", Precision::Auto),
    ("f32", Precision::F32),
    ("bf16", Precision::Bf16),
    ("f16", Precision::F16),
    ("q8_0", Precision::Q8_0),
    ("q4_0", Precision::Q4_0),
    ("q4_k", Precision::Q4K),
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dtype {0:?}; use one of auto, f32, bf16, f16, q8_0, q4_0, q4_k")]
pub struct UnknownPrecision(pub String);

impl std::str::FromStr for Precision {
    type Err = UnknownPrecision;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        PRECISIONS
            .iter()
            .find(|(n, _)| *n == lower)
            .map(|(_, p)| *p)
            .ok_or_else(|| UnknownPrecision(s.to_string()))
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = PRECISIONS
            .iter()
            .find(|(_, p)| p == self)
            .map(|(n, _)| *n)
            .unwrap_or("?");
        f.write_str(name)
    }
}

impl serde::Serialize for Precision {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Precision {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a matrix is for: the output head (and an embedding tied to it) keeps 8 bits under the
/// 4-bit formats; its errors reach every logit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Linear,
    Embedding,
    Head,
}

impl Precision {
    /// `Auto` made concrete: 16-bit weights (bf16; an f16 file stays f16) where the CPU has
    /// 16-bit kernels (AVX-512, or AVX2 with F16C), else f32. The bar for `auto` is "no
    /// measurable quality change" (tests/quality.rs: ≥ 99 % top-1 agreement with f32 and
    /// perplexity within 0.1 %): bf16 meets it at 1.7× f32's decode speed; q8_0 (+0.9 %
    /// perplexity, 97.8 % agreement) does not, and on SmolLM2 it flips the answer to
    /// "What is the capital of France?" exactly as llama.cpp's Q8_0 does. Quantized precisions
    /// are the user's explicit choice.
    pub fn resolve(self) -> Precision {
        match self {
            Precision::Auto => {
                if crate::kernels::isa() == crate::kernels::Isa::Avx512
                    || crate::kernels::has_f16c()
                {
                    Precision::Bf16
                } else {
                    Precision::F32
                }
            }
            p => p,
        }
    }

    /// The precision a model of `task` computes at when asked for `self`: `Auto` is
    /// [`Precision::resolve`] for generation and f32 for embeddings (encoders are small and
    /// short-input; f32 keeps their vectors exactly those of the reference). Everything that
    /// sizes or reports a model's precision asks this one function.
    pub fn for_task(self, task: crate::Task) -> Precision {
        match (self, task) {
            (Precision::Auto, crate::Task::Embeddings) => Precision::F32,
            (p, _) => p.resolve(),
        }
    }

    /// The weight type of a `cols`-wide matrix with this role. Fallbacks (stated in the README):
    /// Q4_K needs rows of a multiple of 256 and falls back to Q8_0; Q8_0 and Q4_0 need a
    /// multiple of 32 and fall back to f16; the head is Q8_0 under Q4_0 and Q4_K.
    pub fn weight_type(self, role: Role, cols: usize) -> WeightType {
        let fits = |t: WeightType| {
            t.quant()
                .is_none_or(|k| cols > 0 && cols.is_multiple_of(k.tile()))
        };
        let wanted = match (self.resolve(), role) {
            (Precision::Auto | Precision::F32, _) => WeightType::F32,
            (Precision::Bf16, _) => WeightType::Bf16,
            (Precision::F16, _) => WeightType::F16,
            (Precision::Q8_0, _) => WeightType::Q8_0,
            (Precision::Q4_0 | Precision::Q4K, Role::Head) => WeightType::Q8_0,
            (Precision::Q4_0, _) => WeightType::Q4_0,
            (Precision::Q4K, _) => WeightType::Q4K,
        };
        [wanted, WeightType::Q8_0, WeightType::F16]
            .into_iter()
            .find(|t| fits(*t))
            .unwrap_or(WeightType::F16)
    }

    /// Weights as floats (no block format): what candle's dense kernels compute with.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            Precision::Auto | Precision::F32 | Precision::Bf16 | Precision::F16
        )
    }

    /// The candle dtype the reference path computes in, for float precisions.
    pub fn candle_dtype(self) -> Option<candle_core::DType> {
        match self {
            Precision::F32 => Some(candle_core::DType::F32),
            Precision::Bf16 => Some(candle_core::DType::BF16),
            Precision::F16 => Some(candle_core::DType::F16),
            _ => None,
        }
    }
}

/// Bytes a `rows × cols` matrix takes at `t` (as the kernels hold it).
pub fn matrix_bytes(t: WeightType, rows: usize, cols: usize) -> u64 {
    let (rows, cols) = (rows as u64, cols as u64);
    match t.quant() {
        None => {
            rows * cols
                * match t {
                    WeightType::F32 => 4,
                    _ => 2,
                }
        }
        Some(k) => {
            let blocks = crate::kernels::formats::padded_blocks(cols as usize) as u64;
            let rows = crate::kernels::formats::padded_rows(rows as usize) as u64;
            // A scale per block, and an offset for the kinds that store one.
            let per_block = k.code_bytes() as u64 + if k.fixed_offset().is_some() { 2 } else { 4 };
            rows * blocks * per_block
        }
    }
}

/// Whether a tensor whose bytes in the file's mapping are `bytes` is used in place there at
/// `t`: the file's own type, and for f32 only when it starts on a cache line (else it is copied
/// to one: the f32 prompt tile runs about a quarter faster on line-aligned rows, see
/// [`crate::kernels::aligned`]). 16-bit weights stay in the mapping wherever they start: their
/// 32-byte loads straddle half as often, measured no faster copied, and a copy would double
/// the address space a large 16-bit model needs.
pub fn in_place(file: Dtype, t: WeightType, bytes: &[u8]) -> bool {
    same_type(file, t) && (t != WeightType::F32 || crate::kernels::aligned::is_line_aligned(bytes))
}

/// Whether the file's type is the run type `t` (no conversion).
pub fn same_type(file: Dtype, t: WeightType) -> bool {
    matches!(
        (file, t),
        (Dtype::F32, WeightType::F32)
            | (Dtype::BF16, WeightType::Bf16)
            | (Dtype::F16, WeightType::F16)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for (name, p) in PRECISIONS {
            assert_eq!(name.parse::<Precision>().unwrap(), *p);
            assert_eq!(p.to_string(), *name);
        }
        assert!("int3".parse::<Precision>().is_err());
        assert_eq!("Q8_0".parse::<Precision>().unwrap(), Precision::Q8_0);
    }

    #[test]
    fn fallbacks_follow_the_stated_rules() {
        use WeightType::*;
        assert_eq!(Precision::Q4K.weight_type(Role::Linear, 2048), Q4K);
        assert_eq!(Precision::Q4K.weight_type(Role::Linear, 576), Q8_0);
        assert_eq!(Precision::Q4_0.weight_type(Role::Linear, 576), Q4_0);
        assert_eq!(Precision::Q4_0.weight_type(Role::Head, 576), Q8_0);
        assert_eq!(Precision::Q4K.weight_type(Role::Head, 2048), Q8_0);
        assert_eq!(Precision::Q8_0.weight_type(Role::Linear, 100), F16);
        assert_eq!(Precision::Bf16.weight_type(Role::Linear, 100), Bf16);
        assert_eq!(Precision::F32.weight_type(Role::Head, 7), F32);
    }
}
