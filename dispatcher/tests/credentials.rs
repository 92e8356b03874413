//! The `jobico-dispatcher` binary refuses to start, before anything else, when its NATS
//! credentials cannot be read (a real execve: no cluster is needed to see it).

use std::process::Command;

#[test]
fn an_unreadable_password_file_stops_the_dispatcher_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("password");
    let output = Command::new(env!("CARGO_BIN_EXE_jobico-dispatcher"))
        .args([
            "--exec-image",
            "wasm-exec:test",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--nats-user", "jobico-dispatcher", "--nats-password-file"])
        .arg(&missing)
        // No cluster: were the file read later, it would stop on the kubeconfig instead.
        .env("KUBECONFIG", dir.path().join("no-kubeconfig"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot read the NATS password file {}",
            missing.display()
        )),
        "{stderr}"
    );
}
