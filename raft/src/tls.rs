//! The cluster's certificate authority and each node's identity, and the rustls configurations
//! built from them.
//!
//! `init` makes a CA unique to the cluster. Every node certificate carries the DNS name
//! `node-<id>.mailgrid`, so a connection's certificate names the node at the other end: a
//! client checks it as the server name, a server reads it from the verified client chain.

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SubjectPublicKeyInfo,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::NodeId;

pub const ALPN: &[u8] = b"mailgrid/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("bad certificate or key in {0}")]
    Pem(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A name every node certificate also carries, for a joining node that knows the cluster's CA
/// but not yet which node it is talking to.
pub const CLUSTER_NAME: &str = "cluster.mailgrid";

pub fn node_name(id: NodeId) -> String {
    format!("node-{id}.mailgrid")
}

/// The node id named by a certificate (already verified by rustls against the cluster CA).
pub fn node_id_of(cert: &CertificateDer<'_>) -> Option<NodeId> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    let id = ee.valid_dns_names().find_map(|n| {
        n.strip_prefix("node-")?
            .strip_suffix(".mailgrid")?
            .parse()
            .ok()
    });
    id
}

/// The cluster CA. Its key is kept by every node so any node can admit a joining one.
pub struct ClusterCa {
    pub cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterCa")
    }
}

fn ca_params(cluster_id: &str) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    // A CA name unique per cluster makes a foreign CA fail as "unknown issuer".
    params
        .distinguished_name
        .push(DnType::CommonName, format!("mailgrid cluster {cluster_id}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    Ok(params)
}

impl ClusterCa {
    pub fn generate(cluster_id: &str) -> Result<ClusterCa, TlsError> {
        let params = ca_params(cluster_id)?;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|_| TlsError::Pem("CA key".into()))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|_| TlsError::Pem("CA certificate".into()))?;
        Ok(ClusterCa {
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
            issuer,
        })
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Signs a certificate for node `id` over the given public key (PEM SubjectPublicKeyInfo).
    /// The names come from the CA, never from the requester.
    pub fn issue(&self, id: NodeId, public_key_pem: &str) -> Result<String, TlsError> {
        let spki = SubjectPublicKeyInfo::from_pem(public_key_pem)
            .map_err(|_| TlsError::Pem("public key of the joining node".into()))?;
        let mut p = CertificateParams::new(vec![node_name(id), CLUSTER_NAME.to_string()])?;
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, node_name(id));
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        // Valid from a day back, like the CA: a node whose clock is behind (an NTP step, a
        // VM resumed) must still accept a peer that joined minutes ago. The chaos clock
        // nemesis cut nodes off for their whole skew with five minutes.
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(3650);
        let mut serial = [0u8; 16];
        rand::Rng::fill(&mut rand::thread_rng(), &mut serial[..]);
        serial[0] &= 0x7f;
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        Ok(p.signed_by(&spki, &self.issuer)?.pem())
    }
}

/// A fresh key pair for a node: (private key PEM, public key PEM).
pub fn generate_node_key() -> Result<(String, String), TlsError> {
    let key = KeyPair::generate()?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

/// Everything a node (or a command acting with a node's credentials) needs for TLS.
#[derive(Debug)]
pub struct Identity {
    pub id: NodeId,
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const NODE_CERT_FILE: &str = "node.pem";
pub const NODE_KEY_FILE: &str = "node.key";

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Writes a file and fsyncs it; keys are made readable by the owner only.
pub fn write_private(path: &Path, contents: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| TlsError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

impl Identity {
    /// Loads the CA certificate and node certificate/key kept in `dir`.
    pub fn load(dir: &Path) -> Result<Identity, TlsError> {
        let ca_pem = read(&dir.join(CA_CERT_FILE))?;
        let cert_pem = read(&dir.join(NODE_CERT_FILE))?;
        let key_pem = read(&dir.join(NODE_KEY_FILE))?;
        Identity::from_pem(&ca_pem, &cert_pem, &key_pem)
    }

    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Identity, TlsError> {
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|_| TlsError::Pem(CA_CERT_FILE.into()))?;
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| TlsError::Pem(NODE_CERT_FILE.into()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|_| TlsError::Pem(NODE_KEY_FILE.into()))?;
        let id = chain
            .first()
            .and_then(node_id_of)
            .ok_or_else(|| TlsError::Pem(format!("{NODE_CERT_FILE} names no mailgrid node")))?;
        Ok(Identity { id, ca, chain, key })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        roots(&self.ca)
    }

    /// Server side: client certificates must chain to the cluster CA; a client with no
    /// certificate is let in so that it can ask to join (the transport allows it nothing else).
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let cfg_err = |e: &dyn std::fmt::Display| TlsError::Config(e.to_string());
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| cfg_err(&e))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| cfg_err(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| cfg_err(&e))?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        client_config(&self.ca, Some((self.chain.clone(), self.key.clone_key())))
    }
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(roots))
}

/// A client configuration trusting `ca_pem`, with no client certificate (for joining).
pub fn anonymous_client_config(ca_pem: &str) -> Result<rustls::ClientConfig, TlsError> {
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|_| TlsError::Pem("CA certificate".into()))?;
    client_config(&ca, None)
}

fn client_config(
    ca: &CertificateDer<'static>,
    auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let cfg_err = |e: &dyn std::fmt::Display| TlsError::Config(e.to_string());
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| cfg_err(&e))?
        .with_root_certificates(roots(ca)?);
    let mut cfg = match auth {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| cfg_err(&e))?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}
