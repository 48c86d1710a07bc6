//! `secret`: bytes given inline (`data`) or in a file, raw or base64, and
//! optionally encrypted with another secret (`keyid`, `iv`): AES-256-CBC,
//! as qemu's secrets are.

use openssl::symm::{Cipher, Crypter, Mode};

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
            Some((key, iv)) => decrypt(key, iv, &raw, o.base64)?,
            None if o.base64 => base64(&raw)?,
            None => raw,
        };
        Ok(Secret { data })
    }
}

/// AES-256-CBC with the key secret, in qemu's order of checks and with its
/// texts. Base64 `data` is the ciphertext encoded; the plaintext is used as
/// it comes out.
fn decrypt(
    key: &Secret,
    iv: Option<&str>,
    data: &[u8],
    base64_data: bool,
) -> Result<Vec<u8>, String> {
    if key.data.len() != 32 {
        return Err("Key should be 32 bytes in length".into());
    }
    let iv = base64(iv.ok_or("IV is required to decrypt secret")?.as_bytes())?;
    if iv.len() != 16 {
        return Err(format!("IV should be 16 bytes in length not {}", iv.len()));
    }
    let ciphertext = if base64_data {
        base64(data)?
    } else {
        data.to_vec()
    };
    if ciphertext.len() % 16 != 0 {
        return Err(format!(
            "Length {} must be a multiple of block size 16",
            ciphertext.len()
        ));
    }
    let mut c = Crypter::new(Cipher::aes_256_cbc(), Mode::Decrypt, &key.data, Some(&iv))
        .map_err(|e| format!("Unable to decrypt secret: {e}"))?;
    c.pad(false);
    let mut out = vec![0u8; ciphertext.len() + 16];
    let n = c
        .update(&ciphertext, &mut out)
        .and_then(|n| c.finalize(&mut out[n..]).map(|m| n + m))
        .map_err(|e| format!("Unable to decrypt secret: {e}"))?;
    out.truncate(n);
    // qemu checks the PKCS#7 count only against the length.
    let pad = out.last().copied().unwrap_or(0) as usize;
    if pad > out.len() {
        return Err(format!(
            "Incorrect number of padding bytes ({pad}) found on decrypted data"
        ));
    }
    out.truncate(out.len() - pad);
    Ok(out)
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
