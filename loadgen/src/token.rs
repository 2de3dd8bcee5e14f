//! Connection tokens for servers started with `--auth required`: one HS256 JWT per client, its
//! `sub` the client's id, granting subscribe and publish on every loadgen room (`lg-*`).
//!
//! Written here with `ring`'s HMAC rather than a JWT library, like the rest of loadgen's wire
//! code: it checks the server, so it shares none of the server's code.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;

/// Mints tokens with one secret.
pub struct Minter {
    key: hmac::Key,
    ttl: Duration,
    room_prefix: String,
}

impl Minter {
    pub fn new(secret: &str, ttl: Duration, room_prefix: &str) -> Minter {
        Minter {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()),
            ttl,
            room_prefix: room_prefix.to_string(),
        }
    }

    /// The token of client `id`, valid for the minter's time to live from now.
    pub fn token(&self, id: u32) -> String {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + self.ttl.as_secs();
        let header = base64url(br#"{"alg":"HS256","typ":"JWT"}"#);
        let claims = format!(
            r#"{{"sub":"lg-{id}","exp":{exp},"rooms":{{"{}*":["subscribe","publish"]}}}}"#,
            self.room_prefix
        );
        let signed = format!("{header}.{}", base64url(claims.as_bytes()));
        let signature = hmac::sign(&self.key, signed.as_bytes());
        format!("{signed}.{}", base64url(signature.as_ref()))
    }
}

/// Unpadded base64url (RFC 4648 §5), as JWTs use.
fn base64url(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_has_no_padding_and_the_url_alphabet() {
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn a_token_has_three_parts_and_names_its_client() {
        let token = Minter::new("s", Duration::from_secs(60), "lg-").token(7);
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0], "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9");
        assert!(!token.contains('='));
    }
}
