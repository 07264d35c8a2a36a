//! Confinement and IPC for securerun's inference worker.
//!
//! - [`spawn`]: start the worker by re-executing a binary with a cleared environment, the IPC
//!   socket and the passed descriptors only ([`spawn::spawn`]); take them on the worker side
//!   ([`spawn::inherited`]).
//! - [`confine`]: rlimits, parent-death signal, OOM score, namespaces (PID namespace with a
//!   reaper), an empty root, no_new_privs, no capabilities, landlock and seccomp, applied to the
//!   calling process before it touches untrusted input; strict (fail closed) or permissive.
//!   [`forbid_new_threads`] adds the thread cap once the worker's compute threads exist.
//! - [`frame`]: versioned, length-prefixed frames with hard size limits and timeouts.
//! - [`probe`]: escape attempts that must fail inside a confined process.
//! - [`gpu`]: the extra grants and system calls a CUDA worker needs, as data.
//!
//! This crate knows nothing of models, HTTP or tokens. Linux only; the seccomp policy is written
//! for x86_64.

pub mod confine;
pub mod frame;
pub mod gpu;
pub mod probe;
pub mod seccomp;
pub mod spawn;

pub use confine::{
    confine, forbid_new_threads, landlock_abi, ConfineError, Confinement, Grant, GrantAccess,
    Layer, MemoryLimit, Mode, Report, ThreadCapError,
};
pub use frame::{Channel, FrameError, PROTOCOL_VERSION};
pub use spawn::{inherited, spawn, WorkerProcess, WorkerSpec};
