//! The limits a bitmap must respect, and the default granularity: the rules
//! QEMU applies in `block-dirty-bitmap-add` and in its qcow2 driver.

use super::error::{BitmapError, BitmapResult};
use super::name::c_len;

/// Smallest granularity: one sector.
pub const MIN_GRANULARITY: u64 = 512;
/// Largest granularity: 2 GiB, the most a qcow2 bitmap directory entry can
/// describe (granularity_bits <= 31) and the most a QAPI `uint32` can hold.
pub const MAX_GRANULARITY: u64 = 1 << 31;
/// Longest bitmap name in bytes (QEMU's BDRV_BITMAP_MAX_NAME_SIZE).
pub const MAX_NAME_LEN: usize = 1023;
/// Largest disk size a bitmap covers: QEMU's hbitmap keeps sizes below 2^63.
pub const MAX_DISK_SIZE: u64 = i64::MAX as u64;

/// Checks a granularity as `block-dirty-bitmap-add` does, returning its
/// log2 (the shift from bytes to granules).
///
/// A granularity above 2 GiB cannot reach QEMU's check (QAPI refuses it
/// first, as not a uint32); tidemark reports it with the qcow2 driver's text.
pub fn granularity_shift(granularity: u64) -> BitmapResult<u32> {
    if granularity < MIN_GRANULARITY || !granularity.is_power_of_two() {
        return Err(BitmapError::invalid(
            "Granularity must be power of 2 and at least 512",
        ));
    }
    if granularity > MAX_GRANULARITY {
        return Err(BitmapError::invalid(format!(
            "Granularity exceeds maximum ({MAX_GRANULARITY} bytes)"
        )));
    }
    Ok(granularity.trailing_zeros())
}

/// The granularity a new bitmap gets when none is given: the image's cluster
/// size clamped to [4 KiB, 64 KiB], or 64 KiB when the format has no
/// clusters (`cluster_size` 0), as QEMU's bdrv_get_default_bitmap_granularity.
pub fn default_granularity(cluster_size: u64) -> u64 {
    if cluster_size == 0 {
        return 65536;
    }
    cluster_size.clamp(4096, 65536)
}

/// The first check `block-dirty-bitmap-add` makes, before it looks up the
/// node.
pub fn check_name_not_empty(name: &str) -> BitmapResult<()> {
    if name.is_empty() {
        return Err(BitmapError::invalid("Bitmap name cannot be empty"));
    }
    Ok(())
}

/// Checks a bitmap name as `block-dirty-bitmap-add` does; the length is
/// of qemu's bytes for it (U+0000 counts two).
pub fn check_name(name: &str) -> BitmapResult<()> {
    check_name_not_empty(name)?;
    if c_len(name) > MAX_NAME_LEN {
        return Err(BitmapError::invalid(format!(
            "Bitmap name too long: {name}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granularity_limits_match_qemu_texts() {
        assert_eq!(granularity_shift(512), Ok(9));
        assert_eq!(granularity_shift(1 << 31), Ok(31));
        for bad in [0, 1, 256, 1000, 65535, 3 << 20] {
            let err = granularity_shift(bad).unwrap_err();
            assert_eq!(
                err.message,
                "Granularity must be power of 2 and at least 512"
            );
        }
        let err = granularity_shift(1 << 32).unwrap_err();
        assert_eq!(
            err.message,
            "Granularity exceeds maximum (2147483648 bytes)"
        );
    }

    #[test]
    fn default_granularity_is_clamped_cluster_size() {
        assert_eq!(default_granularity(0), 65536);
        assert_eq!(default_granularity(512), 4096);
        assert_eq!(default_granularity(4096), 4096);
        assert_eq!(default_granularity(16384), 16384);
        assert_eq!(default_granularity(65536), 65536);
        assert_eq!(default_granularity(2 << 20), 65536);
    }

    #[test]
    fn names_are_checked_like_qemu() {
        assert!(check_name("b0").is_ok());
        assert!(check_name(&"x".repeat(1023)).is_ok());
        assert_eq!(
            check_name("").unwrap_err().message,
            "Bitmap name cannot be empty"
        );
        assert!(check_name(&format!("{}\0", "x".repeat(1021))).is_ok());
        let nul = format!("{}\0", "x".repeat(1022));
        assert!(check_name(&nul).is_err());
        let long = "x".repeat(1024);
        assert_eq!(
            check_name(&long).unwrap_err().message,
            format!("Bitmap name too long: {long}")
        );
    }
}
