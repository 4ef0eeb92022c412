//! AutoGPTQ v1 ("gptq" checkpoint format) bit packing.
//!
//! `qweight` int32 [in·bits/32, out]: the codes of one output column j, taken in input order
//! i = 0, 1, …, form one little-endian bit stream of `bits`-bit fields spread over the column's
//! words (word row r holds bits 32r…32r+31). For 2/4/8 bits this is "32/bits consecutive input rows
//! per word, low bits first"; for 3 bits it is exactly AutoGPTQ's 3-word/32-value scheme (value
//! 10 split 2+1 bits over words 0/1, value 21 split 1+2 bits over words 1/2).
//! `qzeros` int32 [groups, out·bits/32]: the same stream along the output axis, storing zero − 1.
//! Dequantisation: W[i, j] = scales[g_idx[i], j] · (q[i, j] − (qzeros[g_idx[i], j] + 1)).

use super::{Error, Result};

pub fn check_bits(bits: u32) -> Result<()> {
    if matches!(bits, 2 | 3 | 4 | 8) {
        Ok(())
    } else {
        Err(Error::Msg(format!(
            "unsupported bit width {bits}: choose 2, 3, 4 or 8"
        )))
    }
}

/// Pack `vals` (each < 2^bits) laid out [n, cols] (n along the packed axis) into words
/// [n·bits/32, cols]: the packing AutoGPTQ applies to qweight (n = in, cols = out).
pub fn pack_rows(vals: &[u32], n: usize, cols: usize, bits: u32) -> Result<Vec<u32>> {
    check_bits(bits)?;
    let b = bits as usize;
    if (n * b) % 32 != 0 {
        return Err(Error::Msg(format!("{n} values of {bits} bits do not fill whole 32-bit words (need {n}·{bits} divisible by 32)")));
    }
    if vals.len() != n * cols {
        return Err(Error::Msg(format!(
            "pack: {} values given for a {n}×{cols} matrix",
            vals.len()
        )));
    }
    let rows = n * b / 32;
    let mask = (1u64 << b) - 1;
    let mut out = vec![0u32; rows * cols];
    for i in 0..n {
        let bit = i * b;
        let (r, s) = (bit / 32, bit % 32);
        for j in 0..cols {
            let v = vals[i * cols + j] as u64;
            if v > mask {
                return Err(Error::Msg(format!(
                    "pack: value {v} at ({i}, {j}) does not fit in {bits} bits"
                )));
            }
            let sh = v << s;
            out[r * cols + j] |= sh as u32;
            if s + b > 32 {
                out[(r + 1) * cols + j] |= (sh >> 32) as u32;
            }
        }
    }
    Ok(out)
}

/// Value (i, j) of a row-packed matrix with `cols` columns.
#[inline]
pub fn get_row_packed(words: &[u32], cols: usize, bits: u32, i: usize, j: usize) -> u32 {
    let b = bits as usize;
    let bit = i * b;
    let (r, s) = (bit / 32, bit % 32);
    let mut v = (words[r * cols + j] as u64) >> s;
    if s + b > 32 {
        v |= (words[(r + 1) * cols + j] as u64) << (32 - s);
    }
    (v & ((1u64 << b) - 1)) as u32
}

/// Inverse of [`pack_rows`]: [n, cols] values.
pub fn unpack_rows(words: &[u32], n: usize, cols: usize, bits: u32) -> Result<Vec<u32>> {
    check_bits(bits)?;
    if (n * bits as usize) % 32 != 0 || words.len() != n * bits as usize / 32 * cols {
        return Err(Error::Msg(format!(
            "unpack: {} words do not hold a {n}×{cols} matrix of {bits}-bit values",
            words.len()
        )));
    }
    let mut out = Vec::with_capacity(n * cols);
    for i in 0..n {
        for j in 0..cols {
            out.push(get_row_packed(words, cols, bits, i, j));
        }
    }
    Ok(out)
}

/// Pack along the last axis: `vals` [rows, n] → [rows, n·bits/32] (AutoGPTQ's qzeros packing).
pub fn pack_cols(vals: &[u32], rows: usize, n: usize, bits: u32) -> Result<Vec<u32>> {
    let t = transpose(vals, rows, n);
    let p = pack_rows(&t, n, rows, bits)?; // [n·bits/32, rows]
    Ok(transpose(&p, n * bits as usize / 32, rows))
}

/// Inverse of [`pack_cols`].
pub fn unpack_cols(words: &[u32], rows: usize, n: usize, bits: u32) -> Result<Vec<u32>> {
    check_bits(bits)?;
    let wn = n * bits as usize / 32;
    if words.len() != rows * wn {
        return Err(Error::Msg(format!(
            "unpack: {} words do not hold a {rows}×{n} matrix of {bits}-bit values",
            words.len()
        )));
    }
    let t = transpose(words, rows, wn);
    let u = unpack_rows(&t, n, rows, bits)?;
    Ok(transpose(&u, n, rows))
}

pub fn transpose<T: Copy>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(v.len());
    for j in 0..cols {
        for i in 0..rows {
            out.push(v[i * cols + j]);
        }
    }
    out
}
