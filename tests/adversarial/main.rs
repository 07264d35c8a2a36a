//! Adversarial suite (issue F): each property the server promises under attack, tried the way an
//! attacker would, against a real `securerun serve` over loopback with raw sockets, HTTP/1.1 and
//! HTTP/2 clients, and hostile workers. Every test here failed on the code before the fix.

#[path = "../common/mod.rs"]
mod common;
mod harness;

mod audit_completeness;
mod clients;
mod concurrency;
mod local_users;
mod models;
mod router;
mod workers;
