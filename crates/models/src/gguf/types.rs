//! The ggml tensor types mpolm knows, in one table (llama.cpp keeps the same facts in
//! `ggml.c`'s `type_traits`): id in the file, name, block geometry, where a block keeps its
//! scales, and what mpolm does with the type. Reader (`check_layout`, the NaN check),
//! kept-quantized layers (`qlinear`, `qdot`) and writer ([`super::write`]) all look here.

use candle_core::quantized::GgmlDType;

/// Where a type's numbers that can be NaN or infinite sit (integer codes cannot be).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finite {
    /// Every element is an f32.
    F32,
    /// Every element is an f16.
    F16,
    /// Every element is a bf16.
    Bf16,
    /// Each block starts with one f32 scale (Q8_K).
    BlockF32,
    /// f16 scale fields at these byte offsets of each block.
    BlockF16(&'static [usize]),
}

#[derive(Debug, Clone, Copy)]
pub struct TypeTraits {
    pub dtype: GgmlDType,
    /// `enum ggml_type`.
    pub id: u32,
    /// `ggml_type_name`: `f32`, `q8_0`, `q4_K`, …
    pub name: &'static str,
    /// Elements per block (1 for float types).
    pub block: usize,
    /// Bytes per block.
    pub bytes: usize,
    pub finite: Finite,
    /// A Linear can keep its weight in this type (`--gguf-weights quantized`).
    pub linear: bool,
    /// The int8 decode kernels of `qdot` compute it (on AVX2 CPUs).
    pub int8_dot: bool,
    /// GGUF files mpolm writes may hold it (candle quantizes to it, llama.cpp stores it).
    pub write: bool,
}

const fn t(
    dtype: GgmlDType,
    id: u32,
    name: &'static str,
    block: usize,
    bytes: usize,
    finite: Finite,
    (linear, int8_dot, write): (bool, bool, bool),
) -> TypeTraits {
    TypeTraits {
        dtype,
        id,
        name,
        block,
        bytes,
        finite,
        linear,
        int8_dot,
        write,
    }
}

use Finite::*;
use GgmlDType as G;

/// Every type candle reads, by id. Block layouts: ggml's `block_q4_0` {d, qs} … `block_q6_K`
/// {ql, qh, scales, d}; the f16 offsets are those of `d` (and `dmin`/`m`).
pub const TYPES: &[TypeTraits] = &[
    t(G::F32, 0, "f32", 1, 4, F32, (false, false, true)),
    t(G::F16, 1, "f16", 1, 2, F16, (false, false, true)),
    t(
        G::Q4_0,
        2,
        "q4_0",
        32,
        18,
        BlockF16(&[0]),
        (true, true, true),
    ),
    t(
        G::Q4_1,
        3,
        "q4_1",
        32,
        20,
        BlockF16(&[0, 2]),
        (true, true, true),
    ),
    t(
        G::Q5_0,
        6,
        "q5_0",
        32,
        22,
        BlockF16(&[0]),
        (true, true, true),
    ),
    t(
        G::Q5_1,
        7,
        "q5_1",
        32,
        24,
        BlockF16(&[0, 2]),
        (true, false, true),
    ),
    t(
        G::Q8_0,
        8,
        "q8_0",
        32,
        34,
        BlockF16(&[0]),
        (true, true, true),
    ),
    t(
        G::Q8_1,
        9,
        "q8_1",
        32,
        36,
        BlockF16(&[0, 2]),
        (false, false, false),
    ),
    t(
        G::Q2K,
        10,
        "q2_K",
        256,
        84,
        BlockF16(&[80, 82]),
        (true, false, true),
    ),
    t(
        G::Q3K,
        11,
        "q3_K",
        256,
        110,
        BlockF16(&[108]),
        (true, false, true),
    ),
    t(
        G::Q4K,
        12,
        "q4_K",
        256,
        144,
        BlockF16(&[0, 2]),
        (true, false, true),
    ),
    t(
        G::Q5K,
        13,
        "q5_K",
        256,
        176,
        BlockF16(&[0, 2]),
        (true, false, true),
    ),
    t(
        G::Q6K,
        14,
        "q6_K",
        256,
        210,
        BlockF16(&[208]),
        (true, false, true),
    ),
    t(
        G::Q8K,
        15,
        "q8_K",
        256,
        292,
        BlockF32,
        (false, false, false),
    ),
    t(G::BF16, 30, "bf16", 1, 2, Bf16, (false, false, true)),
];

/// The traits of a type candle can hold (every `GgmlDType` is in [`TYPES`]).
pub fn of(dtype: GgmlDType) -> &'static TypeTraits {
    TYPES
        .iter()
        .find(|x| x.dtype == dtype)
        .unwrap_or_else(|| unreachable!("every GgmlDType is in types::TYPES"))
}

/// The type a file's id stands for; None for ids candle cannot read.
pub fn by_id(id: u32) -> Option<&'static TypeTraits> {
    TYPES.iter().find(|x| x.id == id)
}

impl TypeTraits {
    /// Bytes of `n` elements (`n` a multiple of the block).
    pub fn bytes_for(&self, n: usize) -> usize {
        n / self.block * self.bytes
    }

    /// The name as llama.cpp's logs and the `gguf` package print it: `Q4_K`, `F32`.
    pub fn upper_name(&self) -> String {
        self.name.to_ascii_uppercase()
    }

    /// What in `data` (whole blocks of this type) is NaN or infinite first: "value" or
    /// "block scale"; None when all are finite.
    pub fn first_nonfinite(&self, data: &[u8]) -> Option<&'static str> {
        let h16 = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) & 0x7c00 == 0x7c00;
        let f32_bad = |c: &[u8]| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite();
        match self.finite {
            F32 => data.chunks_exact(4).any(f32_bad).then_some("value"),
            F16 => data.chunks_exact(2).any(|c| h16(c, 0)).then_some("value"),
            Bf16 => data
                .chunks_exact(2)
                .any(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80)
                .then_some("value"),
            BlockF32 => data
                .chunks_exact(self.bytes)
                .any(f32_bad)
                .then_some("block scale"),
            BlockF16(fields) => data
                .chunks_exact(self.bytes)
                .any(|b| fields.iter().any(|&o| h16(b, o)))
                .then_some("block scale"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table against candle's own block sizes (an independent source) and ggml's ids.
    #[test]
    fn table_agrees_with_candle_and_ggml() {
        for x in TYPES {
            assert_eq!(x.block, x.dtype.block_size(), "{}", x.name);
            assert_eq!(x.bytes, x.dtype.type_size(), "{}", x.name);
            assert_eq!(by_id(x.id).map(|y| y.dtype), Some(x.dtype));
            assert_eq!(of(x.dtype).id, x.id);
            if let BlockF16(f) = x.finite {
                assert!(f.iter().all(|&o| o + 2 <= x.bytes), "{}", x.name);
            }
        }
        // ggml.h: GGML_TYPE_Q4_K = 12, GGML_TYPE_BF16 = 30; 4 and 5 (old q4_2/q4_3) are gone.
        assert_eq!(of(G::Q4K).id, 12);
        assert_eq!(of(G::BF16).id, 30);
        assert!(by_id(4).is_none() && by_id(5).is_none());
        assert_eq!(of(G::Q6K).upper_name(), "Q6_K");
        let linear: Vec<String> = TYPES
            .iter()
            .filter(|x| x.linear)
            .map(|x| x.upper_name())
            .collect();
        assert_eq!(linear.join(", "), crate::qlinear::SUPPORTED);
    }

    /// A NaN scale is found in the fields the table names, and nowhere else.
    #[test]
    fn nonfinite_scales_are_found() {
        let nan16 = half::f16::NAN.to_le_bytes();
        for x in TYPES {
            let mut data = vec![0u8; 2 * x.bytes];
            assert_eq!(x.first_nonfinite(&data), None, "{}", x.name);
            match x.finite {
                BlockF16(f) => {
                    let o = x.bytes + f[f.len() - 1];
                    data[o..o + 2].copy_from_slice(&nan16);
                }
                F32 | BlockF32 => {
                    data[x.bytes..x.bytes + 4].copy_from_slice(&f32::NAN.to_le_bytes())
                }
                F16 => data[2..4].copy_from_slice(&nan16),
                Bf16 => data[2..4].copy_from_slice(&half::bf16::NAN.to_le_bytes()),
            }
            assert!(x.first_nonfinite(&data).is_some(), "{}", x.name);
        }
    }
}
