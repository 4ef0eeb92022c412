//! JSON reports: every command collects the numbers it printed and writes them atomically
//! (`models::tmp::write_file`) so a crash never leaves a half-written report.

use anyhow::{Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

pub struct Report {
    root: Map<String, Value>,
}

impl Report {
    pub fn new() -> Self {
        let mut root = Map::new();
        root.insert(
            "mpolm_version".into(),
            Value::String(env!("CARGO_PKG_VERSION").into()),
        );
        Report { root }
    }

    pub fn set(&mut self, key: &str, v: Value) {
        self.root.insert(key.into(), v);
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(
            path,
            serde_json::to_string_pretty(&Value::Object(self.root.clone()))?.as_bytes(),
        )
    }
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create directory", dir.display()))?;
    }
    models::tmp::write_file(path, bytes)
        .with_context(|| format!("{}: cannot write", path.display()))
}
