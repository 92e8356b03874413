//! `jobico module upload`: puts modules too large for a ConfigMap (1 MiB) into the namespace's
//! module store through the ingress (`PUT /modules/<namespace>/<resource>`, authorised as a
//! change of that Job resource). A resource runs one with `wasm: sha256:<digest>`.

use std::path::PathBuf;

use crate::send::IngressArgs;

/// Arguments of `jobico module upload`.
#[derive(Debug, clap::Args)]
pub struct UploadArgs {
    /// The `Job` resource (`jobs.jobico.coeux.dev`) the modules are for.
    pub resource: String,
    /// The `.wasm` (or `.wat`, compiled first) files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Namespace of the resource.
    #[arg(short, long, default_value = "default")]
    pub namespace: String,
    /// The ingress, and as whom.
    #[command(flatten)]
    pub ingress: IngressArgs,
}

/// Uploads the modules; returns the lines to print.
pub async fn upload(args: &UploadArgs) -> anyhow::Result<Vec<String>> {
    let entries = crate::module_entries(&args.files)?;
    let ns = args.namespace.as_str();
    let mut lines = Vec::new();
    for (file, module) in entries {
        let request = args
            .ingress
            .request(
                reqwest::Method::PUT,
                &format!("/modules/{ns}/{}", args.resource),
                ns,
            )
            .await?
            .header("content-type", "application/wasm")
            .body(module.0);
        let (status, body, retry_after) =
            crate::send::answer(&args.ingress.ingress, request).await?;
        if !(200..300).contains(&status) {
            return Err(crate::send::refused(status, &body, retry_after.as_deref())
                .context(format!("uploading {file}")));
        }
        let wasm = body["wasm"].as_str().unwrap_or_default();
        let news = if body["existed"] == true {
            "was there already"
        } else {
            "uploaded"
        };
        lines.push(format!(
            "{file} ({} bytes) {news} in namespace {ns}: run it with `wasm: {wasm}` in spec.events[] of {}",
            body["bytes"], args.resource
        ));
    }
    Ok(lines)
}

impl UploadArgs {
    /// Runs the command, printing what was uploaded.
    pub fn run(&self) -> anyhow::Result<()> {
        for line in crate::block_on(upload(self))? {
            println!("{line}");
        }
        Ok(())
    }
}
