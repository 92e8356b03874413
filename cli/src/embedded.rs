//! The samples built into the binary, so `jobico up` works from any directory.

use std::path::Path;

/// Each sample file: its name and contents.
const FILES: &[(&str, &[u8])] = &[
    ("ev1.yaml", include_bytes!("../../samples/ev1.yaml")),
    ("echo.wasm", include_bytes!("../../samples/echo.wasm")),
    ("ev2.yaml", include_bytes!("../../samples/ev2.yaml")),
    ("logecho.wasm", include_bytes!("../../samples/logecho.wasm")),
    ("ev3.yaml", include_bytes!("../../samples/ev3.yaml")),
    (
        "printenv.wasm",
        include_bytes!("../../samples/printenv.wasm"),
    ),
    ("chain.yaml", include_bytes!("../../samples/chain.yaml")),
    ("order.wasm", include_bytes!("../../samples/order.wasm")),
    ("sink.yaml", include_bytes!("../../samples/sink.yaml")),
    ("receiver.py", include_bytes!("../../samples/receiver.py")),
];

/// A directory holding the samples, removed when dropped.
pub struct Extracted(std::path::PathBuf);

impl Extracted {
    /// Where the samples are.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Extracted {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes the samples into a fresh temporary directory.
pub fn extract() -> std::io::Result<Extracted> {
    let dir = std::env::temp_dir().join(format!("jobico-samples-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let extracted = Extracted(dir);
    for (name, bytes) in FILES {
        std::fs::write(extracted.0.join(name), bytes)?;
    }
    Ok(extracted)
}
