//! The committed CRD must be exactly what the Rust types generate.

#[test]
fn committed_crd_matches_the_rust_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/job.yaml");
    let generated = jobico_model::crd::crd_yaml();
    if std::env::var_os("JOBICO_BLESS").is_some() {
        std::fs::write(path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "crds/job.yaml is out of date: run `cargo run -p jobico -- crd > crds/job.yaml`"
    );
}
