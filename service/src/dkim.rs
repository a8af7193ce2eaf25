//! DKIM signing of outbound mail (RFC 6376; Ed25519 per RFC 8463) with mail-auth. Keys are
//! made by `mailgrid admin dkim generate`, kept per domain in the meta state, and used by
//! submission to sign a message once, before it is queued, so every replica and every
//! delivery attempt carries the same signature.

use base64::Engine;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::EncodePublicKey;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer};
use storage::meta::DkimKey;
use storage::types::UnixSeconds;

/// Headers signed when the message has them (RFC 6376 §5.4.1's recommendations).
const SIGNED_HEADERS: [&str; 12] = [
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

const RSA_BITS: usize = 2048;

/// A new key for `selector`; `algorithm` is "rsa" (2048 bits) or "ed25519".
pub fn generate(selector: &str, algorithm: &str, now: UnixSeconds) -> Result<DkimKey, String> {
    let valid_selector = !selector.is_empty()
        && selector.len() <= 63
        && selector
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !valid_selector {
        return Err(format!(
            "{selector:?} is not a DNS label usable as a selector"
        ));
    }
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let (private_der, public) = match algorithm {
        "rsa" => {
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, RSA_BITS)
                .map_err(|e| format!("RSA key generation failed: {e}"))?;
            let private = key.to_pkcs1_der().map_err(|e| e.to_string())?;
            let public = key
                .to_public_key()
                .to_public_key_der()
                .map_err(|e| e.to_string())?;
            (private.as_bytes().to_vec(), b64(public.as_bytes()))
        }
        "ed25519" => {
            let pkcs8 = Ed25519Key::generate_pkcs8().map_err(|e| e.to_string())?;
            let key = Ed25519Key::from_pkcs8_der(&pkcs8).map_err(|e| e.to_string())?;
            (pkcs8, b64(&key.public_key()))
        }
        other => return Err(format!("unknown DKIM algorithm {other:?} (rsa or ed25519)")),
    };
    Ok(DkimKey {
        selector: selector.to_string(),
        algorithm: algorithm.to_string(),
        private_der,
        public_base64: public,
        created: now,
    })
}

/// The DNS TXT record that publishes `key` for `domain`, in zone-file form.
pub fn txt_record(domain: &str, key: &DkimKey) -> String {
    let value = format!("v=DKIM1; k={}; p={}", key.algorithm, key.public_base64);
    // Strings in a TXT record hold at most 255 bytes each; resolvers join them.
    let strings: Vec<String> = value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!(
        "{}._domainkey.{domain}. IN TXT ( {} )",
        key.selector,
        strings.join(" ")
    )
}

/// The `DKIM-Signature:` header (with its CRLF) for `message`, signed for `domain`.
pub fn sign(key: &DkimKey, domain: &str, message: &[u8]) -> Result<String, String> {
    let signature = match key.algorithm.as_str() {
        "rsa" => {
            let der = PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(key.private_der.clone()));
            let rsa = RsaKey::<Sha256>::from_key_der(der).map_err(|e| e.to_string())?;
            DkimSigner::from_key(rsa)
                .domain(domain)
                .selector(&key.selector)
                .headers(SIGNED_HEADERS)
                .sign(message)
        }
        "ed25519" => {
            let ed = Ed25519Key::from_pkcs8_der(&key.private_der).map_err(|e| e.to_string())?;
            DkimSigner::from_key(ed)
                .domain(domain)
                .selector(&key.selector)
                .headers(SIGNED_HEADERS)
                .sign(message)
        }
        other => return Err(format!("unknown DKIM algorithm {other:?}")),
    };
    Ok(signature.map_err(|e| e.to_string())?.to_header())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sign_and_publish() {
        // Goal: both algorithms make a key whose signature names the domain, selector and
        // signed headers, and whose DNS record carries the public key; bad input is refused.
        let message = b"From: a@example.test\r\nTo: b@far.test\r\nSubject: hi\r\n\r\nbody\r\n";
        for algorithm in ["rsa", "ed25519"] {
            let key = generate("mg1", algorithm, 0).unwrap();
            let header = sign(&key, "example.test", message).unwrap();
            assert!(header.starts_with("DKIM-Signature:"), "{header}");
            assert!(
                header.contains("d=example.test") && header.contains("s=mg1"),
                "{header}"
            );
            assert!(header.ends_with("\r\n"));
            let record = txt_record("example.test", &key);
            assert!(
                record.starts_with("mg1._domainkey.example.test. IN TXT"),
                "{record}"
            );
            let joined: String = record.split('"').skip(1).step_by(2).collect();
            assert_eq!(
                joined,
                format!("v=DKIM1; k={algorithm}; p={}", key.public_base64)
            );
        }
        assert!(generate("bad selector", "rsa", 0).is_err());
        assert!(generate("mg1", "dsa", 0).is_err());
    }
}
