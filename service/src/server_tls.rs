//! TLS that clients see (SMTP, and later IMAP, POP3 and HTTP): the operator's certificate, or
//! a self-signed one made for the node when none is configured. Separate from the cluster's
//! mutual TLS, whose CA clients never see.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub const SERVER_CERT_FILE: &str = "server.pem";
pub const SERVER_KEY_FILE: &str = "server.key";

/// Paths of the node's self-signed pair in its data directory.
pub fn default_paths(dir: &Path) -> (PathBuf, PathBuf) {
    let tls = crate::datadir::tls_dir(dir);
    (tls.join(SERVER_CERT_FILE), tls.join(SERVER_KEY_FILE))
}

/// Makes the node's self-signed certificate for `hostname` (and localhost) unless it exists.
pub fn ensure_self_signed(dir: &Path, hostname: &str) -> anyhow::Result<()> {
    let (cert, key) = default_paths(dir);
    if cert.exists() && key.exists() {
        return Ok(());
    }
    let mut names = vec![hostname.to_string(), "localhost".to_string()];
    names.dedup();
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, hostname.to_string());
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(825);
    let pair = KeyPair::generate()?;
    let certificate = params.self_signed(&pair)?;
    raft::tls::write_private(&key, &pair.serialize_pem())?;
    raft::tls::write_private(&cert, &certificate.pem())?;
    Ok(())
}

/// A rustls server configuration from a PEM certificate chain and private key.
pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", cert.display()))?;
    if chain.is_empty() {
        bail!("{} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{} is not a PEM private key", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the certificate does not match the key")?;
    Ok(Arc::new(config))
}
