//! `mpolm fetch [MODEL] [--verify]`: download a model by alias into the cache, or list the
//! aliases without MODEL.

use crate::report::Report;
use anyhow::Result;
use models::hub;
use serde_json::json;

#[derive(clap::Args)]
pub struct FetchArgs {
    pub model: Option<String>,
    /// Re-hash the cached files (sha256) even when their size and time are unchanged;
    /// a corrupted file is fetched again.
    #[arg(long)]
    pub verify: bool,
}

pub fn run(a: FetchArgs, rep: &mut Report) -> Result<()> {
    let FetchArgs { model, verify } = a;
    let Some(model) = model else {
        println!("{:<14} {:<7} {}", "alias", "format", "description");
        for s in hub::MODELS {
            println!(
                "{:<14} {:<7} {}",
                s.alias,
                format!("{:?}", s.format).to_lowercase(),
                s.description
            );
        }
        rep.set(
            "aliases",
            json!(hub::MODELS.iter().map(|s| s.alias).collect::<Vec<_>>()),
        );
        return Ok(());
    };
    let t0 = std::time::Instant::now();
    let src = match hub::spec(&model) {
        Some(s) if verify => hub::fetch_with_options(
            s,
            &hub::cache_dir(),
            &hub::FetchOptions {
                verify: true,
                ..Default::default()
            },
        )?,
        _ => hub::resolve(&model, true)?,
    };
    let size = dir_size(&src.path);
    println!(
        "{} -> {} ({:.1} MB)",
        model,
        src.path.display(),
        size as f64 / 1e6
    );
    rep.set("command", json!("fetch"));
    rep.set("model", json!(model));
    rep.set("path", json!(src.path));
    rep.set("format", json!(src.format));
    rep.set("bytes", json!(size));
    rep.set("seconds", json!(t0.elapsed().as_secs_f64()));
    Ok(())
}

fn dir_size(p: &std::path::Path) -> u64 {
    if p.is_file() {
        return p.metadata().map(|m| m.len()).unwrap_or(0);
    }
    std::fs::read_dir(p)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| dir_size(&e.path())).sum())
        .unwrap_or(0)
}
