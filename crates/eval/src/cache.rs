//! Request cache: every log-likelihood and generation result, kept on disk under a fingerprint
//! of everything that decides the numbers (model bytes, program build, batching, weight mode),
//! so an interrupted evaluation re-run skips what was done and reports the identical result.
//!
//! One append-only JSON-lines file per fingerprint. A line is written only after its work unit
//! (a scored batch, a finished generation) is complete, in one `write` on an `O_APPEND` file, so
//! a kill leaves at most one torn last line, which reading skips. Scores are stored as the bit
//! pattern of the f64 so a cached value is the computed value exactly.

use crate::lm::{GenOutput, Score};
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Bumped whenever the key or line format changes, so old files are never misread.
const FORMAT: &str = "mpolm-eval-cache-1";

pub type Key = [u8; 32];

#[derive(Clone, Debug)]
enum Entry {
    Score(Score),
    Gen(GenOutput),
}

pub struct RequestCache {
    path: PathBuf,
    map: Mutex<HashMap<Key, Entry>>,
    file: Mutex<std::fs::File>,
    hits: AtomicUsize,
    written: AtomicUsize,
    /// Lines to write before failing as an interrupted run would (tests of resumption).
    stop_after: Option<usize>,
}

impl std::fmt::Debug for RequestCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestCache")
            .field("path", &self.path)
            .field("results", &self.len())
            .finish()
    }
}

/// sha256 of a fingerprint made of named parts, as lowercase hex.
pub fn fingerprint(parts: &[(&str, String)]) -> String {
    let mut h = Sha256::new();
    h.update(FORMAT.as_bytes());
    for (k, v) in parts {
        for s in [k.as_bytes(), v.as_bytes()] {
            h.update((s.len() as u64).to_le_bytes());
            h.update(s);
        }
    }
    hex(&h.finalize())
}

/// sha256 of a file's bytes, as lowercase hex (the model cache's own check).
pub fn hash_file(p: &Path) -> Result<String> {
    Ok(models::hub::sha256_file(p)?)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn put_tokens(h: &mut Sha256, ids: &[u32]) {
    h.update((ids.len() as u64).to_le_bytes());
    for t in ids {
        h.update(t.to_le_bytes());
    }
}

/// Key of a scored row: its input tokens and targets.
pub fn score_key(input: &[u32], targets: &[u32]) -> Key {
    let mut h = Sha256::new();
    h.update(b"loglikelihood");
    put_tokens(&mut h, input);
    put_tokens(&mut h, targets);
    h.finalize().into()
}

/// Key of a generation: its context tokens (after truncation), stop strings and budget.
pub fn gen_key(context: &[u32], until: &[String], max_new_tokens: usize) -> Key {
    let mut h = Sha256::new();
    h.update(b"generate_until");
    put_tokens(&mut h, context);
    h.update((until.len() as u64).to_le_bytes());
    for u in until {
        h.update((u.len() as u64).to_le_bytes());
        h.update(u.as_bytes());
    }
    h.update((max_new_tokens as u64).to_le_bytes());
    h.finalize().into()
}

fn parse_line(line: &str) -> Option<(Key, Entry)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let key: Key = unhex(v["k"].as_str()?)?.try_into().ok()?;
    let entry = if let Some(bits) = v["ll"].as_str() {
        Entry::Score(Score {
            logprob: f64::from_bits(u64::from_str_radix(bits, 16).ok()?),
            greedy: v["greedy"].as_bool()?,
        })
    } else {
        let g = &v["gen"];
        Entry::Gen(GenOutput {
            text: g["text"].as_str()?.to_string(),
            new_tokens: usize::try_from(g["new_tokens"].as_u64()?).ok()?,
            stopped_by: g["stopped_by"].as_str()?.to_string(),
        })
    };
    Some((key, entry))
}

fn line(key: &Key, e: &Entry) -> String {
    let v = match e {
        Entry::Score(s) => serde_json::json!({
            "k": hex(key), "ll": format!("{:016x}", s.logprob.to_bits()), "greedy": s.greedy,
        }),
        Entry::Gen(g) => serde_json::json!({"k": hex(key), "gen": g}),
    };
    let mut s = v.to_string();
    s.push('\n');
    s
}

impl RequestCache {
    /// Open (creating) the cache file `<dir>/<fingerprint>/requests.jsonl` and read what it
    /// holds. `about` is written beside it once, for people looking at the folder.
    pub fn open(dir: &Path, fingerprint: &str, about: &serde_json::Value) -> Result<Self> {
        let folder = dir.join(fingerprint);
        std::fs::create_dir_all(&folder).map_err(|e| Error::io(&folder, e))?;
        let about_path = folder.join("about.json");
        if !about_path.exists() {
            let _ = models::tmp::write_file(&about_path, format!("{about:#}\n").as_bytes());
        }
        Self::open_file(&folder.join("requests.jsonl"))
    }

    /// Open (creating) one cache file.
    pub fn open_file(path: &Path) -> Result<Self> {
        let text = match std::fs::read(path) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(path, e)),
        };
        let map: HashMap<Key, Entry> = text.lines().filter_map(parse_line).collect();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        // A torn last line (a killed run) must not swallow the next record.
        if !text.is_empty() && !text.ends_with('\n') {
            file.write_all(b"\n").map_err(|e| Error::io(path, e))?;
        }
        Ok(RequestCache {
            path: path.to_path_buf(),
            map: Mutex::new(map),
            file: Mutex::new(file),
            hits: AtomicUsize::new(0),
            written: AtomicUsize::new(0),
            stop_after: None,
        })
    }

    /// Fail with an "interrupted" error once `n` more lines were written, as a run killed at
    /// that point would stop (for testing resumption).
    pub fn stop_after(mut self, n: usize) -> Self {
        self.stop_after = Some(n);
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Results read or written so far.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Requests answered from the cache in this process.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }

    /// Results written in this process.
    pub fn written(&self) -> usize {
        self.written.load(Ordering::Relaxed)
    }

    fn get(&self, k: &Key) -> Option<Entry> {
        let e = self.map.lock().ok()?.get(k).cloned();
        if e.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        e
    }

    /// The cached scores of all `keys`, or None if any is missing (a work unit is redone whole,
    /// so its numbers come from the same computation as an uninterrupted run's).
    pub fn scores(&self, keys: &[Key]) -> Option<Vec<Score>> {
        let m = self.map.lock().ok()?;
        let out: Option<Vec<Score>> = keys
            .iter()
            .map(|k| match m.get(k) {
                Some(Entry::Score(s)) => Some(*s),
                _ => None,
            })
            .collect();
        if out.is_some() {
            self.hits.fetch_add(keys.len(), Ordering::Relaxed);
        }
        out
    }

    pub fn generation(&self, k: &Key) -> Option<GenOutput> {
        match self.get(k)? {
            Entry::Gen(g) => Some(g),
            Entry::Score(_) => None,
        }
    }

    pub fn put_scores(&self, items: &[(Key, Score)]) -> Result<()> {
        let entries: Vec<(Key, Entry)> =
            items.iter().map(|(k, s)| (*k, Entry::Score(*s))).collect();
        self.append(entries)
    }

    pub fn put_generation(&self, k: Key, g: &GenOutput) -> Result<()> {
        self.append(vec![(k, Entry::Gen(g.clone()))])
    }

    fn append(&self, entries: Vec<(Key, Entry)>) -> Result<()> {
        if let Some(n) = self.stop_after {
            if self.written() >= n {
                return Err(Error::Msg(format!(
                    "evaluation interrupted after {n} cached results"
                )));
            }
        }
        let buf: String = entries.iter().map(|(k, e)| line(k, e)).collect();
        {
            let mut f = self
                .file
                .lock()
                .map_err(|_| Error::Msg("internal: cache file lock poisoned".into()))?;
            f.write_all(buf.as_bytes())
                .map_err(|e| Error::io(&self.path, e))?;
        }
        self.written.fetch_add(entries.len(), Ordering::Relaxed);
        if let Ok(mut m) = self.map.lock() {
            m.extend(entries);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_exactly_and_torn_lines_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.jsonl");
        let c = RequestCache::open_file(&p).unwrap();
        // A value whose shortest decimal form is not how it was computed would break here.
        let s = Score {
            logprob: -(0.1f64 + 0.2) * 1e-300_f64.sqrt(),
            greedy: false,
        };
        let k1 = score_key(&[1, 2, 3], &[3]);
        let k2 = gen_key(&[5, 6], &["\n\n".into()], 7);
        let g = GenOutput {
            text: "a \"b\"\n".into(),
            new_tokens: 3,
            stopped_by: "eos".into(),
        };
        c.put_scores(&[(k1, s)]).unwrap();
        c.put_generation(k2, &g).unwrap();
        drop(c);
        // Tear the file in the middle of a record, as a kill during a write would.
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.extend_from_slice(br#"{"k":"00ff","ll":"3ff"#);
        std::fs::write(&p, &bytes).unwrap();
        let c = RequestCache::open_file(&p).unwrap();
        assert_eq!(c.len(), 2);
        let got = c.scores(&[k1]).unwrap();
        assert_eq!(got[0].logprob.to_bits(), s.logprob.to_bits());
        assert!(!got[0].greedy);
        let gg = c.generation(&k2).unwrap();
        assert_eq!((gg.text.as_str(), gg.new_tokens), (g.text.as_str(), 3));
        // A missing key makes the whole unit a miss.
        assert!(c.scores(&[k1, score_key(&[1], &[2])]).is_none());
        // The next record after the torn line is readable.
        let k3 = score_key(&[9], &[9]);
        c.put_scores(&[(k3, s)]).unwrap();
        drop(c);
        assert_eq!(RequestCache::open_file(&p).unwrap().len(), 3);
    }

    #[test]
    fn keys_separate_fields() {
        // Length prefixes keep ([1,2],[3]) and ([1],[2,3]) apart.
        assert_ne!(score_key(&[1, 2], &[3]), score_key(&[1], &[2, 3]));
        assert_ne!(
            gen_key(&[1], &["ab".into()], 4),
            gen_key(&[1], &["a".into(), "b".into()], 4)
        );
        assert_ne!(gen_key(&[1], &[], 4), gen_key(&[1], &[], 5));
        assert_ne!(
            fingerprint(&[("a", "bc".into())]),
            fingerprint(&[("ab", "c".into())])
        );
    }
}
