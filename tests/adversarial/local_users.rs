//! A local user with write access near the state directory: the directory is checked like a key
//! file (owner, modes, no symlink), files in it are never opened through planted symlinks, and
//! public files are created 0644 whatever the umask. Before the fix every one of these was
//! accepted silently.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use super::common::{self, p, securerun};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn an_unsafe_state_directory_is_refused_with_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    for args in [
        vec!["token", "create", "--name", "x", "--scopes", "inference"],
        vec!["token", "list"],
        vec!["lockdown", "on"],
        vec!["audit", "verify"],
    ] {
        let mut a = args.clone();
        a.extend(["--state-dir", p(&state)]);
        let o = securerun(&a);
        assert!(
            !o.status.success(),
            "{args:?} accepted a world-writable state directory"
        );
        assert!(
            stderr(&o).contains("chmod go-w"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    let o = securerun(&[
        "serve",
        p(&common::minilm()),
        "--allow-unsigned",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        p(&state),
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("chmod go-w"),
        "{}",
        stderr(&o)
    );
    // The state directory as a symlink.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&state, &link).unwrap();
    let o = securerun(&["token", "list", "--state-dir", p(&link)]);
    assert!(
        !o.status.success() && stderr(&o).contains("symbolic link"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn files_in_the_state_directory_are_not_opened_through_symlinks() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    // A planted lock file pointing at a file the attacker wants created or clobbered.
    let victim = tmp.path().join("victim");
    std::os::unix::fs::symlink(&victim, state.join("tokens.lock")).unwrap();
    let o = securerun(&[
        "token",
        "create",
        "--name",
        "x",
        "--scopes",
        "inference",
        "--state-dir",
        p(&state),
    ]);
    assert!(
        !o.status.success(),
        "a token was created through a planted lock symlink"
    );
    assert!(!victim.exists(), "the symlink was followed");
    // A planted trusted key: a symlink into a directory the attacker controls.
    std::fs::create_dir(state.join("trust")).unwrap();
    let keys = tempfile::tempdir().unwrap();
    let o = securerun(&["keygen", "--out", p(&keys.path().join("evil"))]);
    assert!(o.status.success());
    std::os::unix::fs::symlink(keys.path().join("evil.pub"), state.join("trust/evil.pub")).unwrap();
    let o = securerun(&["trust", "list", "--state-dir", p(&state)]);
    assert!(
        !o.status.success(),
        "a symlinked trusted key was accepted: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn public_files_are_0644_and_secrets_0600_whatever_the_umask() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("site");
    let state = tmp.path().join("state");
    let with_umask = |args: &[&str]| {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("umask 077 && exec \"$0\" \"$@\"")
            .arg(env!("CARGO_BIN_EXE_securerun"))
            .args(args);
        cmd.output().unwrap()
    };
    assert!(with_umask(&["keygen", "--out", p(&out)]).status.success());
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&tmp.path().join("site.pub")), 0o644);
    assert_eq!(mode(&tmp.path().join("site.key")), 0o600);
    let o = with_umask(&[
        "trust",
        "add",
        p(&tmp.path().join("site.pub")),
        "--state-dir",
        p(&state),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let trusted = std::fs::read_dir(state.join("trust"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(mode(&trusted), 0o644);
    // `trust add` does not create the audit log; the first token does.
    let o = with_umask(&[
        "token",
        "create",
        "--name",
        "t",
        "--scopes",
        "inference",
        "--state-dir",
        p(&state),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(mode(&state.join("audit/audit.pub")), 0o644);
    assert_eq!(mode(&state.join("audit/read.key")), 0o600);
}
