//! Request validation: the one place that decides whether a request may
//! reach the block layer, and with which NBD error it is refused.

use super::export::Export;
use super::proto::*;

/// How many payload bytes follow a request header on the wire. Known before
/// validation, because even a refused request's payload must be consumed.
pub fn payload_len(req: &Request, mode: Mode) -> u64 {
    match req.kind {
        // qemu 10 sends extended writes without PAYLOAD_LEN; like qemu's
        // server we take the length as the payload either way.
        CMD_WRITE => req.length,
        _ if mode == Mode::Extended && req.flags & CMD_FLAG_PAYLOAD_LEN != 0 => req.length,
        _ => 0,
    }
}

/// A refusal: the NBD error code and a message for the human.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub errno: u32,
    pub msg: String,
}

fn refuse(errno: u32, msg: impl Into<String>) -> Result<(), Refusal> {
    Err(Refusal {
        errno,
        msg: msg.into(),
    })
}

/// Checks a request against the export and the negotiated state. `effect_len`
/// is the length the command acts on (for block status with a payload, the
/// length from the payload).
pub fn validate(
    req: &Request,
    effect_len: u64,
    export: &Export,
    mode: Mode,
    contexts: usize,
) -> Result<(), Refusal> {
    let name = qemu_cmd_name(req.kind);
    let mut valid = CMD_FLAG_FUA;
    match req.kind {
        CMD_READ if mode >= Mode::Structured => valid |= CMD_FLAG_DF,
        CMD_READ | CMD_FLUSH | CMD_TRIM | CMD_CACHE | CMD_DISC => {}
        CMD_WRITE => {}
        CMD_WRITE_ZEROES => valid |= CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => valid |= CMD_FLAG_REQ_ONE,
        other => return refuse(EINVAL, format!("invalid request type ({other}) received")),
    }
    if mode == Mode::Extended && matches!(req.kind, CMD_WRITE | CMD_BLOCK_STATUS) {
        valid |= CMD_FLAG_PAYLOAD_LEN;
    }
    if req.flags & !valid != 0 {
        return refuse(
            EINVAL,
            format!(
                "unsupported flags for command {name} (got {:#x})",
                req.flags
            ),
        );
    }
    if matches!(req.kind, CMD_READ | CMD_WRITE) && effect_len > MAX_BLOCK as u64 {
        return refuse(
            EINVAL,
            format!("len ({effect_len}) is larger than max len ({MAX_BLOCK})"),
        );
    }
    if !matches!(req.kind, CMD_FLUSH | CMD_DISC) {
        let size = export.size();
        if req.offset > size || effect_len > size - req.offset {
            // qemu's error and text for every command (the spec would have
            // ENOSPC for writes; qemu's clients see EINVAL).
            return refuse(
                EINVAL,
                format!(
                    "operation past EOF; From: {}, Len: {}, Size: {}",
                    req.offset, effect_len, size
                ),
            );
        }
    }
    if export.read_only && matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM) {
        // qemu's error and text (the spec would have EPERM).
        return refuse(EINVAL, "Export is read-only");
    }
    if req.kind == CMD_BLOCK_STATUS {
        if mode == Mode::Simple || contexts == 0 {
            return refuse(EINVAL, NOT_NEGOTIATED);
        }
        if effect_len == 0 {
            return refuse(EINVAL, "need non-zero length");
        }
    }
    Ok(())
}

const NOT_NEGOTIATED: &str = "CMD_BLOCK_STATUS not negotiated";

/// Parses a block-status payload (extended headers): the effect length and
/// the context IDs to report. It must list at least one ID, each among the
/// selected ones and none twice; anything else gets qemu's refusal (that
/// nothing was negotiated, when no context was selected).
pub fn block_status_payload(payload: &[u8], selected: &[u32]) -> Result<(u64, Vec<u32>), Refusal> {
    if selected.is_empty() {
        return Err(Refusal {
            errno: EINVAL,
            msg: NOT_NEGOTIATED.into(),
        });
    }
    let bad = || Refusal {
        errno: EINVAL,
        msg: "CMD_BLOCK_STATUS payload not valid".into(),
    };
    if payload.len() < 12 || !(payload.len() - 8).is_multiple_of(4) {
        return Err(bad());
    }
    let mut c = Cursor::new(payload);
    let effect = c.u64().ok_or_else(bad)?;
    let mut ids = Vec::new();
    while c.remaining() > 0 {
        let id = c.u32().ok_or_else(bad)?;
        if !selected.contains(&id) || ids.contains(&id) {
            return Err(bad());
        }
        ids.push(id);
    }
    ids.sort_unstable();
    Ok((effect, ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(ids: &[u32]) -> Vec<u8> {
        let mut p = Vec::new();
        put64(&mut p, 65536);
        for &id in ids {
            put32(&mut p, id);
        }
        p
    }

    #[test]
    fn block_status_payload_ids_are_selected_ones_each_once() {
        let selected = [0, 3];
        let ok = block_status_payload(&payload(&[3, 0]), &selected).ok();
        assert_eq!(ok, Some((65536, vec![0, 3])));
        // qemu refuses an ID it did not select, or one given twice.
        for ids in [&[2][..], &[1], &[0, 0], &[3, 0, 3], &[]] {
            let r = block_status_payload(&payload(ids), &selected);
            assert!(r.is_err(), "{ids:?}");
        }
        let r = block_status_payload(&payload(&[0]), &[]).err();
        assert_eq!(r.map(|r| r.msg), Some(NOT_NEGOTIATED.to_owned()));
    }
}
