//! Join tokens as the store keeps them.

/// SHA-256 of a join token, hex: the form the store keeps.
pub fn digest(token: &str) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        token.as_bytes(),
    ))
}
