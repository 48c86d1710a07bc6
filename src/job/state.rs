//! QEMU's job states and verbs (qapi/job.json), with the transition table
//! and the verb table of qemu's job.c: the one place that says which state
//! may follow which, and which command a job accepts in which state.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Undefined,
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobVerb {
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Complete,
    Finalize,
    Dismiss,
}

impl JobStatus {
    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// Whether qemu's table allows going from `self` to `to`.
    pub fn may_become(self, to: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, to),
            (Undefined, Created)
                | (Created, Running | Aborting | Null)
                | (Running, Paused | Ready | Waiting | Aborting)
                | (Paused, Running)
                | (Ready, Standby | Waiting | Aborting)
                | (Standby, Ready)
                | (Waiting, Pending | Aborting)
                | (Pending, Aborting | Concluded)
                | (Aborting, Aborting | Concluded)
                | (Concluded, Null)
        )
    }

    /// Whether a job in this state is done running (qemu's
    /// job_is_completed).
    pub fn is_completed(self) -> bool {
        use JobStatus::*;
        matches!(self, Waiting | Pending | Aborting | Concluded | Null)
    }
}

impl JobVerb {
    pub fn name(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
        }
    }

    /// Whether a job in `status` accepts this verb (qemu's JobVerbTable).
    pub fn allowed_in(self, status: JobStatus) -> bool {
        use JobStatus::*;
        match self {
            JobVerb::Cancel => matches!(
                status,
                Created | Running | Paused | Ready | Standby | Waiting | Pending
            ),
            JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed => {
                matches!(status, Created | Running | Paused | Ready | Standby)
            }
            JobVerb::Complete => status == Ready,
            JobVerb::Finalize => status == Pending,
            JobVerb::Dismiss => status == Concluded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_match_qemu() {
        assert!(JobStatus::Running.may_become(JobStatus::Waiting));
        assert!(!JobStatus::Concluded.may_become(JobStatus::Running));
        assert!(JobStatus::Aborting.may_become(JobStatus::Aborting));
        assert!(JobVerb::Cancel.allowed_in(JobStatus::Pending));
        assert!(!JobVerb::Cancel.allowed_in(JobStatus::Concluded));
        assert!(JobVerb::Dismiss.allowed_in(JobStatus::Concluded));
        assert!(!JobVerb::Pause.allowed_in(JobStatus::Waiting));
    }
}
