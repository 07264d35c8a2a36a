//! `securerun keygen`, `securerun sign`, `securerun verify`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use super::CmdResult;
use crate::signing::{self, PrivateKey, PublicKey};

#[derive(Args)]
pub struct KeygenArgs {
    /// Writes PREFIX.key (PKCS#8 PEM, mode 0600) and PREFIX.pub (SubjectPublicKeyInfo PEM).
    #[arg(long, value_name = "PREFIX")]
    out: PathBuf,
    /// Replace existing key files.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub struct SignArgs {
    /// Model directory or single file.
    model: PathBuf,
    /// Private key (PKCS#8 or SEC1 PEM; P-256 or P-384).
    #[arg(long, value_name = "KEY")]
    key: PathBuf,
    /// Where to write the signature (default: model.sig in a directory, FILE.sig beside a file).
    #[arg(long, value_name = "PATH")]
    signature: Option<PathBuf>,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Model directory or single file.
    model: PathBuf,
    /// Trusted public key (SubjectPublicKeyInfo PEM; P-256, P-384 or P-521). Repeatable.
    #[arg(long = "trust-key", value_name = "PUB", required = true)]
    trust_keys: Vec<PathBuf>,
    /// Signature file (default: model.sig in a directory, FILE.sig beside a file).
    #[arg(long, value_name = "PATH")]
    signature: Option<PathBuf>,
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn write_new(path: &Path, contents: &[u8], mode: u32, force: bool) -> CmdResult {
    if force {
        // Replace by unlink + create: truncating in place would keep the old file's mode (a
        // private key could stay world-readable) and would follow a planted symlink.
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", path.display()).into()),
        }
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                format!(
                    "{}: already exists (pass --force to replace it)",
                    path.display()
                )
            } else {
                format!("{}: {e}", path.display())
            }
        })?;
    f.write_all(contents)?;
    f.sync_all()?;
    Ok(())
}

pub fn keygen(args: KeygenArgs) -> CmdResult {
    let key = PrivateKey::generate_p256();
    let key_path = with_suffix(&args.out, ".key");
    let pub_path = with_suffix(&args.out, ".pub");
    if !args.force {
        for p in [&key_path, &pub_path] {
            if p.exists() {
                return Err(format!(
                    "{}: already exists (pass --force to replace it)",
                    p.display()
                )
                .into());
            }
        }
    }
    write_new(&key_path, key.to_pem()?.as_bytes(), 0o600, args.force)?;
    let public = key.public_key();
    write_new(&pub_path, public.to_pem()?.as_bytes(), 0o644, args.force)?;
    eprintln!(
        "wrote {} (private, 0600) and {} (public); key id {}",
        key_path.display(),
        pub_path.display(),
        public.hint()?
    );
    Ok(())
}

pub fn sign(args: SignArgs) -> CmdResult {
    let pem =
        std::fs::read_to_string(&args.key).map_err(|e| format!("{}: {e}", args.key.display()))?;
    let key = PrivateKey::from_pem(&pem).map_err(|e| format!("{}: {e}", args.key.display()))?;
    let signature = args
        .signature
        .unwrap_or_else(|| signing::default_signature_path(&args.model));
    let (bundle, manifest) = signing::sign(&args.model, &key, &signature)?;
    // Atomic replace: a reader never sees half a signature.
    let tmp = with_suffix(&signature, &format!(".tmp-{}", std::process::id()));
    write_new(&tmp, bundle.as_bytes(), 0o644, false)?;
    std::fs::rename(&tmp, &signature).map_err(|e| format!("{}: {e}", signature.display()))?;
    eprintln!(
        "signed {} ({} files, {} bytes) with key {} -> {}",
        args.model.display(),
        manifest.resources.len(),
        manifest.bytes,
        key.public_key().hint()?,
        signature.display()
    );
    Ok(())
}

pub fn verify(args: VerifyArgs) -> CmdResult {
    let mut trusted = Vec::new();
    for path in &args.trust_keys {
        let pem = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        trusted.push(PublicKey::from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    let signature = args
        .signature
        .unwrap_or_else(|| signing::default_signature_path(&args.model));
    let v = signing::verify(&args.model, &signature, &trusted)
        .map_err(|e| format!("{}: verification failed: {e}", args.model.display()))?;
    println!(
        "verified {}: signer key {} ({}), mode key, {} files, {} bytes",
        args.model.display(),
        v.signer_hint,
        v.curve,
        v.files,
        v.bytes
    );
    Ok(())
}

#[derive(Subcommand)]
pub enum TrustCommand {
    /// Trust a public key (SubjectPublicKeyInfo PEM).
    Add {
        key: PathBuf,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// List trusted keys.
    List {
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Stop trusting a key, by id.
    Remove {
        id: String,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}

fn state(dir: Option<PathBuf>) -> Result<PathBuf, crate::trust::TrustError> {
    dir.or_else(crate::trust::default_state_dir)
        .ok_or(crate::trust::TrustError::NoStateDir)
}

pub fn trust(cmd: TrustCommand) -> CmdResult {
    match cmd {
        TrustCommand::Add { key, state_dir } => {
            let id = crate::trust::add(&state(state_dir)?, &key)?;
            eprintln!("trusted key {id}");
        }
        TrustCommand::List { state_dir } => {
            for (path, key) in crate::trust::load(&state(state_dir)?)? {
                println!("{}  {}  {}", key.hint()?, key.curve(), path.display());
            }
        }
        TrustCommand::Remove { id, state_dir } => {
            crate::trust::remove(&state(state_dir)?, &id)?;
            eprintln!("removed key {id}");
        }
    }
    Ok(())
}
