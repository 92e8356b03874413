//! The committed sample modules and their ConfigMaps must match their WAT sources
//! (`scripts/build-samples.sh` rebuilds them).

use std::path::PathBuf;

use jobico_model::Manifest;

fn samples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../samples")
}

#[test]
fn sample_modules_match_their_sources_and_config_maps() {
    let mut manifest = Manifest::default();
    manifest.read_path(&samples()).unwrap();
    for (module, job) in [
        ("echo", "job-for-ev1"),
        ("logecho", "job-for-ev2"),
        ("printenv", "job-for-ev3"),
        ("order", "job-for-orders"),
        ("echo", "job-for-orders"),
        ("echo", "job-for-ship"),
    ] {
        let built = wat::parse_file(samples().join(format!("{module}.wat"))).unwrap();
        let committed = std::fs::read(samples().join(format!("{module}.wasm"))).unwrap();
        assert!(
            built == committed,
            "samples/{module}.wasm is stale: run scripts/build-samples.sh"
        );
        let cr = manifest
            .jobs
            .iter()
            .find(|j| j.metadata.name.as_deref() == Some(job))
            .unwrap();
        let map = manifest
            .config_map("default", &cr.modules_config_map())
            .unwrap();
        let data = &map.binary_data.as_ref().unwrap()[&format!("{module}.wasm")];
        assert!(
            data.0 == committed,
            "the module ConfigMap of {job} is stale: run scripts/build-samples.sh"
        );
    }
}

#[test]
fn sample_jobs_are_valid() {
    let mut manifest = Manifest::default();
    manifest.read_path(&samples()).unwrap();
    assert_eq!(manifest.jobs.len(), 5);
    for job in &manifest.jobs {
        jobico_model::validate_job(job).unwrap();
    }
}
