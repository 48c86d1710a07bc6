//! A bitmap name as qemu holds it: a C string. qemu's JSON parser turns a
//! QMP string into "modified UTF-8" (U+0000 becomes the bytes C0 80, so no
//! NUL reaches the string), and those bytes are what it counts against the
//! 1023-byte limit, stores in a qcow2 bitmap directory and offers in
//! `qemu:dirty-bitmap:NAME`. Shown over QMP, the bytes are decoded back,
//! each sequence that is not modified UTF-8 as U+FFFD.
//!
//! tidemark keeps a name as the string qemu shows; these are the two
//! directions between that string and qemu's bytes.

/// qemu's bytes for `name`: UTF-8, with U+0000 as C0 80.
pub fn c_bytes(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(c_len(name));
    for b in name.bytes() {
        match b {
            0 => out.extend_from_slice(&[0xc0, 0x80]),
            b => out.push(b),
        }
    }
    out
}

/// The length qemu checks against its limits: of [`c_bytes`].
pub fn c_len(name: &str) -> usize {
    name.len() + name.bytes().filter(|&b| b == 0).count()
}

/// The name qemu reads from stored bytes and shows over QMP: the bytes up
/// to the first NUL (a C string ends there), decoded as modified UTF-8
/// with one U+FFFD per invalid sequence.
pub fn from_c_bytes(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let mut rest = &bytes[..end];
    let mut out = String::with_capacity(rest.len());
    while !rest.is_empty() {
        let (cp, used) = codepoint(rest);
        out.push(cp.unwrap_or(char::REPLACEMENT_CHARACTER));
        rest = &rest[used..];
    }
    out
}

/// One modified-UTF-8 sequence at the start of `s` (not empty, no NUL):
/// the character, or None when invalid, and the bytes it takes. As qemu's
/// decoder: a bad lead byte takes one byte, a sequence cut short takes the
/// bytes up to the cut; overlong forms (except C0 80), surrogates,
/// noncharacters and values past U+10FFFF are invalid.
fn codepoint(s: &[u8]) -> (Option<char>, usize) {
    let lead = s[0];
    if lead < 0x80 {
        return (Some(char::from(lead)), 1);
    }
    if lead >= 0xfe || lead & 0x40 == 0 {
        return (None, 1);
    }
    let len = lead.leading_ones() as usize;
    let mut cp = u32::from(lead) & (0x7f >> len);
    for i in 1..len {
        match s.get(i) {
            Some(&b) if b & 0xc0 == 0x80 => cp = cp << 6 | u32::from(b & 0x3f),
            _ => return (None, i),
        }
    }
    const SHORTEST: [u32; 5] = [0x80, 0x800, 0x1_0000, 0x20_0000, 0x400_0000];
    let overlong = cp < SHORTEST[len - 2] && !(cp == 0 && len == 2);
    let nonchar = (0xfdd0..=0xfdef).contains(&cp) || cp & 0xfffe == 0xfffe;
    if overlong || nonchar {
        return (None, len);
    }
    (char::from_u32(cp), len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_is_c0_80_both_ways() {
        assert_eq!(c_bytes("a\0b"), b"a\xc0\x80b");
        assert_eq!(c_bytes("\0"), b"\xc0\x80");
        assert_eq!(c_bytes("\0\0x\0"), b"\xc0\x80\xc0\x80x\xc0\x80");
        assert_eq!(c_bytes("b0"), b"b0");
        assert_eq!(c_len("a\0b"), 4);
        assert_eq!(from_c_bytes(b"a\xc0\x80b"), "a\0b");
        for s in ["a\0b", "\u{e9}t\u{e9}", "\u{1f600}", "\0"] {
            assert_eq!(from_c_bytes(&c_bytes(s)), s);
            assert_eq!(c_len(s), c_bytes(s).len());
        }
    }

    #[test]
    fn invalid_bytes_read_as_qemu_shows_them() {
        assert_eq!(from_c_bytes(b"a\xff\xfeb"), "a\u{fffd}\u{fffd}b");
        assert_eq!(from_c_bytes(b"a\x80b"), "a\u{fffd}b");
        // Cut short: the lead and the good continuation are one sequence.
        assert_eq!(from_c_bytes(b"\xe2\x82x"), "\u{fffd}x");
        // Overlong, surrogate, noncharacter: one U+FFFD each.
        assert_eq!(from_c_bytes(b"\xe0\x80\xaf"), "\u{fffd}");
        assert_eq!(from_c_bytes(b"\xed\xa0\x80"), "\u{fffd}");
        assert_eq!(from_c_bytes(b"\xef\xbf\xbf"), "\u{fffd}");
        // A C string ends at its NUL.
        assert_eq!(from_c_bytes(b"a\0b"), "a");
    }
}
