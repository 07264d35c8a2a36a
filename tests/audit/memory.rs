//! A thief of the running host's memory: an image of the server at epoch N holds no key of an
//! earlier epoch (record key or checkpoint key, raw or hex), while the current epoch's key is
//! found (so the search works).

use std::os::unix::fs::FileExt;

use crate::common::p;
use crate::harness::*;

/// Every readable mapping of `pid` but files it maps read-only (the model, libraries).
fn memory_image(pid: u32) -> Vec<u8> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut image = Vec::new();
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (range, perms) = (fields[0], fields[1]);
        let path = fields.get(5).copied().unwrap_or("");
        let file_backed_read_only = path.starts_with('/') && !perms.contains('w');
        if !perms.starts_with('r')
            || file_backed_read_only
            || path == "[vvar]"
            || path == "[vsyscall]"
            || path.starts_with("[vvar")
        {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let mut buf = vec![0u8; (end - start) as usize];
        if mem.read_exact_at(&mut buf, start).is_ok() {
            image.extend_from_slice(&buf);
        }
    }
    image
}

fn found(image: &[u8], key: &[u8; 32]) -> bool {
    memchr::memmem::find(image, key).is_some()
        || memchr::memmem::find(image, hex::encode(key).as_bytes()).is_some()
}

#[test]
fn a_memory_image_of_the_server_holds_no_earlier_epoch_key() {
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    let t = token(s, "t", "embeddings");
    let _auditor = Auditor::take(s);
    let config = s.join("serve.toml");
    std::fs::write(&config, "audit_rotate = 1\n").unwrap();
    let server = serve_with(s, None, &["--config", p(&config)]).unwrap();
    let mut seen: Vec<(u32, [u8; 32], [u8; 32])> = Vec::new();
    let started = std::time::Instant::now();
    while seen.len() < 4 && started.elapsed() < std::time::Duration::from_secs(60) {
        let secrets = epoch_secrets(&s.join("audit/current.key"));
        if seen.last().map(|k| k.0) != Some(secrets.0) {
            seen.push(secrets);
        }
        embeds(&server.addr, &t, "tick");
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    assert!(seen.len() >= 4, "epochs seen: {}", seen.len());
    // Quiesce on a request, then read the current key and take the image.
    embeds(&server.addr, &t, "tick");
    let current = epoch_secrets(&s.join("audit/current.key"));
    let image = memory_image(server.child.id());
    assert!(image.len() > 1 << 20);
    assert!(
        found(&image, &current.1),
        "control: the current epoch's record key must be found"
    );
    for (epoch, record, signing) in seen.iter().filter(|k| k.0 < current.0) {
        assert!(
            !found(&image, record),
            "epoch {epoch}'s record key is in memory at epoch {}",
            current.0
        );
        assert!(
            !found(&image, signing),
            "epoch {epoch}'s checkpoint key is in memory at epoch {}",
            current.0
        );
    }
    server.stop();
}
