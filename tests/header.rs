//! The checked-in C header is exactly what the pinned cbindgen generates from the source.
//! Run with `ETLLM_BLESS_HEADER=1` (tools/gen-header.sh) to rewrite it.

use std::path::PathBuf;

#[test]
fn checked_in_header_matches_cbindgen_output() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(&root)
        .with_config(config)
        .generate()
        .expect("cbindgen failed")
        .write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    let path = root.join("include/etllm.h");
    if std::env::var_os("ETLLM_BLESS_HEADER").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "include/etllm.h is out of date: run tools/gen-header.sh and commit the result"
    );
}
