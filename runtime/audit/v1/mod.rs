//! The audit log format before securerun 0.2 (v1), kept read-only so that logs written by
//! earlier versions still verify (`audit verify` on such a directory) and can be migrated
//! (`audit migrate`). Nothing here writes: v1's design let its read key sign checkpoints,
//! which the current format ([`super`]) fixes.

pub mod checkpoint;
pub mod keys;
pub mod segment;
pub mod verify;

use std::path::Path;

pub use super::{now_ms, AuditError, AuditRecord};

/// The v1 layout: one `checkpoints.jsonl` for all epochs (v2 has one file per epoch).
pub fn is_v1(dir: &Path) -> bool {
    securerun_models::fsutil::exists_no_follow(&dir.join(checkpoint::CHECKPOINTS))
}
