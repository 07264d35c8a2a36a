//! The audit log over a real server (issue G): every request and operator event recorded,
//! nothing secret or private in the files, and a tamper suite that tries each manipulation as
//! each attacker could — a writer of the files, a holder of the read key, a thief of the
//! running host's state and memory, a holder of an old `current.key` — and checks that
//! `audit verify` with the off-host material (audit.pub, the read key, anchors from the
//! checkpoint sink) detects it and names where. Fault injection: full disk, file-size limit,
//! a live segment deleted, an unwritable checkpoint sink, kill -9 under traffic.

#[path = "../common/mod.rs"]
mod common;
mod harness;

mod faults;
mod lifecycle;
mod memory;
mod server;
mod tamper;
