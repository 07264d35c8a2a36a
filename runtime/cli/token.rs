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
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

fn store(dir: Option<PathBuf>) -> Result<TokenStore, crate::trust::TrustError> {
    let dir = crate::state_dir::resolve(dir)?;
    Ok(TokenStore::new(&dir))
}

/// An audit record of a token change: id, name, scopes and expiry, never the secret.
fn token_event(event: &str, r: &tokens::TokenRecord) -> crate::audit::AuditRecord {
    let mut rec = crate::audit::AuditRecord::event(event).with_detail(format!(
        "name {:?}, scopes {}, expires {}",
        r.name,
        r.scope_list(),
        when(r.expires)
    ));
    rec.token_id = Some(r.id.clone());
    rec
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
            let created = store.create(&a.name, scopes, a.models, limits, expires)?;
            let r = &created.record;
            // Unaudited, the token must not exist: it is revoked again and nothing is shown.
            if let Err(e) = super::record_admin_with(
                a.state_dir.as_deref(),
                token_event("token_created", r),
                true,
            ) {
                let _ = store.revoke(&r.id);
                return Err(format!("token not created: {e}").into());
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
                        "{}  {:<20} {:<34} models={} rate={}/min tokens={}/min expires={}{}",
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
            // Revocation takes effect first; the record follows (a failure to audit is
            // reported, but never keeps a token alive).
            if all {
                let n = store(state_dir.clone())?.revoke_all()?;
                eprintln!("revoked all {n} tokens");
                let r = crate::audit::AuditRecord::event("tokens_revoked_all")
                    .with_detail(format!("{n} tokens"));
                super::record_admin_with(state_dir.as_deref(), r, true)?;
            } else if let Some(id) = id_or_name {
                let r = store(state_dir.clone())?.revoke(&id)?;
                eprintln!("revoked token {} ({})", r.id, r.name);
                super::record_admin_with(
                    state_dir.as_deref(),
                    token_event("token_revoked", &r),
                    true,
                )?;
            }
        }
    }
    Ok(())
}
