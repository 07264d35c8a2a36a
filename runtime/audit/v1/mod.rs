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

/// The v1 layout: one `checkpoints.jsonl` for all epochs, and none of the current format's
/// files (a `checkpoints.jsonl` planted beside a current log does not make it an old one).
pub fn is_v1(dir: &Path) -> bool {
    let has = |name: &str| securerun_models::fsutil::exists_no_follow(&dir.join(name));
    let current_format = std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.filter_map(|e| e.ok()).any(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            (n.starts_with("cp-") && n.ends_with(".jsonl"))
                || (n.starts_with("key-") && n.ends_with(".wrap"))
                || n == super::recipient::RECIPIENT
        })
    });
    has(checkpoint::CHECKPOINTS) && !current_format
}
