//! ggml tensor types and their dequantization to f32: the float types (F32, F16, BF16),
//! the 32-value block quants (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the 256-value k-quants
//! (Q2_K .. Q6_K). Block layouts are the facts of ggml's `ggml-common.h`; each routine is
//! tested against the gguf Python package's dequantizer (tests/gguf.rs).

use half::f16;

/// A ggml tensor type, by its id in GGUF files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    /// The i-quants, ternary and fp4 types and integer tensors: known, not dequantized here.
    Other(u32),
    BF16,
}

/// ggml type ids this reader knows by name (other ids up to 41 exist and are refused).
const NAMES: &[(u32, &str)] = &[
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
];

impl GgmlType {
    /// The type of a GGUF type id, `None` for ids no ggml version has used.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            15 => Self::Q8K,
            30 => Self::BF16,
            other if NAMES.iter().any(|(i, _)| *i == other) => Self::Other(other),
            _ => return None,
        })
    }

    /// Values per block and bytes per block, for the types this module dequantizes.
    pub fn block(self) -> Option<(u64, u64)> {
        Some(match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q2K => (256, 84),
            Self::Q3K => (256, 110),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
            Self::Q8_1 | Self::Q8K | Self::Other(_) => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q8_1 => "Q8_1",
            Self::Q2K => "Q2_K",
            Self::Q3K => "Q3_K",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
            Self::Q8K => "Q8_K",
            Self::Other(id) => NAMES.iter().find(|(i, _)| *i == id).map_or("unknown", |(_, n)| n),
        }
    }

    /// The dequantized types, for messages.
    pub fn supported_names() -> &'static str {
        "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K"
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `bytes` of a tensor of `elements` values of type `ty`, as f32 values in storage order.
pub fn dequantize(ty: GgmlType, bytes: &[u8], elements: usize) -> Result<Vec<f32>, String> {
    let (block, size) = ty.block().ok_or_else(|| format!("type {ty} cannot be dequantized"))?;
    let (block, size) = (block as usize, size as usize);
    if !elements.is_multiple_of(block) || bytes.len() != elements / block * size {
        return Err(format!("{} bytes do not hold {elements} values of type {ty}", bytes.len()));
    }
    let mut out = Vec::with_capacity(elements);
    let decode: fn(&[u8], &mut Vec<f32>) = match ty {
        GgmlType::F32 => |b, out| out.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        GgmlType::F16 => |b, out| out.push(half16(b, 0)),
        GgmlType::BF16 => |b, out| out.push(half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q2K => q2_k,
        GgmlType::Q3K => q3_k,
        GgmlType::Q4K => q4_k,
        GgmlType::Q5K => q5_k,
        GgmlType::Q6K => q6_k,
        GgmlType::Q8_1 | GgmlType::Q8K | GgmlType::Other(_) => return Err(format!("type {ty} cannot be dequantized")),
    };
    for chunk in bytes.chunks_exact(size) {
        decode(chunk, &mut out);
    }
    Ok(out)
}

/// The little-endian f16 at byte `at`.
fn half16(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q4_0: f16 scale d, then 16 bytes of 4-bit values; low nibbles are values 0..16, high
/// nibbles 16..32; x = (q - 8) d.
fn q4_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half16(b, 0);
    let qs = &b[2..18];
    out.extend(qs.iter().map(|q| (f32::from(q & 0x0f) - 8.0) * d));
    out.extend(qs.iter().map(|q| (f32::from(q >> 4) - 8.0) * d));
}

/// Q4_1: f16 scale d and minimum m, 16 bytes of nibbles; x = q d + m.
fn q4_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (half16(b, 0), half16(b, 2));
    let qs = &b[4..20];
    out.extend(qs.iter().map(|q| f32::from(q & 0x0f) * d + m));
    out.extend(qs.iter().map(|q| f32::from(q >> 4) * d + m));
}

/// The 5-bit values of a Q5 block: nibbles plus the fifth bits of `qh` (bit j for value j).
fn five_bits(qh: u32, qs: &[u8]) -> [u8; 32] {
    let mut q = [0u8; 32];
    for (j, byte) in qs.iter().enumerate() {
        let high_lo = ((qh >> j) & 1) as u8;
        let high_hi = ((qh >> (j + 16)) & 1) as u8;
        q[j] = (byte & 0x0f) | (high_lo << 4);
        q[j + 16] = (byte >> 4) | (high_hi << 4);
    }
    q
}

/// Q5_0: f16 d, u32 of fifth bits, 16 bytes of nibbles; x = (q - 16) d.
fn q5_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half16(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    out.extend(five_bits(qh, &b[6..22]).iter().map(|&q| (f32::from(q) - 16.0) * d));
}

/// Q5_1: f16 d and m, u32 of fifth bits, 16 bytes of nibbles; x = q d + m.
fn q5_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (half16(b, 0), half16(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    out.extend(five_bits(qh, &b[8..24]).iter().map(|&q| f32::from(q) * d + m));
}

/// Q8_0: f16 d, 32 signed bytes; x = q d.
fn q8_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half16(b, 0);
    out.extend(b[2..34].iter().map(|&q| f32::from(q as i8) * d));
}

/// Q2_K: 16 bytes of (scale, min) nibbles, 64 bytes of 2-bit values, f16 d and dmin. Each
/// 128 values use 32 bytes of `qs` four times (shifts 0, 2, 4, 6), 16 values per scale.
fn q2_k(b: &[u8], out: &mut Vec<f32>) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (half16(b, 80), half16(b, 82));
    let mut is = 0;
    for half in 0..2 {
        let q = &qs[half * 32..half * 32 + 32];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * f32::from(sc & 0x0f), dmin * f32::from(sc >> 4));
                out.extend(q[part * 16..part * 16 + 16].iter().map(|v| dl * f32::from((v >> shift) & 3) - ml));
            }
        }
    }
}

/// The sixteen 6-bit scales of a Q3_K block, packed in 12 bytes: low 4 bits in bytes 0..8,
/// high 2 bits in bytes 8..12; stored with an offset of 32.
fn q3_k_scales(packed: &[u8]) -> [i8; 16] {
    let mut scales = [0i8; 16];
    for (j, scale) in scales.iter_mut().enumerate() {
        let low = if j < 8 { packed[j] & 0x0f } else { packed[j - 8] >> 4 };
        let high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
        *scale = ((low | (high << 4)) as i8) - 32;
    }
    scales
}

/// Q3_K: 32 bytes of high-bit masks, 64 bytes of 2-bit values, 12 bytes of 6-bit scales,
/// f16 d. A value is its two low bits minus 4 when its mask bit is clear.
fn q3_k(b: &[u8], out: &mut Vec<f32>) {
    let (hmask, qs) = (&b[0..32], &b[32..96]);
    let scales = q3_k_scales(&b[96..108]);
    let d = half16(b, 108);
    let mut is = 0;
    let mut bit = 0;
    for half in 0..2 {
        let q = &qs[half * 32..half * 32 + 32];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let dl = d * f32::from(scales[is]);
                is += 1;
                let range = part * 16..part * 16 + 16;
                out.extend(q[range.clone()].iter().zip(&hmask[range]).map(|(v, m)| {
                    let low = i16::from((v >> shift) & 3);
                    let high = if (m >> bit) & 1 == 1 { 0 } else { 4 };
                    dl * f32::from(low - high)
                }));
            }
            bit += 1;
        }
    }
}

/// Scale and min number `j` (0..8) of a Q4_K/Q5_K block's 12 packed bytes (6 bits each).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 { (q[j] & 63, q[j + 4] & 63) } else { ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)) }
}

/// Q4_K: f16 d and dmin, 12 bytes of scales and mins, 128 bytes of nibbles; each 64 values
/// are 32 low nibbles then 32 high nibbles, each half with its own scale and min.
fn q4_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (half16(b, 0), half16(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for (chunk, q) in qs.chunks_exact(32).enumerate() {
        for (nibble, shift) in [(0, 0), (1, 4)] {
            let (sc, m) = scale_min_k4(2 * chunk + nibble, scales);
            let (dl, ml) = (d * f32::from(sc), dmin * f32::from(m));
            out.extend(q.iter().map(|v| dl * f32::from((v >> shift) & 0x0f) - ml));
        }
    }
}

/// Q5_K: as Q4_K, plus 32 bytes of fifth bits (bit 2k for the low half of chunk k, 2k+1 for
/// its high half).
fn q5_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (half16(b, 0), half16(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (chunk, q) in qs.chunks_exact(32).enumerate() {
        for (nibble, shift) in [(0, 0), (1, 4)] {
            let (sc, m) = scale_min_k4(2 * chunk + nibble, scales);
            let (dl, ml) = (d * f32::from(sc), dmin * f32::from(m));
            let bit = 2 * chunk + nibble;
            out.extend(q.iter().zip(qh).map(|(v, h)| {
                let fifth = if (h >> bit) & 1 == 1 { 16 } else { 0 };
                dl * f32::from(((v >> shift) & 0x0f) + fifth) - ml
            }));
        }
    }
}

/// Q6_K: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 signed scales, f16 d.
/// Each 128 values take 64 low bytes and 32 high bytes; a value is (6 bits - 32) d scale.
fn q6_k(b: &[u8], out: &mut Vec<f32>) {
    let (ql_all, qh_all, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half16(b, 208);
    for half in 0..2 {
        let (ql, qh) = (&ql_all[half * 64..half * 64 + 64], &qh_all[half * 32..half * 32 + 32]);
        let sc = &scales[half * 8..half * 8 + 8];
        let mut y = [0f32; 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = i16::from((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i16::from((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i16::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i16::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * f32::from(sc[is] as i8) * f32::from(q1);
            y[l + 32] = d * f32::from(sc[is + 2] as i8) * f32::from(q2);
            y[l + 64] = d * f32::from(sc[is + 4] as i8) * f32::from(q3);
            y[l + 96] = d * f32::from(sc[is + 6] as i8) * f32::from(q4);
        }
        out.extend_from_slice(&y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_built_q8_0_and_q4_1_block_dequantize_by_hand() {
        // Q8_0: d = 0.5, values -2, 0, 3, ...
        let mut block = f16::from_f32(0.5).to_le_bytes().to_vec();
        block.extend((0..32).map(|i| (i as i8 - 2) as u8));
        let values = dequantize(GgmlType::Q8_0, &block, 32).expect("dequantizes");
        assert_eq!(values[0], -1.0);
        assert_eq!(values[31], 14.5);
        // Q4_1: d = 2, m = -1; nibbles (1, 15) in the first byte.
        let mut block = f16::from_f32(2.0).to_le_bytes().to_vec();
        block.extend(f16::from_f32(-1.0).to_le_bytes());
        block.extend([0xf1u8].iter().chain(&[0u8; 15]));
        let values = dequantize(GgmlType::Q4_1, &block, 32).expect("dequantizes");
        assert_eq!((values[0], values[16], values[1]), (1.0, 29.0, -1.0));
    }

    #[test]
    fn a_wrong_byte_count_is_an_error_not_a_panic() {
        let err = dequantize(GgmlType::Q6K, &[0u8; 100], 256).expect_err("short");
        assert!(err.contains("100 bytes do not hold 256 values of type Q6_K"), "{err}");
        assert!(dequantize(GgmlType::Other(16), &[], 0).is_err());
    }
}
