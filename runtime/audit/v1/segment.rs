//! The on-disk format: segment files of sealed, hash-chained frames.
//!
//! `seg-EEEEEEEE.log` holds the records of epoch E (one segment per epoch). A frame is
//! `[u32 LE length][u64 seq][u32 epoch][24-byte nonce][XChaCha20-Poly1305 ciphertext + tag]`.
//! The AEAD's associated data binds the sequence number, the epoch and the chain head before the
//! record, so a record cannot be moved, reordered, replayed or re-sealed under another epoch's
//! key without failing authentication. The chain head after a record is
//! `SHA-256(previous head || frame without its length)`; it needs no key, so the writer can
//! resume a chain after a restart without the earlier epochs' keys.

use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};

const AAD_TAG: &[u8] = b"securerun-audit-v1";
const HEADER: usize = 8 + 4 + 24;
/// Largest frame accepted when reading (a record is a few hundred bytes).
pub const MAX_FRAME: usize = 1 << 20;

pub fn segment_name(epoch: u32) -> String {
    format!("seg-{epoch:08}.log")
}

/// Segment files in `dir`, by epoch.
pub fn list_segments(dir: &Path) -> std::io::Result<Vec<(u32, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(epoch) = name
            .strip_prefix("seg-")
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse().ok())
        {
            out.push((epoch, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn aad(seq: u64, epoch: u32, prev: &[u8; 32]) -> Vec<u8> {
    let mut a = AAD_TAG.to_vec();
    a.extend_from_slice(&seq.to_le_bytes());
    a.extend_from_slice(&epoch.to_le_bytes());
    a.extend_from_slice(prev);
    a
}

/// Seals one record; returns the frame (with its length prefix) and the new chain head.
pub fn seal(
    record_key: &[u8; 32],
    seq: u64,
    epoch: u32,
    prev: &[u8; 32],
    plaintext: &[u8],
) -> (Vec<u8>, [u8; 32]) {
    let mut nonce = [0u8; 24];
    OsRng.fill_bytes(&mut nonce);
    let cipher = XChaCha20Poly1305::new(record_key.into());
    let ct = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: &aad(seq, epoch, prev),
            },
        )
        .expect("XChaCha20-Poly1305 encryption does not fail for in-memory buffers");
    let mut body = Vec::with_capacity(HEADER + ct.len());
    body.extend_from_slice(&seq.to_le_bytes());
    body.extend_from_slice(&epoch.to_le_bytes());
    body.extend_from_slice(&nonce);
    body.extend_from_slice(&ct);
    let head = chain(prev, &body);
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    (frame, head)
}

pub fn chain(prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(body);
    h.finalize().into()
}

/// A frame as read from disk, not yet authenticated.
#[derive(Debug, Clone)]
pub struct Frame {
    pub offset: u64,
    pub seq: u64,
    pub epoch: u32,
    pub body: Vec<u8>,
}

impl Frame {
    /// Decrypts and authenticates against the expected position in the chain.
    pub fn open(&self, record_key: &[u8; 32], prev: &[u8; 32]) -> Option<Vec<u8>> {
        let nonce = &self.body[12..HEADER];
        XChaCha20Poly1305::new(record_key.into())
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: &self.body[HEADER..],
                    aad: &aad(self.seq, self.epoch, prev),
                },
            )
            .ok()
    }
}

/// Everything in one segment file: its complete frames and, if the file ends inside a frame,
/// where (a torn tail, e.g. from a crash during a write).
#[derive(Debug, Default)]
pub struct Contents {
    pub frames: Vec<Frame>,
    pub torn_at: Option<u64>,
    pub len: u64,
}

pub fn read(path: &Path) -> std::io::Result<Contents> {
    Ok(read_bytes(&std::fs::read(path)?))
}

/// Splits a segment's bytes into frames (see [`read`]).
pub fn read_bytes(bytes: &[u8]) -> Contents {
    let mut c = Contents {
        len: bytes.len() as u64,
        ..Default::default()
    };
    let mut pos = 0usize;
    while pos < bytes.len() {
        let Some(len) = bytes.get(pos..pos + 4) else {
            c.torn_at = Some(pos as u64);
            break;
        };
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        let Some(body) = bytes.get(pos + 4..pos + 4 + len) else {
            c.torn_at = Some(pos as u64);
            break;
        };
        if !(HEADER + 16..=MAX_FRAME).contains(&len) {
            c.torn_at = Some(pos as u64);
            break;
        }
        c.frames.push(Frame {
            offset: pos as u64,
            seq: u64::from_le_bytes(body[..8].try_into().expect("8 bytes")),
            epoch: u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")),
            body: body.to_vec(),
        });
        pos += 4 + len;
    }
    c
}
