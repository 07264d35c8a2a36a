//! Key bytes that stay in one place: a single heap allocation, locked in RAM where the kernel
//! allows it (so it is not swapped out), filled and read in place, and zeroed when dropped.
//!
//! Why not a plain `[u8; 32]`: every move of an array copies it, and the old copy stays in
//! freed stack or heap memory until something overwrites it. A memory image of the server
//! at epoch N must not hold a key of an earlier epoch, so a secret is written once, where it
//! lives, and is never moved.

use rand_core::{OsRng, RngCore};
use zeroize::{Zeroize, Zeroizing};

pub struct Secret(Box<[u8; 32]>);

impl Secret {
    fn zeroed() -> Self {
        let bytes = Box::new([0u8; 32]);
        // SAFETY: mlock on the 32 bytes of a live allocation we own; it only pins the page(s)
        // holding them. Failure (RLIMIT_MEMLOCK) is harmless: the secret is then swappable.
        unsafe { libc::mlock(bytes.as_ptr().cast(), 32) };
        Secret(bytes)
    }

    /// Fresh bytes from the OS random generator, written in place.
    pub fn random() -> Self {
        let mut s = Self::zeroed();
        OsRng.fill_bytes(&mut s.0[..]);
        s
    }

    /// Decodes 64 hex digits in place.
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut s = Self::zeroed();
        hex::decode_to_slice(text, &mut s.0[..]).ok()?;
        Some(s)
    }

    /// Copies `bytes` in (the caller zeroes its own copy).
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut s = Self::zeroed();
        if bytes.len() != 32 {
            return None;
        }
        s.0.copy_from_slice(bytes);
        Some(s)
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// Hex, in a string that is zeroed when dropped.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(&self.0[..]))
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}
