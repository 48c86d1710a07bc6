//! `secret`: bytes given inline (`data`) or in a file, raw or base64, and
//! optionally encrypted with another secret (`keyid`, `iv`): AES-256-CBC,
//! as qemu's secrets are.

use openssl::symm::{decrypt, Cipher};

/// A loaded secret.
#[derive(Clone)]
pub struct Secret {
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A `secret` object's properties.
pub struct SecretOptions<'a> {
    pub data: Option<&'a str>,
    pub file: Option<&'a str>,
    pub base64: bool,
    /// The decryption key's secret, already looked up, and the IV.
    pub key: Option<(&'a Secret, Option<&'a str>)>,
}

impl Secret {
    pub fn load(o: &SecretOptions) -> Result<Secret, String> {
        let raw = match (o.data, o.file) {
            (Some(_), Some(_)) => return Err("'file' and 'data' are mutually exclusive".into()),
            (None, None) => return Err("Either 'file' or 'data' must be provided".into()),
            (Some(d), None) => d.as_bytes().to_vec(),
            (None, Some(f)) => std::fs::read(f).map_err(|e| {
                // glib's wording, which qemu passes on.
                let why = crate::qmp::error::strip_os_error(&e.to_string());
                format!("Unable to read {f}: Failed to open file \u{201c}{f}\u{201d}: {why}")
            })?,
        };
        let data = match o.key {
            Some((key, iv)) => {
                // Encrypted data is always base64 on the way in.
                let iv = iv.ok_or("IV is required to decrypt secret")?;
                let iv = base64(iv.as_bytes())?;
                if iv.len() != 16 {
                    return Err(format!("IV is required to be 16 bytes not {}", iv.len()));
                }
                if key.data.len() != 32 {
                    return Err(format!(
                        "Secret key must be 32 bytes, not {}",
                        key.data.len()
                    ));
                }
                let clear = decrypt(Cipher::aes_256_cbc(), &key.data, Some(&iv), &base64(&raw)?)
                    .map_err(|e| format!("Unable to decrypt secret: {e}"))?;
                if o.base64 {
                    base64(&clear)?
                } else {
                    clear
                }
            }
            None if o.base64 => base64(&raw)?,
            None => raw,
        };
        Ok(Secret { data })
    }
}

/// Decodes base64 as qemu accepts it: only the alphabet, `=` padding and
/// line breaks; a short final group is decoded as far as it goes.
pub fn base64(text: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in text {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' => continue,
            _ => return Err("Base64 data contains invalid characters".into()),
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes() {
        assert_eq!(base64(b"aGVsbG8=").as_deref(), Ok(&b"hello"[..]));
        assert!(base64(b"a*b").is_err());
    }
}
