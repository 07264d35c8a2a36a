//! The on-disk format: segment files of sealed, hash-chained frames, and the names of every
//! per-epoch file.
//!
//! `seg-EEEEEEEE.log` holds the records of epoch E (one segment per epoch, E ≥ 1). A frame is
//! `[u32 LE length][u64 seq][u32 epoch][24-byte nonce][XChaCha20-Poly1305 ciphertext + tag]
//! [16-byte writer MAC]`. The writer MAC (HMAC-SHA256 under a key only the host's writer holds,
//! over the frame and the previous head) lets the writer refuse, on restart, records that a
//! holder of the read key sealed in after a crash; verifiers do not have (or need) that key.
//! The AEAD's associated data binds the sequence number, the epoch and the chain head before the
//! record, so a record cannot be moved, reordered, replayed or re-sealed under another epoch's
//! key without failing authentication. The chain head after a record is
//! `SHA-256(previous head || frame without its length)`: it needs no key, so a holder of the
//! public checkpoint root alone can check the chain against signed checkpoints.
//!
//! Reading is bounded and does not follow links: files are opened with `O_NOFOLLOW`, must be
//! regular, and are read one frame at a time (at most [`MAX_FRAME`] bytes), so a huge sparse
//! file, a FIFO or `/dev/zero` behind a link costs neither memory nor a hang.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

const AAD_TAG: &[u8] = b"securerun-audit-v2";
const HEADER: usize = 8 + 4 + 24;
/// The writer MAC at the end of each frame body.
const WRITER_MAC: usize = 16;
/// Largest frame accepted when reading (a record is a few hundred bytes).
pub const MAX_FRAME: usize = 1 << 20;

pub fn segment_name(epoch: u32) -> String {
    format!("seg-{epoch:08}.log")
}

/// The kinds of per-epoch file, by name prefix and suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Segment,
    Checkpoints,
    Wrap,
}

impl Kind {
    fn affixes(self) -> (&'static str, &'static str) {
        match self {
            Kind::Segment => ("seg-", ".log"),
            Kind::Checkpoints => ("cp-", ".jsonl"),
            Kind::Wrap => ("key-", ".wrap"),
        }
    }

    pub fn name(self, epoch: u32) -> String {
        let (p, s) = self.affixes();
        format!("{p}{epoch:08}{s}")
    }
}

/// Every per-epoch file in an audit directory, and any name that looks like one but is not in
/// the exact form the writer makes (`seg-0.log`, `seg-00000001.log.bak`, a directory or a
/// link named like a segment): those were planted or left by hand, and the writer refuses
/// to continue over them.
#[derive(Debug, Default)]
pub struct Listing {
    pub files: std::collections::BTreeMap<(u32, Kind), PathBuf>,
    pub unknown: Vec<String>,
}

impl Listing {
    pub fn of(dir: &Path) -> std::io::Result<Listing> {
        let mut out = Listing::default();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // The old format's checkpoint file has no place in this one: planted beside a log,
            // it would steer a verifier to the old format's weaker checks.
            if name == super::v1::checkpoint::CHECKPOINTS {
                out.unknown.push(name);
                continue;
            }
            let kind = [Kind::Segment, Kind::Checkpoints, Kind::Wrap]
                .into_iter()
                .find(|k| name.starts_with(k.affixes().0));
            let Some(kind) = kind else { continue };
            let (p, s) = kind.affixes();
            let epoch = name
                .strip_prefix(p)
                .and_then(|n| n.strip_suffix(s))
                .filter(|n| n.len() == 8 && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse::<u32>().ok());
            let regular = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
            match epoch {
                Some(e) if regular && !(kind != Kind::Checkpoints && e == 0) => {
                    out.files.insert((e, kind), entry.path());
                }
                _ => out.unknown.push(name),
            }
        }
        out.unknown.sort();
        Ok(out)
    }

    pub fn get(&self, epoch: u32, kind: Kind) -> Option<&PathBuf> {
        self.files.get(&(epoch, kind))
    }

    /// The highest epoch any file names.
    pub fn newest(&self) -> Option<u32> {
        self.files.keys().map(|(e, _)| *e).max()
    }

    pub fn segments(&self) -> impl Iterator<Item = (u32, &PathBuf)> {
        self.files
            .iter()
            .filter(|((_, k), _)| *k == Kind::Segment)
            .map(|((e, _), p)| (*e, p))
    }
}

fn aad(seq: u64, epoch: u32, prev: &[u8; 32]) -> Vec<u8> {
    let mut a = AAD_TAG.to_vec();
    a.extend_from_slice(&seq.to_le_bytes());
    a.extend_from_slice(&epoch.to_le_bytes());
    a.extend_from_slice(prev);
    a
}

/// Seals one record; returns the frame (with its length prefix) and the new chain head.
/// `writer_mac` tags the frame and the previous head (see the module docs).
pub fn seal(
    cipher: &XChaCha20Poly1305,
    writer_mac: impl Fn(&[u8]) -> [u8; 16],
    seq: u64,
    epoch: u32,
    prev: &[u8; 32],
    plaintext: &[u8],
) -> (Vec<u8>, [u8; 32]) {
    let nonce = super::keys::random_bytes::<24>();
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
    let tag = writer_mac(&mac_input(&body, prev));
    body.extend_from_slice(&tag);
    let head = chain(prev, &body);
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    (frame, head)
}

fn mac_input(body: &[u8], prev: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(body.len() + 32);
    m.extend_from_slice(body);
    m.extend_from_slice(prev);
    m
}

pub fn cipher(record_key: &[u8; 32]) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(record_key.into())
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
    pub fn open(&self, cipher: &XChaCha20Poly1305, prev: &[u8; 32]) -> Option<Vec<u8>> {
        let nonce = &self.body[12..HEADER];
        cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: &self.body[HEADER..self.body.len() - WRITER_MAC],
                    aad: &aad(self.seq, self.epoch, prev),
                },
            )
            .ok()
    }

    /// Whether the writer MAC is the one `writer_mac` computes (constant time).
    pub fn writer_made(&self, writer_mac: impl Fn(&[u8]) -> [u8; 16], prev: &[u8; 32]) -> bool {
        use subtle::ConstantTimeEq;
        let (sealed, tag) = self.body.split_at(self.body.len() - WRITER_MAC);
        writer_mac(&mac_input(sealed, prev)).ct_eq(tag).into()
    }

    /// Bytes on disk, length prefix included.
    pub fn len_on_disk(&self) -> u64 {
        4 + self.body.len() as u64
    }
}

/// Opens a file for reading without following a final link; it must be a regular file.
pub fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    Ok(f)
}

/// Reads a segment one frame at a time.
pub struct Reader {
    file: std::io::BufReader<std::fs::File>,
    pos: u64,
    len: u64,
}

/// What ends a segment early: an incomplete or impossible frame at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Torn {
    pub offset: u64,
}

impl Reader {
    pub fn open(path: &Path) -> std::io::Result<Reader> {
        let file = open_regular(path)?;
        let len = file.metadata()?.len();
        Ok(Reader {
            file: std::io::BufReader::with_capacity(64 * 1024, file),
            pos: 0,
            len,
        })
    }

    /// The file's size when opened.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The next frame; `Ok(None)` at a clean end; `Err(Torn)` where the bytes stop being
    /// frames (a crash in the middle of a write, or garbage). I/O errors are `Err(Torn)` too,
    /// at the position reached, with the error returned separately by [`Self::error`].
    pub fn next_frame(&mut self) -> std::io::Result<Result<Option<Frame>, Torn>> {
        let offset = self.pos;
        if offset >= self.len {
            return Ok(Ok(None));
        }
        let torn = Ok(Err(Torn { offset }));
        if self.len - offset < 4 {
            return torn;
        }
        let mut len = [0u8; 4];
        self.file.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len) as usize;
        if !(HEADER + 16 + WRITER_MAC..=MAX_FRAME).contains(&len)
            || (self.len - offset - 4) < len as u64
        {
            return torn;
        }
        let mut body = vec![0u8; len];
        self.file.read_exact(&mut body)?;
        self.pos = offset + 4 + len as u64;
        Ok(Ok(Some(Frame {
            offset,
            seq: u64::from_le_bytes(body[..8].try_into().expect("8 bytes")),
            epoch: u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")),
            body,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exact_names_of_regular_files_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "seg-00000001.log",
            "cp-00000000.jsonl",
            "key-00000001.wrap",
            "seg-0.log",
            "seg-00000000.log",
            "seg-00000002.log.bak",
            "current.key",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("seg-00000003.log")).unwrap();
        let l = Listing::of(dir.path()).unwrap();
        assert_eq!(l.files.len(), 3);
        assert_eq!(
            l.unknown,
            vec![
                "seg-0.log",
                "seg-00000000.log",
                "seg-00000002.log.bak",
                "seg-00000003.log"
            ]
        );
    }

    #[test]
    fn a_huge_sparse_segment_or_a_link_costs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg-00000001.log");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(3 << 30).unwrap();
        let mut r = Reader::open(&path).unwrap();
        assert_eq!(r.next_frame().unwrap().unwrap_err(), Torn { offset: 0 });
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(Reader::open(&link).is_err());
    }
}
