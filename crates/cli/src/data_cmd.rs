//! `mpolm data [--data-dir DIR] [--verify]`: which data folder commands use and where that
//! choice came from, the datasets it holds, and (with --verify) every file against SHA256SUMS.

use crate::report::Report;
use anyhow::Result;
use data::DATASETS;
use serde_json::json;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct DataArgs {
    /// Data folder to describe (default: $MPOLM_DATA when set, else the project's data/).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Check the sha256 of every file listed in the folder's SHA256SUMS.
    #[arg(long)]
    pub verify: bool,
}

pub fn run(a: DataArgs, rep: &mut Report) -> Result<()> {
    let (dir, origin) = data::resolve(a.data_dir.as_deref());
    let how = match origin {
        data::DataOrigin::Flag => "--data-dir".to_string(),
        data::DataOrigin::Env => format!("${}", data::DATA_ENV),
        data::DataOrigin::Project => "the project's own data/".to_string(),
    };
    println!("data folder: {} (from {how})", dir.display());
    data::require(&dir)?;
    let mut sets = vec![];
    println!("{:<16} {:<6} {:>10}  used by", "dataset", "files", "bytes");
    for d in DATASETS {
        let folder = dir.join(d.folder);
        let present: Vec<&str> = d
            .files
            .iter()
            .copied()
            .filter(|f| folder.join(f).is_file())
            .collect();
        let bytes: u64 = walk(&folder).iter().map(|(_, n)| n).sum();
        println!(
            "{:<16} {:<6} {:>10}  {}",
            d.name,
            format!("{}/{}", present.len(), d.files.len()),
            bytes,
            used_by(d.name)
        );
        sets.push(json!({
            "name": d.name, "folder": d.folder, "expected_files": d.files,
            "present_files": present, "bytes": bytes, "used_by": used_by(d.name),
        }));
    }
    let sums = data::read_checksums(&dir)?;
    let mut verify = serde_json::Value::Null;
    if a.verify {
        anyhow::ensure!(
            !sums.is_empty(),
            "{}: no SHA256SUMS in this data folder, so there is nothing to verify against",
            dir.display()
        );
        let pb = eval::lm::progress_bar(sums.len() as u64, "verifying", true);
        let mut bad = vec![];
        for (f, want) in &sums {
            let p = dir.join(f);
            let got = match p.is_file() {
                true => eval::cache::hash_file(&p)?,
                false => "missing".into(),
            };
            if &got != want {
                bad.push(format!("{f} ({got})"));
            }
            if let Some(pb) = &pb {
                pb.inc(1);
            }
        }
        if let Some(pb) = pb {
            pb.finish_and_clear();
        }
        println!(
            "verified {} files against SHA256SUMS: {} differ",
            sums.len(),
            bad.len()
        );
        verify = json!({"files": sums.len(), "differ": bad});
        anyhow::ensure!(
            bad.is_empty(),
            "{}: {} file(s) differ from SHA256SUMS, first {}; restore them from the repository (git checkout -- data) or fetch the dataset again",
            dir.display(),
            bad.len(),
            bad[0]
        );
    }
    rep.set("command", json!("data"));
    rep.set("data_dir", json!(dir));
    rep.set("origin", json!(origin.name()));
    rep.set("datasets", json!(sets));
    rep.set("checksums_listed", json!(sums.len()));
    rep.set("verify", verify);
    Ok(())
}

/// The commands that read a dataset (a dataset the CLI does not know of is listed as unused).
fn used_by(dataset: &str) -> &'static str {
    match dataset {
        "wikitext2" => "eval --task wikitext2; GPTQ calibration and quantize perplexity",
        "mmlu" => "eval --task mmlu, mmlu_<subject>, mmlu_<category>",
        "gsm8k" => "eval --task gsm8k",
        "ifeval" => "eval --task ifeval",
        "sst2" => "eval --task sst2; finetune --task sst2",
        "tinyshakespeare" => "finetune --task lm examples",
        _ => "-",
    }
}

/// (path, bytes) of the regular files under `dir` (three levels deep at most).
fn walk(dir: &std::path::Path) -> Vec<(PathBuf, u64)> {
    fn go(d: &std::path::Path, depth: usize, out: &mut Vec<(PathBuf, u64)>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            match e.metadata() {
                Ok(m) if m.is_file() => out.push((p, m.len())),
                Ok(m) if m.is_dir() && depth < 3 => go(&p, depth + 1, out),
                _ => {}
            }
        }
    }
    let mut out = vec![];
    go(dir, 0, &mut out);
    out
}
