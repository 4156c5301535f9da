//! Bearer credentials: a store's token or an HQ admin's, 32 random bytes shown once in hex when
//! created. Only the SHA-256 of a token is stored, so a copy of the database holds no usable
//! credential; a request is authenticated by hashing the token it presents and looking the hash
//! up (`Storage::authenticate`).

use rand::RngCore;
use sha2::{Digest, Sha256};

/// A freshly generated credential. `Debug` does not print it.
pub struct Token(String);

impl Token {
    /// 32 bytes from the operating system's generator, as 64 lower-case hex digits.
    pub fn generate() -> Token {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Token(hex::encode(bytes))
    }

    /// The token itself, to show the operator once.
    pub fn reveal(&self) -> &str {
        &self.0
    }

    pub fn sha256(&self) -> [u8; 32] {
        sha256(&self.0)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// What is stored for a token.
pub fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Why a request carries no usable bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BearerError {
    #[error("missing Authorization header: send \"Authorization: Bearer TOKEN\"")]
    Missing,
    #[error("malformed Authorization header: expected \"Bearer TOKEN\"")]
    Malformed,
}

/// Longest token accepted (ours are 64 hex digits); longer ones are not hashed.
const MAX_TOKEN_LEN: usize = 256;

/// Extracts the token of an `Authorization: Bearer TOKEN` header value (the scheme is
/// case-insensitive, as RFC 9110 says).
pub fn parse_bearer(header: Option<&[u8]>) -> Result<&str, BearerError> {
    let value = header.ok_or(BearerError::Missing)?;
    let value = std::str::from_utf8(value).map_err(|_| BearerError::Malformed)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(BearerError::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer")
        || token.is_empty()
        || token.len() > MAX_TOKEN_LEN
        || token.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(BearerError::Malformed);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_64_hex_digits_and_distinct() {
        let a = Token::generate();
        let b = Token::generate();
        assert_eq!(a.reveal().len(), 64);
        assert!(a.reveal().bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a.reveal(), b.reveal());
        assert_eq!(a.sha256(), sha256(a.reveal()));
        assert!(!format!("{a:?}").contains(a.reveal()));
    }

    #[test]
    fn sha256_matches_a_known_vector() {
        assert_eq!(hex::encode(sha256("abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn parses_bearer_headers() {
        assert_eq!(parse_bearer(Some(b"Bearer abc")), Ok("abc"));
        assert_eq!(parse_bearer(Some(b"bearer  abc ")), Ok("abc"));
        assert_eq!(parse_bearer(None), Err(BearerError::Missing));
        assert_eq!(parse_bearer(Some(b"Basic abc")), Err(BearerError::Malformed));
        assert_eq!(parse_bearer(Some(b"Bearer")), Err(BearerError::Malformed));
        assert_eq!(parse_bearer(Some(b"Bearer a b")), Err(BearerError::Malformed));
        assert_eq!(parse_bearer(Some(b"Bearer \xff")), Err(BearerError::Malformed));
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1));
        assert_eq!(parse_bearer(Some(long.as_bytes())), Err(BearerError::Malformed));
    }
}
