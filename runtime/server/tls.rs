//! TLS configuration: rustls (TLS 1.2 and 1.3 only, aws-lc-rs's default modern suites, optional
//! mutual TLS). Connections are accepted and bounded in [`super::connections`].

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

/// Largest PEM file read (a certificate chain or key is a few KiB; a CA bundle a few hundred).
const MAX_PEM: u64 = 1 << 20;

/// Reads a PEM file whole: a regular file (symlinks are followed, as certificate managers use
/// them) of at most [`MAX_PEM`] bytes, opened without blocking, so a FIFO, a device or a huge
/// file is an error at once instead of a hang or an allocation without bound.
fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let at = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| at(&e))?;
    let meta = file.metadata().map_err(|e| at(&e))?;
    if !meta.is_file() {
        return Err(at(&"not a regular file"));
    }
    if meta.len() > MAX_PEM {
        return Err(at(&format!("larger than {MAX_PEM} bytes")));
    }
    let mut bytes = Vec::new();
    file.take(MAX_PEM + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| at(&e))?;
    if bytes.len() as u64 > MAX_PEM {
        return Err(at(&format!("larger than {MAX_PEM} bytes")));
    }
    Ok(bytes)
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", path.display()));
    }
    Ok(certs)
}

/// Builds the TLS configuration from PEM files.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerConfig, String> {
    let certs = certificates(cert, &read_pem(cert)?)?;
    build(certs, key, client_ca)
}

/// The configuration for certificates already read, with the key and client CA files.
fn build(
    certs: Vec<CertificateDer<'static>>,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerConfig, String> {
    let key = PrivateKeyDer::from_pem_slice(&read_pem(key)?)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certificates(ca, &read_pem(ca)?)? {
                roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("client CA: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate/key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The files a TLS configuration is read from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: Option<std::path::PathBuf>,
}

/// The serving TLS configuration, replaceable while the server runs: each new connection's
/// handshake takes the configuration current when it is accepted; connections already open
/// keep theirs. [`ReloadableTls::reload`] re-reads the files and swaps only when the whole new
/// configuration builds (the certificate chain parses, the key matches it, the client CA
/// loads); otherwise the running one stays.
pub struct ReloadableTls {
    files: TlsFiles,
    current: std::sync::RwLock<Loaded>,
}

struct Loaded {
    acceptor: tokio_rustls::TlsAcceptor,
    fingerprint: String,
}

impl ReloadableTls {
    pub fn load(files: TlsFiles) -> Result<Self, String> {
        let current = std::sync::RwLock::new(Self::read(&files)?);
        Ok(ReloadableTls { files, current })
    }

    /// Reads each file once (the fingerprint is of the very certificate installed).
    fn read(files: &TlsFiles) -> Result<Loaded, String> {
        use sha2::Digest;
        let certs = certificates(&files.cert, &read_pem(&files.cert)?)?;
        let fingerprint = hex::encode(sha2::Sha256::digest(certs[0].as_ref()));
        let config = build(certs, &files.key, files.client_ca.as_deref())?;
        Ok(Loaded {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            fingerprint,
        })
    }

    /// The acceptor for a connection accepted now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        // A poisoned lock still holds a complete configuration (it is only ever replaced whole).
        let loaded = self.current.read().unwrap_or_else(|e| e.into_inner());
        loaded.acceptor.clone()
    }

    /// SHA-256 of the serving leaf certificate (DER), hex: what the audit log records.
    pub fn fingerprint(&self) -> String {
        let loaded = self.current.read().unwrap_or_else(|e| e.into_inner());
        loaded.fingerprint.clone()
    }

    /// Re-reads and builds the configuration from the files, without using it yet (the swap
    /// is recorded first); an error says why the running configuration stays.
    pub fn prepare(&self) -> Result<PreparedTls, String> {
        Self::read(&self.files).map(PreparedTls)
    }

    /// Serves new connections with `prepared`.
    pub fn install(&self, prepared: PreparedTls) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = prepared.0;
    }
}

/// A complete new TLS configuration, read and checked, not yet serving.
pub struct PreparedTls(Loaded);

impl PreparedTls {
    /// SHA-256 of its leaf certificate (DER), hex.
    pub fn fingerprint(&self) -> &str {
        &self.0.fingerprint
    }
}
