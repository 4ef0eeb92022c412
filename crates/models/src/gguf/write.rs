//! The GGUF v3 file format, written: header (magic, version, counts), metadata key/values,
//! tensor infos (name, dimensions in ggml order, type id, offset), padding to the alignment,
//! then each tensor's bytes padded to the alignment. What goes in the file (which tensors, in
//! which types, which metadata) is the caller's; this module only lays it out.

use super::types;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use std::io::{Error, ErrorKind, Result, Write};

/// `general.alignment`'s default, which the writer uses (it writes no alignment key).
pub const ALIGNMENT: usize = 32;

/// One tensor's entry in the header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// torch order (`[out, in]`); the file stores it reversed (`ne[0]` = row length).
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
}

impl TensorInfo {
    pub fn elems(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the tensor's data (without padding).
    pub fn bytes(&self) -> usize {
        types::of(self.dtype).bytes_for(self.elems())
    }
}

/// GGUF value type ids (`enum gguf_type`).
pub fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_str<W: Write>(w: &mut W, s: &str) -> Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value<W: Write>(w: &mut W, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => w.write_all(&x.to_le_bytes()),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => write_str(w, s),
        Value::Array(a) => {
            // Element type of the first element (arrays are homogeneous); empty → string.
            let et = a.first().map_or(8, value_type);
            if a.iter().any(|x| value_type(x) != et) {
                return Err(Error::new(
                    ErrorKind::InvalidData,
                    "GGUF arrays must be homogeneous",
                ));
            }
            w.write_all(&et.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            for x in a {
                write_value(w, x)?;
            }
            Ok(())
        }
    }
}

fn padding(n: usize) -> usize {
    n.div_ceil(ALIGNMENT) * ALIGNMENT - n
}

/// Writes one GGUF file: the header when created, then the tensors' data in header order.
pub struct Writer<W: Write> {
    w: W,
    tensors: Vec<TensorInfo>,
    next: usize,
}

impl<W: Write> Writer<W> {
    /// Write the header, the metadata and the tensor infos (offsets follow from the order,
    /// sizes and types of `tensors`).
    pub fn new(mut w: W, meta: &[(String, Value)], tensors: Vec<TensorInfo>) -> Result<Self> {
        if let Some(t) = tensors.iter().find(|t| !types::of(t.dtype).write) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{}: GGUF files are not written in {}",
                    t.name,
                    types::of(t.dtype).name
                ),
            ));
        }
        let mut h: Vec<u8> = Vec::new();
        h.extend_from_slice(b"GGUF");
        h.extend_from_slice(&3u32.to_le_bytes());
        h.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        for (k, v) in meta {
            write_str(&mut h, k)?;
            h.extend_from_slice(&value_type(v).to_le_bytes());
            write_value(&mut h, v)?;
        }
        let mut offset = 0usize;
        for t in &tensors {
            write_str(&mut h, &t.name)?;
            h.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in t.shape.iter().rev() {
                h.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            h.extend_from_slice(&types::of(t.dtype).id.to_le_bytes());
            h.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += t.bytes() + padding(t.bytes());
        }
        h.resize(h.len() + padding(h.len()), 0);
        w.write_all(&h)?;
        Ok(Writer {
            w,
            tensors,
            next: 0,
        })
    }

    /// The tensor whose data comes next (None when all are written).
    pub fn next_tensor(&self) -> Option<&TensorInfo> {
        self.tensors.get(self.next)
    }

    /// The next tensor's data, exactly [`TensorInfo::bytes`] long.
    pub fn write_tensor(&mut self, data: &[u8]) -> Result<()> {
        let t = self.tensors.get(self.next).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                "more tensors than the header lists",
            )
        })?;
        if data.len() != t.bytes() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{}: {} bytes, expected {}", t.name, data.len(), t.bytes()),
            ));
        }
        self.w.write_all(data)?;
        self.w.write_all(&vec![0u8; padding(data.len())])?;
        self.next += 1;
        Ok(())
    }

    /// Flush and hand back the sink once every tensor is written.
    pub fn finish(mut self) -> Result<W> {
        if let Some(t) = self.next_tensor() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("tensor {} and later ones were never written", t.name),
            ));
        }
        self.w.flush()?;
        Ok(self.w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Content;

    /// A written file read back by candle's reader (an independent implementation of the
    /// format) and by `check_layout`: same metadata, shapes, types, offsets and bytes.
    #[test]
    fn written_file_reads_back() {
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("a.u32".to_string(), Value::U32(7)),
            ("a.f32".to_string(), Value::F32(0.5)),
            ("a.bool".to_string(), Value::Bool(true)),
            (
                "a.strs".to_string(),
                Value::Array(vec![Value::String("x".into()), Value::String("yz".into())]),
            ),
        ];
        let tensors = vec![
            TensorInfo {
                name: "n".into(),
                shape: vec![3],
                dtype: GgmlDType::F32,
            },
            TensorInfo {
                name: "w".into(),
                shape: vec![2, 32],
                dtype: GgmlDType::Q8_0,
            },
        ];
        let mut w = Writer::new(Vec::new(), &meta, tensors).unwrap();
        let f: Vec<u8> = [1f32, 2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert!(w.write_tensor(&f[..8]).is_err(), "short data is refused");
        w.write_tensor(&f).unwrap();
        assert_eq!(w.next_tensor().map(|t| t.name.as_str()), Some("w"));
        let q: Vec<u8> = (0..68u8).collect();
        w.write_tensor(&q).unwrap();
        assert!(w.write_tensor(&q).is_err(), "one tensor too many");
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % ALIGNMENT, 0);

        let data = super::super::check_layout(&mut bytes.as_slice(), bytes.len() as u64).unwrap();
        let c = Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
        assert_eq!(c.tensor_data_offset, data);
        assert_eq!(c.metadata.len(), meta.len());
        assert_eq!(
            c.metadata["a.strs"].to_vec().unwrap()[1]
                .to_string()
                .unwrap(),
            "yz"
        );
        assert_eq!(c.metadata["a.f32"].to_f32().unwrap(), 0.5);
        let wi = &c.tensor_infos["w"];
        assert_eq!(
            (wi.shape.dims(), wi.ggml_dtype),
            (&[2, 32][..], GgmlDType::Q8_0)
        );
        assert_eq!(wi.offset, 32, "the 12 bytes of 'n' padded to the alignment");
        let at = (data + wi.offset) as usize;
        assert_eq!(&bytes[at..at + 68], q.as_slice());
        let at = (data + c.tensor_infos["n"].offset) as usize;
        assert_eq!(&bytes[at..at + 12], f.as_slice());
    }

    #[test]
    fn unwritable_types_and_missing_tensors_are_refused() {
        let info = |dtype| TensorInfo {
            name: "t".into(),
            shape: vec![256],
            dtype,
        };
        assert!(Writer::new(Vec::new(), &[], vec![info(GgmlDType::Q8K)]).is_err());
        let w = Writer::new(Vec::new(), &[], vec![info(GgmlDType::Q4K)]).unwrap();
        assert!(w.finish().is_err());
    }
}
