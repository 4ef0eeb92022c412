//! Reading model files that came from strangers: the ceilings every loader checks sizes
//! against, opening only regular files (a FIFO or device named as a model would block a read
//! forever or never end), bounded text reads, and escaping of file-supplied text before it is
//! put into a message (a GGUF `general.architecture` may hold NULs or terminal escapes).
//!
//! The ceilings sit well above every released model of the architectures mpolm runs and far
//! below what would exhaust memory; the README's "Guarantees and limits" lists them.

use crate::{Error, Result};
use std::io::Read;
use std::path::Path;

/// Decoder/encoder layers (the deepest released dense models have ~130).
pub const MAX_LAYERS: usize = 1024;
/// Context length (positions of the RoPE / position tables): 2^20 covers 1M-token models; at
/// head_dim 128 the RoPE tables then take 512 MiB, which is the price of such a config.
pub const MAX_CONTEXT: usize = 1 << 20;
/// Vocabulary size (released models: up to ~260k).
pub const MAX_VOCAB: usize = 1 << 22;
/// Hidden / intermediate width.
pub const MAX_WIDTH: usize = 1 << 18;
/// Attention heads (query or key/value).
pub const MAX_HEADS: usize = 1 << 12;
/// Per-head dimension.
pub const MAX_HEAD_DIM: usize = 1 << 12;
/// Elements of one weight matrix that a factored checkpoint (MPO) may contract to; 2^31
/// f32 values are 8 GiB, above any layer of a released model mpolm can run (a 128k × 8k
/// embedding is 2^30).
pub const MAX_MATRIX_ELEMS: usize = 1 << 31;
/// Labels of a classification head.
pub const MAX_LABELS: usize = 1 << 16;
/// Config / manifest / tokenizer-config JSON files.
pub const MAX_JSON_BYTES: u64 = 64 << 20;
/// tokenizer.json (large multilingual vocabularies reach ~35 MB).
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;
/// GGUF: tensors per file, metadata entries per file, array elements summed over all
/// metadata (vocab + merges + token types of a 256k vocabulary is under 1M), and the longest
/// key or tensor name.
pub const MAX_GGUF_TENSORS: u64 = 1 << 20;
pub const MAX_GGUF_KV: u64 = 1 << 16;
pub const MAX_GGUF_ARRAY_TOTAL: u64 = 1 << 23;
pub const MAX_GGUF_NAME: u64 = 1 << 10;
/// Largest `general.alignment` (the format's default is 32).
pub const MAX_GGUF_ALIGNMENT: u64 = 1 << 16;
/// Chat templates: instructions one render may execute (minijinja fuel; real templates use a
/// few thousand per conversation) and bytes it may produce.
pub const TEMPLATE_FUEL: u64 = 5_000_000;
pub const MAX_TEMPLATE_OUTPUT: usize = 16 << 20;
/// LoRA adapters whose base is itself an adapter, followed at most this deep.
pub const MAX_ADAPTER_DEPTH: usize = 8;

/// `s` with control characters (C0, DEL, C1: NUL, ESC, CR, …) and invisible bidirectional /
/// zero-width format characters written as `\u{..}` escapes, cut to 200 characters: what a
/// message may show of text taken from a file.
pub fn escape(s: &str) -> String {
    const MAX: usize = 200;
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == MAX {
            out.push('…');
            break;
        }
        let invisible = matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}');
        if c.is_control() || invisible {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Refuse anything but a regular file (following symlinks) before it is opened: opening a
/// FIFO blocks until a writer appears, and a character device never ends.
pub fn check_regular(path: &Path) -> Result<std::fs::Metadata> {
    let md = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !md.is_file() {
        let ft = md.file_type();
        let what = if ft.is_dir() {
            "a directory"
        } else {
            special_kind(&ft)
        };
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("is {what}, not a regular file; pass a model file or directory"),
            ),
        ));
    }
    Ok(md)
}

#[cfg(unix)]
fn special_kind(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() || ft.is_block_device() {
        "a device"
    } else {
        "not a plain file"
    }
}

#[cfg(not(unix))]
fn special_kind(_: &std::fs::FileType) -> &'static str {
    "a special file"
}

/// Open a regular file for reading (see [`check_regular`]); returns it with its size.
pub fn open_regular(path: &Path) -> Result<(std::fs::File, u64)> {
    check_regular(path)?;
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    Ok((f, len))
}

/// A regular UTF-8 text file of at most `max` bytes.
pub fn read_text(path: &Path, max: u64) -> Result<String> {
    let (f, len) = open_regular(path)?;
    if len > max {
        return Err(Error::config(
            path,
            format!(
                "file is {len} bytes, over the {} MiB limit for this kind of file",
                max >> 20
            ),
        ));
    }
    let mut text = String::new();
    // take(): the file may grow between the size check and the read.
    f.take(max + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(path, e))?;
    if text.len() as u64 > max {
        return Err(Error::config(
            path,
            "file grew past its size limit while read",
        ));
    }
    Ok(text)
}

/// `base.join(rel)` when `rel` is a plain relative path that stays inside `base` (no root,
/// no `..`, no drive prefix): how files named inside a model directory are resolved.
pub fn confined_join(base: &Path, rel: &str) -> Option<std::path::PathBuf> {
    use std::path::Component;
    let p = Path::new(rel);
    if rel.is_empty() || rel.contains('\0') {
        return None;
    }
    if p.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        Some(base.join(p))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_control_and_bidi_characters() {
        assert_eq!(escape("llama"), "llama");
        assert_eq!(escape("a\0b\x1b[31m"), "a\\u{0}b\\u{1b}[31m");
        assert_eq!(escape("x\u{202e}y\u{85}"), "x\\u{202e}y\\u{85}");
        assert_eq!(escape("ünï"), "ünï");
        let long = "a".repeat(500);
        assert_eq!(escape(&long).chars().count(), 201);
    }

    #[test]
    fn confined_join_refuses_escapes() {
        let b = Path::new("m");
        assert_eq!(
            confined_join(b, "x.safetensors"),
            Some(Path::new("m/x.safetensors").into())
        );
        assert_eq!(
            confined_join(b, "sub/x.safetensors"),
            Some(Path::new("m/sub/x.safetensors").into())
        );
        for bad in ["../x", "/etc/passwd", "a/../../x", "", "a\0b"] {
            assert_eq!(confined_join(b, bad), None, "{bad}");
        }
    }
}
