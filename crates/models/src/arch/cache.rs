//! The per-layer key/value cache every decoder shares.

use crate::Result;
use candle_core::{Device, Tensor};

/// Per-layer key/value cache for incremental decoding.
#[derive(Debug, Clone)]
pub struct Cache {
    pub(crate) kv: Vec<Option<KvBuf>>,
    pub seq_len: usize,
}

/// One layer's keys and values, [b, capacity, kv_heads, head_dim] with the first `len`
/// positions filled: a decode step writes its position in place instead of concatenating the
/// whole cache into a new tensor, and for b = 1 the filled part is a contiguous prefix that the
/// fused attention reads without a copy. Capacity doubles when full.
#[derive(Debug)]
pub struct KvBuf {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl Clone for KvBuf {
    // Appends write into the buffers, so clones (a shared few-shot prefix extended per choice)
    // must not share them.
    fn clone(&self) -> Self {
        self.resized(self.k.dims()[1]).expect("copy a KV cache")
    }
}

impl KvBuf {
    /// New buffers of `cap` (≥ len) positions holding this one's filled prefix.
    fn resized(&self, cap: usize) -> Result<KvBuf> {
        let (b, _, nkv, hd) = self.k.dims4()?;
        let copy = |t: &Tensor| -> Result<Tensor> {
            let c = Tensor::zeros((b, cap, nkv, hd), t.dtype(), t.device())?;
            if self.len > 0 {
                c.slice_set(&t.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            }
            Ok(c)
        };
        Ok(KvBuf {
            k: copy(&self.k)?,
            v: copy(&self.v)?,
            len: self.len,
        })
    }

    /// Append k/v [b, t, kv_heads, hd] and return all filled positions [b, len, kv_heads, hd].
    pub fn append(slot: &mut Option<KvBuf>, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t, nkv, hd) = k.dims4()?;
        let len = slot.as_ref().map_or(0, |s| s.len);
        let need = len + t;
        let cap = need.next_power_of_two().max(64);
        match slot {
            None => {
                *slot = Some(KvBuf {
                    k: Tensor::zeros((b, cap, nkv, hd), k.dtype(), k.device())?,
                    v: Tensor::zeros((b, cap, nkv, hd), v.dtype(), v.device())?,
                    len: 0,
                })
            }
            Some(s) if s.k.dim(1)? < need => *s = s.resized(cap)?,
            Some(_) => {}
        }
        let s = slot.as_mut().expect("allocated above");
        s.k.slice_set(&k.contiguous()?, 1, len)?;
        s.v.slice_set(&v.contiguous()?, 1, len)?;
        s.len = need;
        Ok((s.k.narrow(1, 0, need)?, s.v.narrow(1, 0, need)?))
    }
}

impl Cache {
    pub fn new(n_layers: usize) -> Self {
        Cache {
            kv: vec![None; n_layers],
            seq_len: 0,
        }
    }

    /// Batch rows of the cache (every layer's buffers).
    pub fn rows(&self) -> usize {
        self.kv.iter().flatten().next().map_or(0, |s| s.k.dims()[0])
    }

    /// A cache of `b` rows, each a copy of this single-row cache: a shared prompt prefix run
    /// once, then extended by `b` different continuations.
    pub fn repeat(&self, b: usize) -> Result<Cache> {
        self.map(|t| {
            let (rows, cap, nkv, hd) = t.dims4()?;
            if rows != 1 {
                crate::bail!("only a single-row cache can be repeated");
            }
            Ok(t.broadcast_as((b, cap, nkv, hd))?.contiguous()?)
        })
    }

    /// The cache of the batch rows `rows`, in that order (drops finished generations from a
    /// batch).
    pub fn select_rows(&self, rows: &[u32]) -> Result<Cache> {
        let idx = Tensor::new(rows, &Device::Cpu)?;
        self.map(|t| Ok(t.index_select(&idx, 0)?))
    }

    /// Overwrite positions `from .. from + len` of batch row `row` with those of the
    /// single-row cache `src`, in place (a new request joining a decoding batch in a freed row).
    pub fn write_row(&mut self, row: usize, src: &Cache, from: usize, len: usize) -> Result<()> {
        if src.kv.len() != self.kv.len() || src.seq_len < from + len || self.seq_len < from + len {
            crate::bail!(
                "write_row: positions {from}..{} do not fit both caches",
                from + len
            );
        }
        for (d, s) in self.kv.iter().zip(&src.kv) {
            let (Some(d), Some(s)) = (d, s) else {
                crate::bail!("write_row: a layer has no cache yet");
            };
            for (dt, st) in [(&d.k, &s.k), (&d.v, &s.v)] {
                let (b, cap, nkv, hd) = dt.dims4()?;
                if row >= b || st.dim(0)? != 1 || !dt.is_contiguous() {
                    crate::bail!("write_row: row {row} of a {b}-row cache from a 1-row one");
                }
                let block = st.narrow(1, from, len)?.contiguous()?.flatten_all()?;
                // A contiguous tensor's flat view shares its storage, so this writes in place.
                dt.flatten_all()?
                    .slice_set(&block, 0, (row * cap + from) * nkv * hd)?;
            }
        }
        Ok(())
    }

    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Cache> {
        let mut kv = Vec::with_capacity(self.kv.len());
        for s in &self.kv {
            kv.push(match s {
                Some(s) => Some(KvBuf {
                    k: f(&s.k)?,
                    v: f(&s.v)?,
                    len: s.len,
                }),
                None => None,
            });
        }
        Ok(Cache {
            kv,
            seq_len: self.seq_len,
        })
    }
}

/// One layer's slot in a [`Cache`]: empty until the first forward with a cache.
pub type KvSlot = Option<KvBuf>;
