//! SASL pieces every protocol uses (no I/O): PLAIN (RFC 4616) and the base64 text of LOGIN.

use base64::Engine;

/// SASL PLAIN (RFC 4616): `authzid NUL authcid NUL password`, base64. Returns the user and
/// password; an authorization identity other than the user is refused.
pub fn decode_plain(b64: &str) -> Result<(String, String), &'static str> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| "invalid base64")?;
    parse_plain(&raw)
}

/// SASL PLAIN from its decoded octets (IMAP's SASL-IR hands them over already decoded).
pub fn parse_plain(raw: &[u8]) -> Result<(String, String), &'static str> {
    let parts: Vec<&[u8]> = raw.split(|&b| b == 0).collect();
    let [authz, user, password] = parts[..] else {
        return Err("malformed PLAIN response");
    };
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| "not UTF-8");
    let (authz, user, password) = (text(authz)?, text(user)?, text(password)?);
    if !authz.is_empty() && !authz.eq_ignore_ascii_case(&user) {
        return Err("acting as another user is not allowed");
    }
    Ok((user, password))
}

pub fn decode_base64_text(b64: &str) -> Result<String, &'static str> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| "invalid base64")?;
    String::from_utf8(raw).map_err(|_| "not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: PLAIN accepts an empty or identical authzid and refuses impersonation.
    #[test]
    fn plain() {
        let enc = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(
            decode_plain(&enc(b"\0a@x\0pw")).unwrap(),
            ("a@x".to_string(), "pw".to_string())
        );
        assert!(decode_plain(&enc(b"b@x\0a@x\0pw")).is_err());
        assert!(decode_plain(&enc(b"a@x\0pw")).is_err());
        assert!(decode_plain("!!").is_err());
    }
}
