//! Uploaded modules: the object store `jobico-modules`, for modules too large for a ConfigMap
//! (1 MiB). The ingress writes them (`PUT /modules/<namespace>/<job>`, authorised like a change
//! of that Job resource) and the dispatcher reads them; a resource names one by digest
//! (`wasm: sha256:<hex>`).
//!
//! One object per (namespace, module): `<namespace>.<sha256 hex>`. Content-addressed: the name
//! is the digest of the bytes, computed by the writer and checked again on every read, so no
//! name can stand for other bytes, and a namespace sees only what was uploaded into it.

use async_nats::jetstream::{self, object_store};
use jobico_common::executor::Sha256Digest;
use tokio::io::AsyncReadExt;

/// The object store's bucket.
pub const BUCKET: &str = "jobico-modules";
/// Largest module accepted: 64 MiB, well above real programs (a Go `wasip1` binary or a Rust
/// program with its dependencies is 1 to 5 MB).
pub const MAX_MODULE_BYTES: usize = 64 << 20;
/// Most bytes the store keeps, all namespaces together: uploads beyond it are refused (the
/// stream discards new messages), so modules never crowd out the event streams on NATS'
/// disk.
pub const MAX_STORE_BYTES: i64 = 1 << 30;

/// The object name of module `digest` in `namespace`.
pub fn object_name(namespace: &str, digest: Sha256Digest) -> String {
    format!("{namespace}.{digest}")
}

/// A failed store operation.
#[derive(Debug, thiserror::Error)]
#[error("module store {BUCKET}: {0}")]
pub struct ModuleStoreError(String);

/// The uploaded modules.
#[derive(Clone)]
pub struct ModuleStore {
    store: object_store::ObjectStore,
}

impl std::fmt::Debug for ModuleStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleStore").finish_non_exhaustive()
    }
}

impl ModuleStore {
    /// Opens the store, creating it (with `replicas`) if it does not exist.
    pub async fn open(js: &jetstream::Context, replicas: usize) -> Result<Self, ModuleStoreError> {
        let store = match js.get_object_store(BUCKET).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: BUCKET.into(),
                    description: Some("Jobico: modules uploaded through the ingress".into()),
                    max_bytes: MAX_STORE_BYTES,
                    num_replicas: replicas.max(1),
                    ..Default::default()
                })
                .await
                .map_err(|e| ModuleStoreError(format!("creating it: {e}")))?,
        };
        Ok(Self { store })
    }

    /// Keeps `module` for `namespace`; returns its digest and whether it was there already.
    pub async fn put(
        &self,
        namespace: &str,
        module: &[u8],
    ) -> Result<(Sha256Digest, bool), ModuleStoreError> {
        let digest = Sha256Digest::of(module);
        let name = object_name(namespace, digest);
        match self.store.info(&name).await {
            Ok(info) if !info.deleted && info.size == module.len() => return Ok((digest, true)),
            Ok(_) => {}
            Err(error) if error.kind() == object_store::InfoErrorKind::NotFound => {}
            Err(error) => return Err(ModuleStoreError(format!("looking up {name}: {error}"))),
        }
        let metadata = object_store::ObjectMetadata {
            name: name.clone(),
            description: Some(format!("module sha256:{digest} of namespace {namespace}")),
            ..Default::default()
        };
        self.store
            .put(metadata, &mut &module[..])
            .await
            .map_err(|e| ModuleStoreError(format!("storing {name}: {e}")))?;
        Ok((digest, false))
    }

    /// Whether module `digest` was uploaded to `namespace` (its bytes are not read).
    pub async fn exists(
        &self,
        namespace: &str,
        digest: Sha256Digest,
    ) -> Result<bool, ModuleStoreError> {
        let name = object_name(namespace, digest);
        match self.store.info(&name).await {
            Ok(info) => Ok(!info.deleted),
            Err(error) if error.kind() == object_store::InfoErrorKind::NotFound => Ok(false),
            Err(error) => Err(ModuleStoreError(format!("looking up {name}: {error}"))),
        }
    }

    /// A reader of module `digest` of `namespace` and its size, `None` when it was never
    /// uploaded there. Unchecked: for a reader that checks the digest itself (an executor).
    pub async fn reader(
        &self,
        namespace: &str,
        digest: Sha256Digest,
    ) -> Result<Option<(object_store::Object, usize)>, ModuleStoreError> {
        let name = object_name(namespace, digest);
        match self.store.get(&name).await {
            Ok(object) => {
                let size = object.info().size;
                Ok(Some((object, size)))
            }
            Err(error) if error.kind() == object_store::GetErrorKind::NotFound => Ok(None),
            Err(error) => Err(ModuleStoreError(format!("reading {name}: {error}"))),
        }
    }

    /// Module `digest` of `namespace`, `None` when it was never uploaded there. Bytes that do
    /// not hash to `digest` are an error, never returned.
    pub async fn get(
        &self,
        namespace: &str,
        digest: Sha256Digest,
    ) -> Result<Option<Vec<u8>>, ModuleStoreError> {
        let name = object_name(namespace, digest);
        let mut object = match self.store.get(&name).await {
            Ok(object) => object,
            Err(error) if error.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(ModuleStoreError(format!("reading {name}: {error}"))),
        };
        let size = object.info().size;
        if size > MAX_MODULE_BYTES {
            return Err(ModuleStoreError(format!(
                "{name} is {size} bytes, above the {MAX_MODULE_BYTES}-byte limit"
            )));
        }
        let mut bytes = Vec::with_capacity(size);
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| ModuleStoreError(format!("reading {name}: {e}")))?;
        if Sha256Digest::of(&bytes) != digest {
            return Err(ModuleStoreError(format!(
                "{name} does not hash to its name: refused"
            )));
        }
        Ok(Some(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn modules_are_kept_per_namespace_by_digest() {
        let server = jobico_testkit::NatsServer::start();
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = jetstream::new(client);
        let store = ModuleStore::open(&js, 1).await.unwrap();
        // Larger than one object-store chunk (128 KiB) and than a ConfigMap (1 MiB).
        let module: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (digest, existed) = store.put("team-a", &module).await.unwrap();
        assert_eq!(digest, Sha256Digest::of(&module));
        assert!(!existed);
        assert!(store.put("team-a", &module).await.unwrap().1, "kept once");
        assert!(store.exists("team-a", digest).await.unwrap());
        assert!(!store.exists("team-b", digest).await.unwrap());
        assert_eq!(store.get("team-a", digest).await.unwrap(), Some(module));
        // Another namespace does not see it.
        assert_eq!(store.get("team-b", digest).await.unwrap(), None);
        // Bytes under a name they do not hash to (written behind the store's back) are refused.
        let raw = js.get_object_store(BUCKET).await.unwrap();
        let other = Sha256Digest::of(b"other");
        raw.put(object_name("team-a", other).as_str(), &mut &b"swapped"[..])
            .await
            .unwrap();
        let error = store.get("team-a", other).await.unwrap_err();
        assert!(error.to_string().contains("does not hash"), "{error}");
    }
}
