//! Turning panics inside third-party model code into errors.

use std::panic::{self, AssertUnwindSafe};

/// Runs `f`, returning the panic message as an error if it panics. The process-wide panic hook
/// (set by the CLI) decides whether anything is printed; the error carries the message.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        if let Some(s) = payload.downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "internal error in model code".to_string()
        }
    })
}
