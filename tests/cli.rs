//! The `securerun` binary as a user runs it: real models, malformed files, bad flags. Every
//! failure must be one `error:` line on stderr with a non-zero exit, never a panic.

mod common;

use common::{p, securerun};

use std::path::Path;
use std::process::Output;

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

/// Asserts a clean failure: non-zero, one `error:` line mentioning `needle`, no panic.
fn assert_fails_with(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
    // The loud --allow-unsigned warning may precede the error; the error itself is one line.
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("warning: --allow-unsigned"))
        .collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

/// Greedy, 16 tokens: the README's example. Must equal transformers' first 16 tokens decoded.
#[test]
fn run_matches_transformers_and_packed_file_matches_directory() {
    let dir = common::smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("site");
    assert!(securerun(&["keygen", "--out", p(&prefix)]).status.success());
    let key = tmp.path().join("site.key");
    let public = tmp.path().join("site.pub");
    let dir_sig = tmp.path().join("dir.sig");
    let o = securerun(&[
        "sign",
        p(&dir),
        "--key",
        p(&key),
        "--signature",
        p(&dir_sig),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let args = [
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "16",
        "--temperature",
        "0",
        "--trust-key",
        p(&public),
    ];
    let mut cmd = vec!["run", p(&dir), "--signature", p(&dir_sig)];
    cmd.extend(args);
    let from_dir = securerun(&cmd);
    assert!(from_dir.status.success(), "{}", stderr(&from_dir));
    assert_eq!(
        stderr(&from_dir),
        "",
        "nothing but generated text by default"
    );

    let model = securerun::open_text_model(&dir, &common::unsigned()).unwrap();
    let reference = common::reference("smollm2.json");
    let ids: Vec<u32> =
        serde_json::from_value(reference["cases"][0]["generated_ids"].clone()).unwrap();
    let expected = model.tokenizer().decode(&ids[..16], true).unwrap();
    assert_eq!(stdout(&from_dir), expected);

    let packed = tmp.path().join("smollm2.safetensors");
    let pack = securerun(&["pack", p(&dir), "--out", p(&packed)]);
    assert!(pack.status.success(), "{}", stderr(&pack));
    // Unsigned: refused, with the way out in the message.
    let mut cmd = vec!["run", p(&packed)];
    cmd.extend(args);
    assert_fails_with(&securerun(&cmd), "no signature at");
    assert!(securerun(&["sign", p(&packed), "--key", p(&key)])
        .status
        .success());
    let mut cmd = vec!["run", p(&packed)];
    cmd.extend(args);
    let from_file = securerun(&cmd);
    assert!(from_file.status.success(), "{}", stderr(&from_file));
    assert_eq!(stdout(&from_file), stdout(&from_dir));

    // Packing again without --force refuses and leaves the file alone.
    assert_fails_with(
        &securerun(&["pack", p(&dir), "--out", p(&packed)]),
        "--force",
    );

    let inspect = securerun(&["inspect", p(&packed)]);
    let text = stdout(&inspect);
    assert!(
        text.contains("architecture: llama") && text.contains("embedded"),
        "{text}"
    );
}

#[test]
fn chat_run_answers_like_transformers() {
    let o = securerun(&[
        "run",
        p(&common::smollm2()),
        "--allow-unsigned",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-tokens",
        "40",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "The capital of France is Paris.");
}

#[test]
fn embed_prints_json_vectors_matching_sentence_transformers() {
    let o = securerun(&[
        "embed",
        p(&common::minilm()),
        "--allow-unsigned",
        "--text",
        "A man is eating food.",
        "--text",
        "A man is eating a piece of bread.",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let vectors: Vec<Vec<f32>> = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(vectors.len(), 2);
    let reference = common::reference("minilm.json");
    for (i, v) in vectors.iter().enumerate() {
        let expected: Vec<f64> =
            serde_json::from_value(reference["cases"][i]["embedding"].clone()).unwrap();
        assert!(common::cosine(v, &expected) >= 0.9999);
    }
}

#[test]
fn every_dtype_runs_confined_and_inspect_shows_the_plan() {
    for dtype in ["q8_0", "q4_0", "q4_k", "f16"] {
        // In the confined worker (the default): the precision travels in the load message.
        let o = securerun(&[
            "run",
            p(&common::smollm2()),
            "--allow-unsigned",
            "--dtype",
            dtype,
            "--prompt",
            "The capital of France is",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
        ]);
        assert!(o.status.success(), "{dtype}: {}", stderr(&o));
        assert!(!stdout(&o).is_empty(), "{dtype}");
    }
    let o = securerun(&[
        "run",
        p(&common::smollm2()),
        "--dtype",
        "int3",
        "--prompt",
        "x",
    ]);
    assert!(!o.status.success() && stderr(&o).contains("unknown dtype \"int3\""));
    let o = securerun(&[
        "inspect",
        p(&common::smollm2()),
        "--dtype",
        "q4_k",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let plan = &r["run_precision"];
    // SmolLM2's 576-wide rows cannot be tiled by Q4_K: they fall back to q8_0; the 1536-wide
    // down projections are Q4_K.
    assert_eq!(plan["types"]["q4_k"]["tensors"], 30, "{plan}");
    assert!(
        plan["types"]["q8_0"]["tensors"].as_u64().unwrap() > 100,
        "{plan}"
    );
    assert!(plan["bytes"].as_u64().unwrap() < r["weight_bytes"].as_u64().unwrap() / 3);
}

#[test]
fn inspect_describes_a_real_model_and_a_bare_file() {
    let o = securerun(&["inspect", p(&common::minilm()), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["architecture"], "bert");
    // 22,713,216 weights plus the 512-entry I64 position_ids buffer.
    assert_eq!(r["parameters"], 22713728);
    assert_eq!(r["dtypes"]["I64"]["parameters"], 512);
    assert_eq!(r["dtypes"]["F32"]["tensors"], 103);

    // A bare safetensors file with no config anywhere near it still inspects.
    let tmp = tempfile::tempdir().unwrap();
    let bare = tmp.path().join("bare.safetensors");
    write_file(
        &bare,
        r#"{"w":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]}}"#,
        12,
    );
    let o = securerun(&["inspect", p(&bare)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("parameters:   6") && text.contains("unknown") && text.contains("F16"),
        "{text}"
    );
}

fn write_file(path: &Path, header: &str, data_len: usize) {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend(std::iter::repeat_n(0u8, data_len));
    std::fs::write(path, v).unwrap();
}

/// Each malformed-file class: `inspect` exits non-zero with its own specific message.
#[test]
fn inspect_rejects_each_malformed_class_specifically() {
    let t = |n: &str, d: &str, s: &str, o: &str| {
        format!(r#""{n}":{{"dtype":"{d}","shape":{s},"data_offsets":{o}}}"#)
    };
    let cases: Vec<(&str, String, usize, &str)> = vec![
        ("not-object", "[1]".into(), 0, "does not start with '{'"),
        ("bad-json", "{\"a\":".into(), 0, "not valid JSON"),
        (
            "duplicate",
            format!(
                "{{{},{}}}",
                t("a", "U8", "[1]", "[0,1]"),
                t("a", "U8", "[1]", "[1,2]")
            ),
            2,
            "appears more than once",
        ),
        (
            "gap",
            format!("{{{}}}", t("a", "U8", "[1]", "[1,2]")),
            2,
            "gap in data section",
        ),
        (
            "overlap",
            format!(
                "{{{},{}}}",
                t("a", "U8", "[2]", "[0,2]"),
                t("b", "U8", "[2]", "[1,3]")
            ),
            3,
            "overlaps tensor \"a\"",
        ),
        (
            "trailing",
            format!("{{{}}}", t("a", "U8", "[1]", "[0,1]")),
            5,
            "4 trailing bytes",
        ),
        (
            "size",
            format!("{{{}}}", t("a", "F32", "[2]", "[0,4]")),
            4,
            "need 8 bytes",
        ),
        (
            "overflow",
            format!("{{{}}}", t("a", "F64", "[4294967296,4294967296]", "[0,8]")),
            8,
            "overflows",
        ),
        (
            "oob",
            format!("{{{}}}", t("a", "U8", "[9]", "[0,9]")),
            4,
            "past the 4-byte data section",
        ),
        (
            "rank",
            format!("{{{}}}", t("a", "U8", "[1,1,1,1,1,1,1,1,1]", "[0,1]")),
            1,
            "rank 9",
        ),
        (
            "dtype",
            format!("{{{}}}", t("a", "Q4", "[1]", "[0,1]")),
            1,
            "unsupported dtype \"Q4\"",
        ),
        (
            "metadata",
            r#"{"__metadata__":{"k":5}}"#.into(),
            0,
            "__metadata__ must be",
        ),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (name, header, data, needle) in cases {
        let path = tmp.path().join(format!("{name}.safetensors"));
        write_file(&path, &header, data);
        assert_fails_with(&securerun(&["inspect", p(&path)]), needle);
    }
    let small = tmp.path().join("small.safetensors");
    std::fs::write(&small, [1, 2, 3]).unwrap();
    assert_fails_with(&securerun(&["inspect", p(&small)]), "too small");
    let huge = tmp.path().join("huge.safetensors");
    let mut v = (1u64 << 40).to_le_bytes().to_vec();
    v.extend_from_slice(b"{}");
    std::fs::write(&huge, v).unwrap();
    assert_fails_with(&securerun(&["inspect", p(&huge)]), "exceeds the limit");
    // The header cap is configurable from the command line.
    let ok = tmp.path().join("ok.safetensors");
    write_file(&ok, &format!("{{{}}}", t("a", "U8", "[1]", "[0,1]")), 1);
    assert_fails_with(
        &securerun(&["inspect", p(&ok), "--max-header-bytes", "8"]),
        "exceeds the limit of 8",
    );
}

#[test]
fn bad_inputs_are_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    assert_fails_with(&securerun(&["inspect", p(&missing)]), "No such file");
    assert_fails_with(
        &securerun(&["run", p(tmp.path()), "--prompt", "x"]),
        "no model.safetensors",
    );
    // Fail closed: no trusted key anywhere.
    let empty_state = tmp.path().join("state");
    let smol = common::smollm2();
    assert_fails_with(
        &securerun(&[
            "run",
            p(&smol),
            "--prompt",
            "x",
            "--state-dir",
            p(&empty_state),
        ]),
        "nothing is trusted to sign models",
    );
    // An embedding model cannot generate, and a generator cannot embed: the task comes from
    // the opened model's architecture, so the refusal comes before any worker starts (a worker
    // program that does not exist would fail any start) and names the right command.
    let no_worker = [(
        "SECURERUN_TEST_WORKER_PROGRAM",
        tmp.path().join("no-worker"),
    )];
    let o = common::securerun_env(
        &[
            "run",
            p(&common::minilm()),
            "--allow-unsigned",
            "--prompt",
            "x",
        ],
        &no_worker,
    );
    assert_fails_with(
        &o,
        "bert is an embedding model, not a text-generation model",
    );
    assert_fails_with(&o, "use `securerun embed`");
    let o = common::securerun_env(
        &[
            "embed",
            p(&common::smollm2()),
            "--allow-unsigned",
            "--text",
            "x",
        ],
        &no_worker,
    );
    assert_fails_with(
        &o,
        "llama is a text-generation model, not an embedding model",
    );
    assert_fails_with(&o, "use `securerun run`");
    assert_fails_with(
        &securerun(&[
            "run",
            p(&common::smollm2()),
            "--allow-unsigned",
            "--prompt",
            "x",
            "--top-p",
            "2",
            "--temperature",
            "1",
        ]),
        "top_p",
    );
    // A worker budget whose bytes overflow is refused, not wrapped to a tiny one.
    assert_fails_with(
        &securerun(&[
            "run",
            p(&common::smollm2()),
            "--allow-unsigned",
            "--prompt",
            "x",
            "--worker-memory",
            "17592186044416",
        ]),
        "more bytes than fit in 64 bits",
    );
    // This build has no CUDA: asking for it is a clear error, not a silent CPU fallback.
    assert_fails_with(
        &securerun(&[
            "run",
            p(&common::smollm2()),
            "--allow-unsigned",
            "--prompt",
            "x",
            "--device",
            "cuda",
        ]),
        "this build has no CUDA support (build one with scripts/build-cuda.sh)",
    );
    // A directory of a bare file with no config or tokenizer.
    let bare = tmp.path().join("bare.safetensors");
    write_file(
        &bare,
        r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
        1,
    );
    assert_fails_with(
        &securerun(&["run", p(&bare), "--allow-unsigned", "--prompt", "x"]),
        "no config.json",
    );
    // Flag errors come from clap, with exit status 2.
    let o = securerun(&["run", p(&common::smollm2())]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--prompt"));
}

#[test]
fn allow_unsigned_warns_on_stderr() {
    let o = securerun(&[
        "embed",
        p(&common::minilm()),
        "--text",
        "hi",
        "--allow-unsigned",
    ]);
    assert!(o.status.success());
    assert!(
        stderr(&o).starts_with("warning: --allow-unsigned"),
        "{}",
        stderr(&o)
    );
}

/// `run` refuses tampered models and untrusted signers, and accepts keys from the trust store.
#[test]
fn run_requires_a_trusted_untampered_signature() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("minilm");
    common::copy_dir(&common::minilm(), &model);
    let site = tmp.path().join("site");
    let other = tmp.path().join("other");
    assert!(securerun(&["keygen", "--out", p(&site)]).status.success());
    assert!(securerun(&["keygen", "--out", p(&other)]).status.success());
    let key = tmp.path().join("site.key");
    let state = tmp.path().join("state");
    assert!(securerun(&["sign", p(&model), "--key", p(&key)])
        .status
        .success());

    let embed = |extra: &[&str]| {
        let mut args = vec!["embed", p(&model), "--text", "hi", "--state-dir", p(&state)];
        args.extend_from_slice(extra);
        securerun(&args)
    };
    // Signed by a key nobody trusts.
    assert_fails_with(
        &embed(&["--trust-key", p(&tmp.path().join("other.pub"))]),
        "not a trusted key",
    );
    // Trusted through the trust store.
    let o = securerun(&[
        "trust",
        "add",
        p(&tmp.path().join("site.pub")),
        "--state-dir",
        p(&state),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let list = securerun(&["trust", "list", "--state-dir", p(&state)]);
    assert!(stdout(&list).contains("P-256"));
    let o = embed(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A flipped byte in the tokenizer the loader reads: refused, naming the file.
    let tok = model.join("tokenizer.json");
    let mut bytes = std::fs::read(&tok).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&tok, bytes).unwrap();
    assert_fails_with(
        &embed(&[]),
        "\"tokenizer.json\" does not match its signed digest",
    );
}

/// A single signed file must not pick up unsigned configuration from beside it.
#[test]
fn unsigned_neighbour_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = tmp.path().join("model.safetensors");
    std::fs::copy(common::minilm().join("model.safetensors"), &weights).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(common::minilm().join(f), tmp.path().join(f)).unwrap();
    }
    let site = tmp.path().join("k");
    assert!(securerun(&["keygen", "--out", p(&site)]).status.success());
    assert!(
        securerun(&["sign", p(&weights), "--key", p(&tmp.path().join("k.key"))])
            .status
            .success()
    );
    let o = securerun(&[
        "embed",
        p(&weights),
        "--text",
        "hi",
        "--trust-key",
        p(&tmp.path().join("k.pub")),
    ]);
    assert_fails_with(&o, "the signature does not cover it");
}

/// `--version` names the commit the binary was built from and what the build can do; shell
/// completions parse as shell, and the man pages (one per command) render from the same clap
/// definitions as `--help`, so they cannot drift from the flags. Before, `--version` printed
/// only "securerun 0.1.0" and neither completions nor man pages existed.
#[test]
fn version_completions_and_man_pages_come_from_the_binary() {
    let o = securerun(&["--version"]);
    assert!(o.status.success());
    let v = stdout(&o);
    let commit = v
        .lines()
        .find_map(|l| l.strip_prefix("commit: "))
        .unwrap_or_else(|| panic!("no commit line: {v}"));
    assert!(
        commit.len() >= 12 && commit[..12].bytes().all(|b| b.is_ascii_hexdigit()),
        "{v}"
    );
    assert!(v.contains("\nfeatures: "), "{v}");

    let o = securerun(&["completions", "bash"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), &o.stdout).unwrap();
    let syntax = std::process::Command::new("bash")
        .args(["-n", p(script.path())])
        .output()
        .unwrap();
    assert!(syntax.status.success(), "{}", stderr(&syntax));
    assert!(stdout(&o).contains("serve"));

    let o = securerun(&["man"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains(".TH securerun 1"), "{}", stdout(&o));
    let dir = tempfile::tempdir().unwrap();
    let o = securerun(&["man", "--out", p(dir.path())]);
    assert!(o.status.success(), "{}", stderr(&o));
    let serve = std::fs::read_to_string(dir.path().join("securerun-serve.1")).unwrap();
    assert!(
        serve.contains("tls\\-cert"),
        "the serve page lists its flags"
    );
}

/// The README's configuration reference lists every config key (as the binary itself names
/// them when refusing an unknown one), every `serve` flag (from its `--help`), and every
/// `SECURERUN_*` variable the sources read: adding one without its row fails here. A config
/// error names its line and key; a rate the limiter cannot honour is refused.
#[test]
fn the_configuration_reference_lists_every_key_flag_and_variable() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = readme
        .find("### Configuration reference")
        .expect("a configuration reference section");
    let section = &readme[start..];
    let section = &section[..section[4..].find("\n## ").map_or(section.len(), |e| e + 4)];
    let dir = tempfile::tempdir().unwrap();
    let probe = dir.path().join("probe.toml");
    std::fs::write(&probe, "listen = \"127.0.0.1:0\"\n\n__probe__ = 1\n").unwrap();
    let model = common::minilm();
    let o = securerun(&[
        "serve",
        p(&model),
        "--allow-unsigned",
        "--config",
        p(&probe),
    ]);
    let err = stderr(&o);
    assert!(err.contains("line 3") && err.contains("__probe__"), "{err}");
    let keys: Vec<&str> = err
        .split("expected one of ")
        .nth(1)
        .unwrap_or_else(|| panic!("{err}"))
        .split(", ")
        .map(|k| k.trim().trim_matches('`'))
        .collect();
    assert!(keys.len() > 20, "{keys:?}");
    for key in keys {
        assert!(
            section.contains(&format!("`{key}`")),
            "config key {key} has no row"
        );
    }
    let help = stdout(&securerun(&["serve", "--help"]));
    for flag in help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches(',')
                .trim_end_matches(|c: char| !c.is_alphanumeric())
        })
    {
        if flag == "--help" {
            continue;
        }
        assert!(
            section.contains(&format!("`{flag}")),
            "flag {flag} has no row"
        );
    }
    let mut vars = std::collections::BTreeSet::new();
    let mut stack = vec![
        root.join("runtime"),
        root.join("models/src"),
        root.join("sandbox/src"),
    ];
    stack.push(root.join("build.rs"));
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        // Variables read (`var`, `var_os`, `env!`), named as `..._ENV` constants, or set by
        // the build script; not other strings that happen to start so (journald fields).
        for (i, _) in text.match_indices("SECURERUN_") {
            let before = &text[i.saturating_sub(24)..i];
            let read = [
                "var(\"",
                "var_os(\"",
                "from_env(\"",
                "env!(\"",
                "_ENV: &str = \"",
                "rustc-env=",
            ]
            .iter()
            .any(|m| before.ends_with(m));
            if !read {
                continue;
            }
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            vars.insert(name);
        }
    }
    assert!(vars.contains("SECURERUN_LOG"), "{vars:?}");
    for var in vars {
        assert!(
            section.contains(&format!("`{var}`")),
            "variable {var} has no row"
        );
    }
    // A bad rate is named, not rounded.
    let o = securerun(&[
        "token",
        "create",
        "--name",
        "x",
        "--scopes",
        "inference",
        "--rate",
        "100/hour",
        "--state-dir",
        p(dir.path()),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("whole number per minute"),
        "{}",
        stderr(&o)
    );
}

/// The README's quickstart works when pasted: run as written (only the build line is left
/// out, and `S` points at this build), in a directory of its own, it signs, serves, waits for
/// readiness, answers, and stops the server.
#[test]
fn the_readme_quickstart_works_when_pasted() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section = &readme[readme.find("### Quickstart").expect("a quickstart")..];
    let start = section.find("```sh\n").expect("a shell block") + "```sh\n".len();
    let block = &section[start..start + section[start..].find("```").unwrap()];
    let mut lines = block.lines();
    assert_eq!(
        lines.next(),
        Some("scripts/fetch-models.sh && cargo build --release"),
        "the block's first line fetches and builds (left out here)"
    );
    let script: String = lines
        .map(|l| {
            if l.starts_with("S=./target/release/securerun") {
                format!("S={}", env!("CARGO_BIN_EXE_securerun"))
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(root.join(".cache"), dir.path().join(".cache")).unwrap();
    let o = std::process::Command::new("timeout")
        .args(["300", "bash", "-e", "-c", &format!("{script}\nwait\n")])
        .current_dir(dir.path())
        .env_remove("SECURERUN_STATE_DIR")
        .output()
        .unwrap();
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(out.contains("The capital of France is Paris."), "{out}");
}
