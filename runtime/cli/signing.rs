//! `securerun keygen`, `securerun sign`, `securerun verify`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use super::CmdResult;
use crate::signing::{self, KeylessPolicy, Method, PrivateKey, SignOptions, TrustPolicy};

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
    /// Certificate mode: the signing certificate for KEY (PEM). Without it, key mode.
    #[arg(long, value_name = "CERT")]
    certificate: Option<PathBuf>,
    /// Certificate mode: intermediate and root certificates (PEM, repeatable), in chain order.
    #[arg(
        long = "certificate-chain",
        value_name = "PEM",
        requires = "certificate"
    )]
    certificate_chain: Vec<PathBuf>,
    /// Hash files in shards of BYTES (`shards` serialization) instead of whole files.
    #[arg(long, value_name = "BYTES", num_args = 0..=1, default_missing_value = "1000000000",
          value_parser = clap::value_parser!(u64).range(4096..))]
    shards: Option<u64>,
    /// Where to write the signature (default: model.sig in a directory, FILE.sig beside a file).
    #[arg(long, value_name = "PATH")]
    signature: Option<PathBuf>,
}

/// Who is trusted to sign models; shared by `verify`, `run`, `embed` (and later `serve`).
#[derive(Args, Clone)]
pub struct TrustArgs {
    /// Trusted public key (SubjectPublicKeyInfo PEM; P-256, P-384 or P-521). Repeatable; keys
    /// in the state directory's trust store are trusted too.
    #[arg(long = "trust-key", value_name = "PUB")]
    trust_keys: Vec<PathBuf>,
    /// Trusted CA certificates (PEM bundle) for certificate-mode signatures. Repeatable.
    #[arg(long = "trust-ca", value_name = "CA.pem")]
    trust_cas: Vec<PathBuf>,
    /// Keyless mode: the signer identity to accept (certificate email or URI, exactly).
    #[arg(long, value_name = "ID", requires = "issuer")]
    identity: Option<String>,
    /// Keyless mode: the OIDC issuer to accept (URL, exactly).
    #[arg(long, value_name = "URL", requires = "identity")]
    issuer: Option<String>,
    /// Keyless mode: Sigstore trusted_root.json (default: the Sigstore public-good root built
    /// into this binary).
    #[arg(long, value_name = "FILE", requires = "identity")]
    trusted_root: Option<PathBuf>,
    /// State directory holding the trust store (default: $SECURERUN_STATE_DIR, else the XDG
    /// state directory).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

impl TrustArgs {
    /// `--state-dir`, else the default state directory.
    /// Checked (see [`crate::state_dir`]).
    pub fn state_dir(&self) -> Result<PathBuf, crate::state_dir::StateDirError> {
        crate::state_dir::resolve(self.state_dir.clone())
    }

    /// Everything trusted: the flags plus the keys in the trust store.
    pub fn policy(&self) -> Result<TrustPolicy, Box<dyn std::error::Error>> {
        let mut policy = TrustPolicy::default();
        for path in &self.trust_keys {
            policy.keys.push(crate::trust::read_key(path)?);
        }
        // The trust store decides which keys may sign models: never read from a state
        // directory others could write to.
        match self.state_dir() {
            Ok(state) => policy
                .keys
                .extend(crate::trust::load(&state)?.into_iter().map(|(_, k)| k)),
            Err(crate::state_dir::StateDirError::None) => {}
            Err(e) => return Err(e.into()),
        }
        for path in &self.trust_cas {
            policy.cas.add_pem_file(path)?;
        }
        if let (Some(identity), Some(issuer)) = (&self.identity, &self.issuer) {
            policy.keyless = Some(KeylessPolicy::new(
                identity,
                issuer,
                self.trusted_root.as_deref(),
            )?);
        }
        Ok(policy)
    }
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Model directory or single file.
    model: PathBuf,
    #[command(flatten)]
    trust: TrustArgs,
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
    // Exactly `mode`, whatever the umask: a public key or signature must stay readable by
    // others, a private key by nobody else (fchmod, on the handle just created).
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
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
    let mut certificates = Vec::new();
    for path in args.certificate.iter().chain(&args.certificate_chain) {
        certificates.extend(signing::certificate::read_pem_certificates(path)?);
    }
    let signature = args
        .signature
        .unwrap_or_else(|| signing::default_signature_path(&args.model));
    let progress = signing::progress::TerminalProgress::new("hashing");
    let opts = SignOptions {
        key: &key,
        certificates: &certificates,
        method: args
            .shards
            .map_or(Method::Files, |size| Method::Shards { size }),
        progress: &progress,
    };
    let (bundle, manifest) = signing::sign_with(&args.model, &signature, &opts)?;
    // Atomic replace: a reader never sees half a signature.
    let tmp = with_suffix(&signature, &format!(".tmp-{}", std::process::id()));
    write_new(&tmp, bundle.as_bytes(), 0o644, false)?;
    std::fs::rename(&tmp, &signature).map_err(|e| format!("{}: {e}", signature.display()))?;
    eprintln!(
        "signed {} ({} files, {} bytes) with {} {} -> {}",
        args.model.display(),
        manifest.files,
        manifest.bytes,
        if certificates.is_empty() {
            "key"
        } else {
            "certificate for key"
        },
        key.public_key().hint()?,
        signature.display()
    );
    Ok(())
}

pub fn verify(args: VerifyArgs) -> CmdResult {
    let trust = args.trust.policy()?;
    if trust.is_empty() {
        return Err(crate::open::Error::NoTrustedKeys.into());
    }
    let signature = args
        .signature
        .unwrap_or_else(|| signing::default_signature_path(&args.model));
    let progress = signing::progress::TerminalProgress::new("verifying");
    let v = signing::verify(&args.model, &signature, &trust, &progress)
        .map_err(|e| format!("{}: verification failed: {e}", args.model.display()))?;
    let method = match v.method {
        Method::Files => "files".to_string(),
        Method::Shards { size } => format!("shards of {size} bytes"),
    };
    println!(
        "verified {}: signer {}, mode {}, {method}, {} files, {} bytes",
        args.model.display(),
        v.signer,
        v.signer.mode(),
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
    Ok(crate::state_dir::resolve(dir)?)
}

pub fn trust(cmd: TrustCommand) -> CmdResult {
    match cmd {
        TrustCommand::Add { key, state_dir } => {
            let dir = state(state_dir)?;
            let id = crate::trust::read_key(&key)?.hint()?;
            // Trusting a signer is a set-up step: it does not create the audit log (which the
            // operator may want created for an auditor's key); the record waits in its spool.
            super::record_admin_no_create(
                Some(&dir),
                crate::audit::AuditRecord::event("trust_key_added")
                    .with_detail(format!("key {id}")),
            )?;
            let id = crate::trust::add(&dir, &key)?;
            eprintln!("trusted key {id}");
        }
        TrustCommand::List { state_dir } => {
            for (path, key) in crate::trust::load(&state(state_dir)?)? {
                println!("{}  {}  {}", key.hint()?, key.curve(), path.display());
            }
        }
        TrustCommand::Remove { id, state_dir } => {
            let dir = state(state_dir)?;
            super::record_admin_no_create(
                Some(&dir),
                crate::audit::AuditRecord::event("trust_key_removed")
                    .with_detail(format!("key {id}")),
            )?;
            crate::trust::remove(&dir, &id)?;
            eprintln!("removed key {id}");
        }
    }
    Ok(())
}
