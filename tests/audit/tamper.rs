//! The tamper suite: each manipulation, by each attacker, against logs a real server wrote.
//! `verify` gets only off-host material (the auditor's audit.pub and read key, anchors), must
//! fail naming where, and must never panic.

use std::path::Path;

use crate::common::{p, securerun};
use crate::harness::*;
use securerun::audit::checkpoint::Checkpoint;
use securerun::audit::keys::EpochSecrets;
use securerun::audit::recipient::{self, ReadKey, Wrapped};
use securerun::audit::segment;

/// Re-seals every frame of `seg` under `record_key` after `edit` changed the plaintexts,
/// chaining from `start`; returns the new bytes. `open_with` opens the originals.
fn reseal(
    path: &Path,
    open_with: &[u8; 32],
    seal_with: &[u8; 32],
    start: [u8; 32],
    mut edit: impl FnMut(usize, Vec<u8>) -> Vec<u8>,
) -> Vec<u8> {
    let (open, seal) = (segment::cipher(open_with), segment::cipher(seal_with));
    let mut r = segment::Reader::open(path).unwrap();
    let (mut original, mut head) = (start, start);
    let mut out = Vec::new();
    let mut i = 0;
    while let Ok(Some(f)) = r.next_frame().unwrap() {
        let plain = f.open(&open, &original).expect("the original opens");
        original = segment::chain(&original, &f.body);
        // The writer's MAC key is the host's alone: a forger can only guess the tag.
        let (frame, next) =
            segment::seal(&seal, |_| [0u8; 16], f.seq, f.epoch, &head, &edit(i, plain));
        out.extend_from_slice(&frame);
        head = next;
        i += 1;
    }
    out
}

/// Where epoch `e` began, from its handover (the last line of the previous epoch's file).
fn start_of(state: &Path, e: u32) -> [u8; 32] {
    let last = lines(&cp(state, e - 1)).pop().unwrap();
    Checkpoint::from_line(&last).unwrap().head_bytes().unwrap()
}

fn record_key(state: &Path, auditor: &Auditor, e: u32) -> [u8; 32] {
    let w = Wrapped::read(&state.join("audit").join(recipient::wrap_name(e))).unwrap();
    *ReadKey::load(&auditor.key)
        .unwrap()
        .unwrap(&w, e)
        .unwrap()
        .expose()
}

#[test]
fn a_writer_of_the_files_is_caught_with_the_position() {
    let (state, _, auditor) = session();
    let s = state.path();
    assert_eq!(newest_epoch(s), 4);
    auditor.passes(s, &[]);
    // Epoch 3 (the first server run) is closed: its final checkpoint attests its end.
    let original = seg(s, 3);
    let bytes = std::fs::read(&original).unwrap();
    let fr = frames(&original);
    assert!(fr.len() >= 5);
    let first = frames(&seg(s, 2)).len() as u64;

    // A flipped byte inside a record.
    let c = copy(s);
    let mut b = bytes.clone();
    b[fr[2].0 + 50] ^= 1;
    std::fs::write(seg(c.path(), 3), &b).unwrap();
    let err = auditor.detects_as(
        c.path(),
        &[],
        "different chain head",
        "authentication failed",
    );
    assert!(err.contains(&format!("record {}", first + 3)), "{err}");

    // A deleted record, an inserted (duplicated) one, two swapped.
    let c = copy(s);
    let mut b = bytes.clone();
    b.drain(fr[2].0..fr[2].0 + fr[2].1);
    std::fs::write(seg(c.path(), 3), &b).unwrap();
    auditor.detects(c.path(), &[], &format!("sequence number {}", first + 4));
    let c = copy(s);
    let mut b = bytes.clone();
    b.splice(fr[2].0..fr[2].0, bytes[fr[1].0..fr[1].0 + fr[1].1].to_vec());
    std::fs::write(seg(c.path(), 3), &b).unwrap();
    auditor.detects(c.path(), &[], &format!("sequence number {}", first + 2));
    let c = copy(s);
    let mut b = bytes[..fr[1].0].to_vec();
    b.extend_from_slice(&bytes[fr[2].0..fr[2].0 + fr[2].1]);
    b.extend_from_slice(&bytes[fr[1].0..fr[1].0 + fr[1].1]);
    b.extend_from_slice(&bytes[fr[2].0 + fr[2].1..]);
    std::fs::write(seg(c.path(), 3), &b).unwrap();
    auditor.detects(c.path(), &[], "deleted, inserted or reordered");

    // The last record of a closed epoch cut: its final checkpoint says where it ended.
    let c = copy(s);
    std::fs::write(seg(c.path(), 3), &bytes[..fr.last().unwrap().0]).unwrap();
    auditor.detects(c.path(), &[], "cut off the end");

    // A missing middle segment.
    let c = copy(s);
    std::fs::remove_file(seg(c.path(), 3)).unwrap();
    auditor.detects(c.path(), &[], "segment is missing");

    // The final checkpoint of a closed epoch removed, or its whole checkpoint file.
    let c = copy(s);
    let mut l = lines(&cp(c.path(), 3));
    l.pop();
    write_lines(&cp(c.path(), 3), &l);
    auditor.detects(c.path(), &[], "a final checkpoint was removed");
    let c = copy(s);
    std::fs::remove_file(cp(c.path(), 2)).unwrap();
    auditor.detects(c.path(), &[], "a final checkpoint was removed");

    // An edited checkpoint, a line that is not one.
    let c = copy(s);
    let mut l = lines(&cp(c.path(), 4));
    let mut v: serde_json::Value = serde_json::from_str(&l[0]).unwrap();
    v["seq"] = (v["seq"].as_u64().unwrap() - 1).into();
    l[0] = v.to_string();
    write_lines(&cp(c.path(), 4), &l);
    auditor.detects(c.path(), &[], "does not verify");
    let c = copy(s);
    let mut l = lines(&cp(c.path(), 3));
    l.insert(0, "{\"epoch\": 3}".into());
    write_lines(&cp(c.path(), 3), &l);
    auditor.detects(c.path(), &[], "not a checkpoint");

    // Planted files: a future segment (empty or not), names not in the writer's form.
    for (name, needle) in [
        ("seg-00000009.log", "files of epoch 9 exist"),
        ("seg-4000000000.log", "not in the writer's form"),
        ("seg-0.log", "not in the writer's form"),
        ("seg-00000000.log", "not in the writer's form"),
        ("cp-00000005.jsonl", "files of epoch 5 exist"),
    ] {
        let c = copy(s);
        std::fs::write(c.path().join("audit").join(name), b"").unwrap();
        auditor.detects(c.path(), &[], needle);
        // The writer refuses to go on over it, naming it.
        let err = serve(c.path(), None)
            .err()
            .expect("must not start over a planted file");
        assert!(err.contains("cannot be continued"), "{name}: {err}");
    }

    // Bounded, non-following reads: a 3 GB sparse segment, /dev/zero behind a link, a FIFO.
    let started = std::time::Instant::now();
    let c = copy(s);
    let f = std::fs::File::create(seg(c.path(), 3)).unwrap();
    f.set_len(3 << 30).unwrap();
    auditor.detects(c.path(), &[], "not records inside a closed epoch");
    let c = copy(s);
    std::fs::remove_file(seg(c.path(), 3)).unwrap();
    std::os::unix::fs::symlink("/dev/zero", seg(c.path(), 3)).unwrap();
    auditor.detects(c.path(), &[], "not in the writer's form");
    let c = copy(s);
    std::fs::remove_file(cp(c.path(), 3)).unwrap();
    let fifo = std::ffi::CString::new(p(&cp(c.path(), 3))).unwrap();
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    auditor.detects(c.path(), &[], "not a regular file");
    let c = copy(s);
    std::fs::remove_file(c.path().join("audit/writer.lock")).unwrap();
    let lock = std::ffi::CString::new(p(&c.path().join("audit/writer.lock"))).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::mkfifo(lock.as_ptr(), 0o600) }, 0);
    assert!(serve(c.path(), None).is_err(), "a FIFO as the lock file");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));

    // A wrapped key replaced: one made for another read key, or one the auditor's recipient
    // opens but that is not the key the handover committed to.
    let c = copy(s);
    let w = c.path().join("audit").join(recipient::wrap_name(3));
    let stranger = ReadKey::generate();
    stranger.recipient().wrap(3, &[7; 32]).store(&w).unwrap();
    let o = auditor.verify(c.path(), &[]);
    assert!(stderr(&o).contains("another read key"), "{}", stderr(&o));
    let mine = ReadKey::load(&auditor.key).unwrap();
    mine.recipient().wrap(3, &[7; 32]).store(&w).unwrap();
    let o = auditor.verify(c.path(), &[]);
    assert!(stderr(&o).contains("commitment"), "{}", stderr(&o));

    // A torn tail at the very end (a crash mid-write): noted, and the next start cuts it,
    // keeps the bytes aside and says so in the new epoch's first record.
    let c = copy(s);
    let last = seg(c.path(), 4);
    let mut b = std::fs::read(&last).unwrap();
    b.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3]);
    std::fs::write(&last, &b).unwrap();
    let out = auditor.passes(c.path(), &[]);
    assert!(out.contains("incomplete record"), "{out}");
    serve(c.path(), None).unwrap().stop();
    auditor.passes(c.path(), &[]);
    let noted = auditor
        .export(c.path(), &["--event", "audit_epoch_start"])
        .into_iter()
        .any(|r| {
            r["outcome"] == "recovered"
                && r["detail"].as_str().unwrap().contains("incomplete record")
        });
    assert!(noted);
    // Torn bytes inside a closed epoch are damage, not a crash.
    let c = copy(s);
    let mut b = bytes.clone();
    b.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3]);
    std::fs::write(seg(c.path(), 3), &b).unwrap();
    auditor.detects(c.path(), &[], "inside a closed epoch");
}

/// The verifier trusts only what the auditor brings: without --public (or an explicit
/// --trust-local-key) it refuses, and a log re-rooted on the host fails against the real root.
#[test]
fn verify_trusts_no_key_found_in_the_directory_unless_told() {
    let (state, _, auditor) = session();
    let o = audit(state.path(), &["verify"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--public"), "{}", stderr(&o));
    let o = audit(state.path(), &["export", "--public", p(&auditor.public)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--key"), "{}", stderr(&o));
    let o = audit(state.path(), &["verify", "--trust-local-key"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning: trusting audit.pub"));

    // A whole other log put in its place (made by anyone, even with the auditor's recipient
    // so that the read key opens it) fails at the root.
    let forged = tempfile::tempdir().unwrap();
    let recipient = forged.path().join("recipient.pub");
    std::fs::write(
        &recipient,
        ReadKey::load(&auditor.key).unwrap().recipient().encode(),
    )
    .unwrap();
    let o = securerun(&[
        "audit",
        "init",
        "--recipient",
        p(&recipient),
        "--state-dir",
        p(forged.path()),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    token(forged.path(), "someone", "embeddings");
    // The forger's log verifies against its own root...
    let o = audit(forged.path(), &["verify", "--trust-local-key"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // ...and not against the auditor's.
    auditor.detects(forged.path(), &[], "cp-00000000.jsonl line 1");
}

#[test]
fn a_read_key_holder_reads_but_cannot_forge() {
    let (state, _, auditor) = session();
    let s = state.path();
    // The read key opens epoch 3 and lets its holder re-encrypt edited records so that each
    // one authenticates — but the chain no longer meets the signed checkpoints.
    let key = record_key(s, &auditor, 3);
    let c = copy(s);
    let b = reseal(&seg(s, 3), &key, &key, start_of(s, 3), |i, plain| {
        if i == 1 {
            let mut r: serde_json::Value = serde_json::from_slice(&plain).unwrap();
            r["status"] = 200.into();
            serde_json::to_vec(&r).unwrap()
        } else {
            plain
        }
    });
    std::fs::write(seg(c.path(), 3), &b).unwrap();
    auditor.detects(c.path(), &[], "different chain head");

    // Nor can it sign: a checkpoint re-signed with any key it can make does not verify.
    let mut l = lines(&cp(c.path(), 3));
    let own = EpochSecrets::generate(3);
    let old = Checkpoint::from_line(l.last().unwrap()).unwrap();
    let mut forged =
        Checkpoint::sign(&own, old.seq, &[9; 32], &own.with_next_signing_key()).unwrap();
    forged.next_epoch = old.next_epoch;
    forged.next_key = old.next_key.clone();
    forged.next_commit = old.next_commit.clone();
    *l.last_mut().unwrap() = forged.to_line().trim_end().to_string();
    write_lines(&cp(c.path(), 3), &l);
    auditor.detects(c.path(), &[], "does not verify");
}

#[test]
fn a_thief_of_the_running_host_cannot_rewrite_the_past_nor_read_the_future() {
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    let t = token(s, "t", "embeddings");
    let auditor = Auditor::take(s);
    // Two runs; the thief copies the host's state (current.key included) during the second.
    let run = |text: &str| {
        let server = serve(s, None).unwrap();
        embeds(&server.addr, &t, text);
        server
    };
    run("first run").stop();
    let server = run("second run");
    let stolen = tempfile::tempdir().unwrap();
    std::fs::copy(
        s.join("audit/current.key"),
        stolen.path().join("current.key"),
    )
    .unwrap();
    let (epoch, record, _) = epoch_secrets(&stolen.path().join("current.key"));
    server.stop();
    // After the theft a new epoch begins: fresh keys the thief does not hold.
    run("after the theft").stop();
    assert_eq!(newest_epoch(s), epoch + 1);
    let thief = EpochSecrets::load(&stolen.path().join("current.key")).unwrap();

    // The past: rewriting the closed epoch before the theft and re-signing its checkpoints
    // with the stolen key fails (that epoch's signing key was erased before the theft).
    let c = copy(s);
    let prev = epoch - 1;
    let mut l = lines(&cp(c.path(), prev));
    for line in l.iter_mut() {
        let old = Checkpoint::from_line(line).unwrap();
        let mut forged = Checkpoint::sign(
            &thief,
            old.seq,
            &old.head_bytes().unwrap(),
            &thief.with_next_signing_key(),
        )
        .unwrap();
        forged.epoch = old.epoch;
        forged.next_epoch = old.next_epoch;
        forged.next_key = old.next_key.clone();
        forged.next_commit = old.next_commit.clone();
        *line = forged.to_line().trim_end().to_string();
    }
    write_lines(&cp(c.path(), prev), &l);
    auditor.detects(c.path(), &[], "does not verify");

    // The future: the stolen record key opens nothing of the next epoch, and records forged
    // into it with the stolen keys do not authenticate.
    let next = seg(s, epoch + 1);
    let mut r = segment::Reader::open(&next).unwrap();
    let f = r.next_frame().unwrap().unwrap().unwrap();
    assert!(f
        .open(&segment::cipher(&record), &start_of(s, epoch + 1))
        .is_none());
    let c = copy(s);
    let target = seg(c.path(), epoch + 1);
    let fr = frames(&target);
    let mut b = std::fs::read(&target).unwrap();
    let mut head = start_of(s, epoch + 1);
    let mut reader = segment::Reader::open(&target).unwrap();
    while let Ok(Some(f)) = reader.next_frame().unwrap() {
        head = segment::chain(&head, &f.body);
    }
    let seq = fr.len() as u64
        + Checkpoint::from_line(&lines(&cp(s, epoch)).pop().unwrap())
            .unwrap()
            .seq;
    let forged = br#"{"time_ms":1,"event":"token_created","detail":"nothing to see"}"#;
    let (frame, _) = segment::seal(
        &segment::cipher(&record),
        |_| [0u8; 16],
        seq + 1,
        epoch + 1,
        &head,
        forged,
    );
    b.extend_from_slice(&frame);
    std::fs::write(&target, &b).unwrap();
    // Integrity alone sees an unattested record; the read key sees the forgery.
    let mut a = vec!["verify"];
    a.extend(auditor.public_only());
    let o = audit(c.path(), &a);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("1 records after it are not yet attested"));
    let o = auditor.verify(c.path(), &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("authentication failed"),
        "{}",
        stderr(&o)
    );
}

/// A copy of an old `current.key` put back (a backup restored, a thief's copy) is refused:
/// the writer will not attest from a key the newest handover does not name.
#[test]
fn an_old_current_key_cannot_continue_the_log() {
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    token(s, "t", "embeddings");
    let auditor = Auditor::take(s);
    let backup = tempfile::tempdir().unwrap();
    std::fs::copy(s.join("audit/current.key"), backup.path().join("k")).unwrap();
    serve(s, None).unwrap().stop();
    std::fs::copy(backup.path().join("k"), s.join("audit/current.key")).unwrap();
    let err = serve(s, None)
        .err()
        .expect("must not start with an old key");
    assert!(err.contains("is not the key the newest handover"), "{err}");
    // And a missing one never makes a new root over the records.
    std::fs::remove_file(s.join("audit/current.key")).unwrap();
    let err = serve(s, None)
        .err()
        .expect("must not start without its key");
    assert!(err.contains("current.key is missing"), "{err}");
    auditor.passes(s, &[]);
}

#[test]
fn the_end_of_the_log_is_anchored_by_the_sink_and_audit_anchor() {
    let sink_dir = tempfile::tempdir().unwrap();
    let sink = sink_dir.path().join("heads.jsonl");
    let spec = format!("file:{}", sink.display());
    let (state, _, auditor) = session_with(&["--checkpoint-sink", &spec]);
    let s = state.path();
    let anchor = ["--anchor", p(&sink)];
    let out = auditor.passes(s, &anchor);
    assert!(out.contains("anchors agree"), "{out}");
    // `audit anchor` prints the newest signed head; it verifies as an anchor too.
    let mut a = vec!["anchor"];
    a.extend(auditor.public_only());
    let o = audit(s, &a);
    assert!(o.status.success(), "{}", stderr(&o));
    let head = sink_dir.path().join("head.json");
    std::fs::write(&head, &o.stdout).unwrap();
    auditor.passes(s, &["--anchor", p(&head)]);

    // The newest epoch erased whole, its handover line included: without an anchor the log
    // looks complete (and verify says how far that guarantee goes); the anchor catches it.
    let c = copy(s);
    let dir = c.path().join("audit");
    let newest = newest_epoch(c.path());
    for name in [
        segment::segment_name(newest),
        segment::Kind::Checkpoints.name(newest),
        recipient::wrap_name(newest),
    ] {
        std::fs::remove_file(dir.join(name)).unwrap();
    }
    let mut l = lines(&cp(c.path(), newest - 1));
    l.pop();
    write_lines(&cp(c.path(), newest - 1), &l);
    let out = auditor.passes(c.path(), &[]);
    assert!(out.contains("cannot be excluded"), "{out}");
    auditor.detects(c.path(), &anchor, "newest epochs were removed");

    // The newest records and the checkpoint that attested them cut: likewise.
    let c = copy(s);
    let last = seg(c.path(), newest);
    let fr = frames(&last);
    let b = std::fs::read(&last).unwrap();
    std::fs::write(&last, &b[..fr.last().unwrap().0]).unwrap();
    let mut l = lines(&cp(c.path(), newest));
    l.pop();
    write_lines(&cp(c.path(), newest), &l);
    auditor.passes(c.path(), &[]);
    auditor.detects(c.path(), &anchor, "cut off the end");

    // An anchor that is not this log's is refused.
    let bogus = sink_dir.path().join("bogus.jsonl");
    let k = EpochSecrets::generate(1);
    std::fs::write(
        &bogus,
        Checkpoint::sign(&k, 1, &[0; 32], &k.with_next_signing_key())
            .unwrap()
            .to_line(),
    )
    .unwrap();
    auditor.detects(s, &["--anchor", p(&bogus)], "not signed by this log");
}

/// Checkpoints reach syslog as RFC 5424 messages, and a syslog extract is an anchor.
#[test]
fn checkpoints_go_to_syslog_and_a_syslog_extract_anchors() {
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("log");
    let listener = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    let spec = format!("syslog:{}", sock.display());
    let (state, _, auditor) = session_with(&["--checkpoint-sink", &spec]);
    let mut extract = String::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = listener.recv(&mut buf) {
        let line = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(line.starts_with("<110>1 "), "{line}");
        extract.push_str(line);
        extract.push('\n');
    }
    assert!(extract.lines().count() >= 4, "{extract}");
    let file = sock_dir.path().join("extract.log");
    std::fs::write(&file, extract).unwrap();
    let out = auditor.passes(state.path(), &["--anchor", p(&file)]);
    assert!(!out.contains("cannot be excluded"), "{out}");
}

#[test]
fn retention_acts_only_on_verified_state_and_is_recorded() {
    let (state, _, auditor) = session();
    let s = state.path();
    let shred = |dir: &Path, extra: &[&str]| {
        let mut a = vec!["shred"];
        a.extend(auditor.public_only());
        a.extend_from_slice(extra);
        audit(dir, &a)
    };
    // Without --yes: a plan, nothing changes.
    let o = shred(s, &["--before-epoch", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("would shred epochs 1..2"));
    assert!(seg(s, 1).exists());
    // The open epoch is never shredded.
    assert!(!shred(s, &["--before-epoch", "9", "--yes"]).status.success());
    // A log that does not verify is not shredded (that would destroy evidence)...
    let c = copy(s);
    let mut b = std::fs::read(seg(c.path(), 3)).unwrap();
    b[60] ^= 1;
    std::fs::write(seg(c.path(), 3), &b).unwrap();
    let o = shred(c.path(), &["--before-epoch", "3", "--yes"]);
    assert!(stderr(&o).contains("not shredding"), "{}", stderr(&o));
    assert!(seg(c.path(), 1).exists());
    // ...and a planted checkpoint line claiming a recent epoch is old cannot steer it.
    let c = copy(s);
    let mut l = lines(&cp(c.path(), 3));
    let mut v: serde_json::Value = serde_json::from_str(l.last().unwrap()).unwrap();
    v["time_ms"] = 1.into();
    *l.last_mut().unwrap() = v.to_string();
    write_lines(&cp(c.path(), 3), &l);
    assert!(!shred(c.path(), &["--older-than", "1d", "--yes"])
        .status
        .success());
    assert!(seg(c.path(), 3).exists());

    // Shredding by age: every epoch that ended over a second ago, i.e. all but the newest.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let before = auditor.export(s, &[]);
    // The shred's own record opens a new epoch; the one open before it is kept.
    let open = newest_epoch(s);
    let o = shred(s, &["--older-than", "1s", "--yes"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for e in 1..open {
        assert!(!seg(s, e).exists(), "segment {e} kept");
        assert!(!s.join("audit").join(recipient::wrap_name(e)).exists());
    }
    // What remains verifies, and the shredding is on record.
    let out = auditor.passes(s, &[]);
    assert!(out.contains("shredded by retention"), "{out}");
    let after = auditor.export(s, &[]);
    assert!(after.len() < before.len());
    let shredded = after
        .iter()
        .find(|r| r["event"] == "audit_shredded")
        .expect("recorded");
    assert_eq!(shredded["epoch"], open);
    // Deleting the oldest remaining segment is not mistaken for retention.
    serve(s, None).unwrap().stop();
    std::fs::remove_file(seg(s, open)).unwrap();
    let o = auditor.verify(s, &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no signed checkpoint records their shredding"),
        "{}",
        stderr(&o)
    );
}

/// Findings of the attack review (each failed before its fix).
mod review {
    use super::*;

    /// A planted `checkpoints.jsonl` (the old format's file) must not steer verify into the
    /// old format's checks, where an emptied log passed with `--public`.
    #[test]
    fn a_planted_old_format_file_does_not_downgrade_verification() {
        let (state, _, auditor) = session();
        let c = copy(state.path());
        let dir = c.path().join("audit");
        for e in 1..=newest_epoch(c.path()) {
            std::fs::remove_file(seg(c.path(), e)).unwrap();
        }
        std::fs::write(dir.join("checkpoints.jsonl"), b"").unwrap();
        auditor.detects(c.path(), &[], "not in the writer's form");
        // The writer refuses it too.
        let c = copy(state.path());
        std::fs::write(c.path().join("audit/checkpoints.jsonl"), b"").unwrap();
        assert!(serve(c.path(), None).is_err());
    }

    /// Deleting the oldest segments is not retention: only a signed checkpoint says where the
    /// log may begin.
    #[test]
    fn deleting_the_oldest_segments_is_not_passed_off_as_retention() {
        let (state, _, auditor) = session();
        let c = copy(state.path());
        for e in 1..=3 {
            std::fs::remove_file(seg(c.path(), e)).unwrap();
        }
        auditor.detects(
            c.path(),
            &[],
            "no signed checkpoint records their shredding",
        );

        // A shredding record claiming a far-future epoch is signed only up to the epoch that
        // was open: segments of later epochs stay protected.
        let s = state.path();
        let spool = s.join("audit/spool");
        std::fs::create_dir_all(&spool).unwrap();
        let mut r = securerun::audit::AuditRecord::event("audit_shredded");
        r.epoch = Some(u32::MAX);
        std::fs::write(
            spool.join(format!("{:016}-cc.json", r.time_ms)),
            serde_json::to_vec(&r).unwrap(),
        )
        .unwrap();
        // The next start opens this epoch and signs the (clamped) statement in it.
        let open = newest_epoch(s) + 1;
        serve(s, None).unwrap().stop();
        serve(s, None).unwrap().stop();
        for e in 1..=open {
            std::fs::remove_file(seg(s, e)).unwrap();
        }
        auditor.detects(s, &[], "no signed checkpoint records their shredding");
    }

    /// A holder of the read key who can write the disk seals records in after a crash (they
    /// authenticate with the record key); the writer does not attest over them.
    #[test]
    fn records_sealed_in_with_the_read_key_stop_the_writer() {
        let state = tempfile::tempdir().unwrap();
        let s = state.path();
        let t = token(s, "t", "embeddings");
        let auditor = Auditor::take(s);
        let server = serve(s, None).unwrap();
        for _ in 0..3 {
            embeds(&server.addr, &t, "x");
        }
        drop(server); // SIGKILL: no stop checkpoint, the epoch's records are unattested
        let open = newest_epoch(s);
        let key = record_key(s, &auditor, open);
        let forged = reseal(&seg(s, open), &key, &key, start_of(s, open), |i, plain| {
            if i == 1 {
                br#"{"time_ms":1,"event":"request","outcome":"ok","token_id":"ffffffffffffffff"}"#
                    .to_vec()
            } else {
                plain
            }
        });
        std::fs::write(seg(s, open), &forged).unwrap();
        // The auditor sees records no signed head covers (and export marks them)...
        let out = auditor.passes(s, &[]);
        assert!(out.contains("not yet attested"), "{out}");
        assert!(auditor
            .export(s, &[])
            .iter()
            .any(|r| r["token_id"] == "ffffffffffffffff" && r["attested"] == false));
        // ...and the writer will not sign over them.
        let err = serve(s, None)
            .err()
            .expect("must not attest forged records");
        assert!(err.contains("not written by this host's writer"), "{err}");
    }

    /// A thief of the running host holds only the key of the *next* checkpoint: checkpoints
    /// already written, in the open epoch too, cannot be re-signed.
    #[test]
    fn a_stolen_key_cannot_re_sign_a_checkpoint_of_the_open_epoch() {
        let state = tempfile::tempdir().unwrap();
        let s = state.path();
        let t = token(s, "t", "embeddings");
        let auditor = Auditor::take(s);
        let server = serve(s, None).unwrap();
        // Over 1000 records: a checkpoint inside the open epoch.
        for _ in 0..1100 {
            assert_eq!(call(&server.addr, "GET", "/metrics", Some(&t), ""), 403);
        }
        let open = newest_epoch(s);
        assert!(!lines(&cp(s, open)).is_empty(), "a checkpoint was written");
        let stolen = tempfile::tempdir().unwrap();
        std::fs::copy(s.join("audit/current.key"), stolen.path().join("k")).unwrap();
        drop(server); // SIGKILL
        let thief = EpochSecrets::load(&stolen.path().join("k")).unwrap();
        // Cut the records the checkpoint attests and re-sign it for the shorter log.
        let c = copy(s);
        let fr = frames(&seg(c.path(), open));
        let b = std::fs::read(seg(c.path(), open)).unwrap();
        std::fs::write(seg(c.path(), open), &b[..fr[10].0]).unwrap();
        let mut head = start_of(s, open);
        let mut r = segment::Reader::open(&seg(c.path(), open)).unwrap();
        let mut last = 0;
        while let Ok(Some(f)) = r.next_frame().unwrap() {
            head = segment::chain(&head, &f.body);
            last = f.seq;
        }
        let forged = Checkpoint::sign(&thief, last, &head, &thief.with_next_signing_key()).unwrap();
        write_lines(
            &cp(c.path(), open),
            &[forged.to_line().trim_end().to_string()],
        );
        auditor.detects(c.path(), &[], "does not verify");
    }

    /// The sink file stays a valid anchor after a legitimate shredding: heads of shredded
    /// epochs are skipped with a note.
    #[test]
    fn the_sink_file_still_anchors_after_retention() {
        let sink_dir = tempfile::tempdir().unwrap();
        let sink = sink_dir.path().join("heads.jsonl");
        let spec = format!("file:{}", sink.display());
        let (state, _, auditor) = session_with(&["--checkpoint-sink", &spec]);
        let s = state.path();
        let mut a = vec!["shred", "--before-epoch", "4", "--yes"];
        a.extend(auditor.public_only());
        let o = audit(s, &a);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = auditor.passes(s, &["--anchor", p(&sink)]);
        assert!(out.contains("heads of shredded epochs"), "{out}");
        // While a server runs, the shredding is recorded and signed by it before anything goes.
        let server = serve_with(s, None, &["--checkpoint-sink", &spec]).unwrap();
        let open = newest_epoch(s);
        let mut a = vec!["shred", "--before-epoch"];
        let before = open.to_string();
        a.push(&before);
        a.push("--yes");
        a.extend(auditor.public_only());
        let o = audit(s, &a);
        assert!(o.status.success(), "{}", stderr(&o));
        server.stop();
        let out = auditor.passes(s, &["--anchor", p(&sink)]);
        assert!(out.contains("shredded by retention"), "{out}");
    }
}
