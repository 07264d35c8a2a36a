//! `securerun token create|list|revoke`: the access tokens `serve` accepts.

use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::CmdResult;
use crate::tokens::{self, Limits, Scope, TokenStore};

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a token; its secret is printed once, alone on the last line of stdout.
    Create(CreateArgs),
    /// List tokens (never their secrets).
    List {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Revoke a token by id or name (or all with --all); a running server stops accepting it
    /// within a second.
    Revoke {
        #[arg(required_unless_present = "all")]
        id_or_name: Option<String>,
        /// Revoke every token (incident response).
        #[arg(long, conflicts_with = "id_or_name")]
        all: bool,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    #[arg(long)]
    name: String,
    /// Comma-separated: inference, embeddings, metrics, admin.
    #[arg(long, value_delimiter = ',', required = true)]
    scopes: Vec<Scope>,
    /// Comma-separated model names this token may use (default: any).
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    /// Lifetime, e.g. 30d, 12h, 90m (default: no expiry).
    #[arg(long, value_parser = tokens::parse_duration)]
    expires: Option<u64>,
    /// Request rate, e.g. 60/min, 2/s (default 60/min).
    #[arg(long, value_parser = tokens::parse_rate)]
    rate: Option<u32>,
    /// Generated-token budget per minute (default 20000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    tokens_per_min: Option<u32>,
    /// The token's holder consents to having prompt and completion content recorded in the
    /// audit log (`serve --audit-content hmac|full`); without it, content is never recorded
    /// for this token. The consent is itself recorded.
    #[arg(long)]
    consent_content: bool,
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

fn store(dir: Option<PathBuf>) -> Result<TokenStore, crate::trust::TrustError> {
    let dir = crate::state_dir::resolve(dir)?;
    Ok(TokenStore::new(&dir))
}

fn when(secs: Option<u64>) -> String {
    secs.map_or_else(|| "never".into(), |s| format!("unix {s}"))
}

pub fn run(cmd: TokenCommand) -> CmdResult {
    match cmd {
        TokenCommand::Create(a) => {
            let defaults = Limits::default();
            let limits = Limits {
                requests_per_min: a.rate.unwrap_or(defaults.requests_per_min),
                tokens_per_min: a.tokens_per_min.unwrap_or(defaults.tokens_per_min),
            };
            let expires = a.expires.map(|d| tokens::now() + d);
            let scopes: BTreeSet<Scope> = a.scopes.into_iter().collect();
            let store = store(a.state_dir.clone())?;
            let mut created =
                tokens::TokenStore::prepare(&a.name, scopes, a.models, limits, expires)?;
            if a.consent_content {
                created.record.consent_content = Some(tokens::Consent::now("the securerun CLI"));
            }
            let r = &created.record;
            if store.load()?.iter().any(|t| t.name == r.name) {
                return Err(tokens::TokenError::DuplicateName(r.name.clone()).into());
            }
            // Recorded first: a token whose creation cannot be audited is never stored.
            super::record_admin(a.state_dir.as_deref(), r.audit_event("token_created"))
                .map_err(|e| format!("token not created: {e}"))?;
            if let Some(c) = &r.consent_content {
                super::record_admin(a.state_dir.as_deref(), c.audit_event(r))
                    .map_err(|e| format!("token not created: {e}"))?;
            }
            if let Err(e) = store.insert(r) {
                let mut failed = r.audit_event("token_create_failed");
                failed.outcome = Some("error".into());
                let _ = super::record_admin(a.state_dir.as_deref(), failed);
                return Err(e.into());
            }
            eprintln!(
                "created token {} ({}), scopes {}, expires {}; the secret below is shown once",
                r.id,
                r.name,
                r.scope_list(),
                when(r.expires)
            );
            println!("{}", created.token);
        }
        TokenCommand::List { json, state_dir } => {
            let records = store(state_dir)?.load()?;
            if json {
                let views: Vec<_> = records.iter().map(|r| r.view()).collect();
                println!("{}", serde_json::to_string_pretty(&views)?);
            } else {
                let now = tokens::now();
                for r in records {
                    println!(
                        "{}  {:<20} {:<34} models={} rate={}/min tokens={}/min expires={}{}{}",
                        r.id,
                        r.name,
                        r.scope_list(),
                        if r.models.is_empty() {
                            "*".into()
                        } else {
                            r.models.join(",")
                        },
                        r.limits.requests_per_min,
                        r.limits.tokens_per_min,
                        when(r.expires),
                        r.consent_content
                            .as_ref()
                            .map_or(String::new(), |c| format!(
                                " consent=content(unix {})",
                                c.time
                            )),
                        if r.expired(now) { " (EXPIRED)" } else { "" }
                    );
                }
            }
        }
        TokenCommand::Revoke {
            id_or_name,
            all,
            state_dir,
        } => {
            // Recorded first, then done: an action the log cannot hold is not taken (and while
            // the log cannot be written, a running server refuses every request anyway).
            let store = store(state_dir.clone())?;
            if all {
                let n = store.load()?.len();
                let r = crate::audit::AuditRecord::event("tokens_revoked_all")
                    .with_detail(format!("{n} tokens"));
                super::record_admin(state_dir.as_deref(), r)?;
                let n = store.revoke_all()?;
                eprintln!("revoked all {n} tokens");
            } else if let Some(id) = id_or_name {
                let found = store.find(&id)?;
                super::record_admin(state_dir.as_deref(), found.audit_event("token_revoked"))?;
                let r = store.revoke(&found.id)?;
                eprintln!("revoked token {} ({})", r.id, r.name);
            }
        }
    }
    Ok(())
}
