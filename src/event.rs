//! QMP events: one enum with qemu's names and fields, serialised here and
//! nowhere else.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Value};

use crate::job::{JobStatus, JobType};

/// What happened, with qemu's event name and data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", content = "data", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventKind {
    /// An export is gone (block-export-del, nbd-server-stop, quit).
    BlockExportDeleted { id: String },
    /// A job changed state.
    JobStatusChange { id: String, status: JobStatus },
    /// A block job ended (with `error` when it failed).
    BlockJobCompleted {
        #[serde(rename = "type")]
        job_type: JobType,
        device: String,
        len: u64,
        offset: u64,
        speed: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A block job was cancelled.
    BlockJobCancelled {
        #[serde(rename = "type")]
        job_type: JobType,
        device: String,
        len: u64,
        offset: u64,
        speed: u64,
    },
    /// A block job met an I/O error; `action` says what it did about it.
    BlockJobError {
        device: String,
        operation: &'static str,
        action: &'static str,
    },
    /// A job that keeps two nodes in sync (mirror, active commit) has
    /// converged: job-complete may now pivot.
    BlockJobReady {
        #[serde(rename = "type")]
        job_type: JobType,
        device: String,
        len: u64,
        offset: u64,
        speed: u64,
    },
    /// A pull-backup session ended by itself: no client was connected to
    /// its exports for its lease (tidemark's extension). It ended as a
    /// failure: its new checkpoint is taken back.
    XTidemarkBackupExpired { id: String },
    /// A pull-backup session's snapshot of disk `node` broke: a copy
    /// before a guest write failed or would have passed the scratch quota
    /// (tidemark's extension). The guest's write went on; the session's
    /// reads fail from now on.
    XTidemarkBackupBroken {
        id: String,
        node: String,
        reason: String,
    },
    /// A block job waits for job-finalize (auto-finalize off).
    BlockJobPending {
        #[serde(rename = "type")]
        job_type: JobType,
        id: String,
    },
}

/// An event as every negotiated QMP client receives it.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    pub seconds: u64,
    pub microseconds: u32,
}

impl Event {
    /// Stamps `kind` with the current time.
    pub fn now(kind: EventKind) -> Event {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Event {
            kind,
            seconds: now.as_secs(),
            microseconds: now.subsec_micros(),
        }
    }

    /// qemu's wire form: `{"timestamp": ..., "event": NAME, "data": {...}}`.
    pub fn to_json(&self) -> Value {
        let v = serde_json::to_value(&self.kind).unwrap_or_else(|_| json!({}));
        json!({
            "timestamp": {"seconds": self.seconds, "microseconds": self.microseconds},
            "event": v["event"],
            "data": v["data"],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialise_with_qemu_names() {
        let e = Event::now(EventKind::BlockExportDeleted { id: "e0".into() });
        let v = e.to_json();
        assert_eq!(v["event"], "BLOCK_EXPORT_DELETED");
        assert_eq!(v["data"], json!({"id": "e0"}));
        assert!(v["timestamp"]["seconds"].as_u64().is_some());
    }
}
