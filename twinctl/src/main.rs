//! `twinctl`: the operator tool. `twinctl watch` shows the live, verified twin; the operator commands `key generate`, `command mint|approve|send|results` and `audit follow` make keys, sign and approve commands, send them and verify their results, and follow the audit chain.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::io::{IsTerminal as _, Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use twin_model::command::Envelope;
use twin_model::{TrustStore, Value};
use twinctl::operator::{self, AuditEvent, Identity, NoResult, ResultEvent};
use twinctl::watch::{WatchEvent, Watcher};

#[derive(Parser)]
#[command(
    name = "twinctl",
    version,
    about = "Operator tool for the twin gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Action,
}

#[derive(clap::Args)]
struct Connection {
    /// Broker as host:port.
    #[arg(long, default_value = "localhost:8883")]
    broker: String,
    #[arg(long)]
    ca: PathBuf,
    /// The operator's client certificate.
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    #[arg(long, default_value = "twin")]
    prefix: String,
}

impl Connection {
    fn options(&self) -> anyhow::Result<twinctl::client::ClientOptions> {
        let (host, port) = self
            .broker
            .rsplit_once(':')
            .context("--broker must be host:port")?;
        let port: u16 = port.parse().context("--broker port must be a number")?;
        Ok(twinctl::client::ClientOptions {
            host: host.into(),
            port,
            ca_file: self.ca.clone(),
            cert_file: self.cert.clone(),
            key_file: self.key.clone(),
            client_id: format!("twinctl-{}", std::process::id()),
        })
    }
}

/// One gateway's signed messages: where, which gateway, trusting which key.
#[derive(clap::Args)]
struct Feed {
    #[command(flatten)]
    conn: Connection,
    #[arg(long)]
    gateway: String,
    /// Public key (PEM) of the gateway's signing key; repeat for several.
    #[arg(long = "trust", required = true)]
    trust: Vec<PathBuf>,
}

impl Feed {
    /// The connection options and the trust store.
    fn open(&self) -> anyhow::Result<(twinctl::client::ClientOptions, TrustStore)> {
        Ok((self.conn.options()?, load_trust(&self.trust)?))
    }
}

#[derive(Subcommand)]
enum Action {
    /// Verify every message and show the live twin.
    Watch {
        #[command(flatten)]
        conn: Connection,
        /// Public key (PEM) of a gateway's telemetry signing key; repeat for several.
        #[arg(long = "trust", required = true)]
        trust: Vec<PathBuf>,
        /// Watch only this gateway.
        #[arg(long)]
        gateway: Option<String>,
        /// Print one JSON line per event instead of the table.
        #[arg(long)]
        json: bool,
        /// Stop after this many seconds (exit code 1 if anything was rejected or missing).
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Verify captured batches (one compact JWS per line) offline, in order.
    Verify {
        #[arg(long = "trust", required = true)]
        trust: Vec<PathBuf>,
        files: Vec<PathBuf>,
    },
    /// Operator signing keys.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Signed commands: mint, approve, send, follow results.
    #[command(subcommand)]
    Command(CommandCmd),
    /// The gateway's audit log as it publishes it.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Fetch a gateway's signed asset inventory and SBOM (retained), verify
    /// them and print the inventory; exit 1 if anything does not verify.
    Inventory {
        #[command(flatten)]
        feed: Feed,
        /// Print the inventory as JSON instead.
        #[arg(long)]
        json: bool,
        /// Write the verified SBOM (CycloneDX JSON) to this file.
        #[arg(long)]
        sbom: Option<PathBuf>,
        /// Give up waiting for the retained messages after this many seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KeyAlg {
    /// Ed25519 (tokens signed EdDSA).
    Ed25519,
    /// ECDSA P-256 (tokens signed ES256).
    P256,
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Generate an operator key: the private key to FILE (mode 0600), the
    /// public key to FILE.pub.pem (for the gateway's operator_keys_dir).
    Generate {
        #[arg(long, value_enum)]
        alg: KeyAlg,
        /// Private key file to create (never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Who signs a token, and for how long it is valid.
#[derive(clap::Args)]
struct Signer {
    /// The operator's private key (PKCS#8 PEM, mode 0600).
    #[arg(long)]
    key: PathBuf,
    /// Issuer (iss) the gateway trusts.
    #[arg(long)]
    issuer: String,
    /// The operator (sub).
    #[arg(long)]
    operator: String,
    /// The gateway id (aud).
    #[arg(long)]
    gateway: String,
    /// A role of the operator; repeat for several.
    #[arg(long = "role")]
    roles: Vec<String>,
    /// An authentication method used (RFC 8176: pwd, otp, hwk, ...); repeat for several.
    #[arg(long = "amr")]
    amr: Vec<String>,
    /// Lifetime of the token in seconds (the gateway refuses more than its
    /// max_token_lifetime, 5 min by default).
    #[arg(long, default_value_t = 120)]
    ttl_s: u64,
    /// Write the token to this file (mode 0600) instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

impl Signer {
    fn identity(&self) -> Identity {
        Identity {
            issuer: self.issuer.clone(),
            operator: self.operator.clone(),
            gateway: self.gateway.clone(),
            roles: self.roles.clone(),
            amr: self.amr.clone(),
        }
    }
}

#[derive(Subcommand)]
enum CommandCmd {
    /// Sign a command token: set TAG to VALUE.
    Mint {
        #[command(flatten)]
        signer: Signer,
        /// The tag to write.
        #[arg(long)]
        tag: String,
        /// The value: a JSON scalar (42, -7, 42.5, true, "text"); anything
        /// that is not JSON is text.
        #[arg(long, allow_hyphen_values = true, value_parser = operator::parse_value)]
        value: Value,
        /// The value the tag is expected to hold now (same syntax).
        #[arg(long, allow_hyphen_values = true, value_parser = operator::parse_value)]
        expect: Option<Value>,
    },
    /// Sign an approval of a command token (shows what is approved).
    Approve {
        #[command(flatten)]
        signer: Signer,
        /// The command token to approve ('-' for standard input).
        #[arg(long)]
        command: PathBuf,
    },
    /// Send a command (with its approvals) and wait for its signed result.
    /// Exit code: 0 applied, 3 denied, 4 failed, 5 refused, 2 no result.
    Send {
        #[command(flatten)]
        conn: Connection,
        #[arg(long)]
        gateway: String,
        /// The command token ('-' for standard input).
        #[arg(long)]
        token: PathBuf,
        /// An approval token; repeat for several.
        #[arg(long = "approval")]
        approvals: Vec<PathBuf>,
        /// Public key (PEM) of the gateway's signing key; repeat for several.
        #[arg(long = "trust", required = true)]
        trust: Vec<PathBuf>,
        /// Seconds to wait for the result.
        #[arg(long, default_value_t = 10)]
        wait_s: u64,
        /// Print the result document as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow the gateway's command results, verifying each.
    Results {
        #[command(flatten)]
        feed: Feed,
        /// One JSON document per line.
        #[arg(long)]
        json: bool,
        /// Stop after this many seconds (exit code 1 if anything was rejected).
        #[arg(long)]
        seconds: Option<u64>,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Follow the audit records as published, checking the hash chain and
    /// the signed checkpoints as they arrive.
    Follow {
        #[command(flatten)]
        feed: Feed,
        /// Stop after this many seconds (exit code 1 if the chain broke).
        #[arg(long)]
        seconds: Option<u64>,
    },
}

fn load_trust(paths: &[PathBuf]) -> anyhow::Result<TrustStore> {
    let mut trust = TrustStore::new();
    for p in paths {
        let pem = std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?;
        let kid = trust
            .add_pem(&pem)
            .with_context(|| format!("{}", p.display()))?;
        eprintln!("trusting key {kid} ({})", p.display());
    }
    Ok(trust)
}

/// A token from a file, or from standard input for `-`; surrounding
/// whitespace (a final newline) removed.
fn read_token(path: &Path) -> anyhow::Result<String> {
    let mut text = String::new();
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("standard input")?;
    } else {
        text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    }
    let token = text.trim();
    if token.is_empty() {
        anyhow::bail!("{}: no token", path.display());
    }
    Ok(token.to_owned())
}

/// Prints a token, or writes it to `out` (mode 0600: a token is a
/// credential until it is used or expires).
fn emit_token(token: &str, out: Option<&Path>) -> anyhow::Result<()> {
    let Some(out) = out else {
        println!("{token}");
        return Ok(());
    };
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(out)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(token.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()
    };
    write().with_context(|| format!("{}", out.display()))?;
    eprintln!("token written to {}", out.display());
    Ok(())
}

fn now_s() -> u64 {
    gateway::clock::now_ms() / 1000
}

fn warn_lifetime(ttl_s: u64) {
    if ttl_s > gateway::command_auth::DEFAULT_MAX_LIFETIME_MS / 1000 {
        eprintln!(
            "warning: a lifetime of {ttl_s} s is longer than the gateway accepts by default ({} s)",
            gateway::command_auth::DEFAULT_MAX_LIFETIME_MS / 1000
        );
    }
}

fn main() -> ExitCode {
    gateway::tls::install_default_provider();
    gateway::logging::init("warn", false);
    match real_main(Cli::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Action::Inventory {
            feed,
            json,
            sbom,
            seconds,
        } => {
            let (opts, trust) = feed.open()?;
            let Feed { conn, gateway, .. } = feed;
            let rt = tokio::runtime::Runtime::new()?;
            let fetched = rt.block_on(twinctl::inventory::fetch(
                &opts,
                &conn.prefix,
                &gateway,
                trust,
                Duration::from_secs(seconds),
            ))?;
            match fetched {
                Ok(v) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&v.inventory)?);
                    } else {
                        print!("{}", twinctl::inventory::describe(&v));
                    }
                    if let Some(path) = sbom {
                        std::fs::write(&path, &v.sbom)
                            .with_context(|| format!("{}", path.display()))?;
                        eprintln!("SBOM written to {}", path.display());
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(problems) => {
                    for p in problems {
                        eprintln!("REJECTED: {p}");
                    }
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Action::Verify { trust, files } => {
            let mut w = Watcher::new("twin", load_trust(&trust)?);
            let mut bad = 0;
            for f in files {
                let text =
                    std::fs::read_to_string(&f).with_context(|| format!("{}", f.display()))?;
                for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
                    let ev = w.handle("twin/_/telemetry", line.trim().as_bytes());
                    let ev = match ev {
                        // Offline files carry no topic: take the gateway from the batch.
                        WatchEvent::Rejected { code, .. } if code == "wrong_topic" => {
                            WatchEvent::Ignored {
                                topic: String::new(),
                            }
                        }
                        e => e,
                    };
                    if ev.is_alarm() {
                        bad += 1;
                    }
                    println!(
                        "{}:{}: {}",
                        f.display(),
                        i + 1,
                        twinctl::render::json_line(&ev)
                    );
                }
            }
            Ok(if bad == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Action::Watch {
            conn,
            trust,
            gateway,
            json,
            seconds,
        } => {
            let opts = conn.options()?;
            let trust = load_trust(&trust)?;
            let rt = tokio::runtime::Runtime::new()?;
            let output = if json {
                twinctl::client::Output::JsonLines
            } else {
                twinctl::client::Output::Table
            };
            let summary = rt.block_on(twinctl::client::watch_live(
                opts,
                &conn.prefix,
                trust,
                gateway.as_deref(),
                output,
                seconds.map(Duration::from_secs),
            ))?;
            Ok(if summary.clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Action::Key(KeyCmd::Generate { alg, out }) => {
            let alg = match alg {
                KeyAlg::Ed25519 => gateway::command_auth::Algorithm::EdDSA,
                KeyAlg::P256 => gateway::command_auth::Algorithm::ES256,
            };
            let g = operator::generate_key(alg, &out)?;
            println!("kid: {}", g.kid);
            println!("algorithm: {}", g.alg);
            println!("private key: {} (mode 0600)", g.private_path.display());
            println!(
                "public key: {} (install it in the gateway's operator_keys_dir)",
                g.public_path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Action::Command(CommandCmd::Mint {
            signer,
            tag,
            value,
            expect,
        }) => {
            warn_lifetime(signer.ttl_s);
            let key = operator::read_operator_key(&signer.key)?;
            let now = now_s();
            let m = operator::mint_command_token(
                &key,
                &signer.identity(),
                &tag,
                value,
                expect,
                signer.ttl_s,
                now,
            )?;
            emit_token(&m.token, signer.out.as_deref())?;
            eprintln!("command id: {}", m.jti());
            eprintln!("{}", operator::describe_command(&m.claims, now));
            Ok(ExitCode::SUCCESS)
        }
        Action::Command(CommandCmd::Approve { signer, command }) => {
            warn_lifetime(signer.ttl_s);
            let key = operator::read_operator_key(&signer.key)?;
            let token = read_token(&command)?;
            let now = now_s();
            let a = operator::approve_token(&key, &signer.identity(), &token, signer.ttl_s, now)?;
            eprintln!(
                "approving (signature not checked here; the gateway checks it): {}",
                operator::describe_command(&a.command, now)
            );
            if a.by_requester() {
                eprintln!(
                    "warning: {} requested this command; the policy does not count an approval by the requester (duplicate_approver)",
                    a.command.sub
                );
            }
            if a.command.exp <= now {
                eprintln!("warning: the command has expired; the gateway will refuse it");
            }
            emit_token(&a.token, signer.out.as_deref())?;
            eprintln!("approval id: {}", a.claims.jti);
            Ok(ExitCode::SUCCESS)
        }
        Action::Command(CommandCmd::Send {
            conn,
            gateway,
            token,
            approvals,
            trust,
            wait_s,
            json,
        }) => {
            let command = read_token(&token)?;
            let approvals = approvals
                .iter()
                .map(|p| read_token(p))
                .collect::<anyhow::Result<Vec<_>>>()?;
            match operator::read_command_unverified(&command) {
                Ok(c) => {
                    eprintln!("sending {}", operator::describe_command(&c, now_s()));
                    if c.aud != gateway {
                        eprintln!("warning: the token is for gateway {:?}, not {gateway:?}; it will be refused (wrong_audience)", c.aud);
                    }
                }
                Err(e) => eprintln!(
                    "warning: the command token cannot be read ({e:#}); sending it anyway, the gateway decides"
                ),
            }
            let trust = load_trust(&trust)?;
            let opts = conn.options()?;
            let envelope = Envelope { command, approvals };
            let rt = tokio::runtime::Runtime::new()?;
            let sent = rt.block_on(operator::send_command(
                &opts,
                &conn.prefix,
                &gateway,
                &envelope,
                &trust,
                Duration::from_secs(wait_s),
            ));
            match sent {
                Ok(reply) => {
                    if json {
                        println!("{}", serde_json::to_string(&reply.result)?);
                    } else {
                        print!("{}", operator::result_text(&reply.result));
                    }
                    eprintln!(
                        "round trip: {:.1} ms",
                        reply.round_trip.as_secs_f64() * 1000.0
                    );
                    Ok(ExitCode::from(operator::exit_code(reply.result.status)))
                }
                Err(e) => match e.downcast_ref::<NoResult>() {
                    Some(nr) => {
                        eprintln!("error: {nr}");
                        Ok(ExitCode::from(operator::EXIT_NO_RESULT))
                    }
                    None => Err(e),
                },
            }
        }
        Action::Command(CommandCmd::Results {
            feed,
            json,
            seconds,
        }) => {
            let (opts, trust) = feed.open()?;
            let Feed { conn, gateway, .. } = feed;
            let rt = tokio::runtime::Runtime::new()?;
            let mut rejected = 0u64;
            rt.block_on(operator::follow_results(
                &opts,
                &conn.prefix,
                &gateway,
                &trust,
                seconds.map(Duration::from_secs),
                |ev| match ev {
                    ResultEvent::Verified(r) if json => match serde_json::to_string(&r) {
                        Ok(j) => println!("{j}"),
                        Err(e) => eprintln!("error: {e}"),
                    },
                    ResultEvent::Verified(r) => println!("{}", operator::result_line(&r)),
                    ResultEvent::Rejected { code, message } => {
                        rejected += 1;
                        eprintln!("!! REJECTED a message on the result topic: {code}: {message}");
                    }
                    ResultEvent::Subscribed => {
                        eprintln!("following {}/{gateway}/result", conn.prefix)
                    }
                    ResultEvent::Lost(why) => eprintln!("connection to the broker failed: {why}"),
                },
            ))?;
            Ok(if rejected == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Action::Audit(AuditCmd::Follow { feed, seconds }) => {
            let (opts, trust) = feed.open()?;
            let Feed { conn, gateway, .. } = feed;
            let rt = tokio::runtime::Runtime::new()?;
            let tty = std::io::stdout().is_terminal();
            let stats = rt.block_on(operator::follow_audit(
                &opts,
                &conn.prefix,
                &gateway,
                &trust,
                seconds.map(Duration::from_secs),
                |ev| match ev {
                    AuditEvent::Line(l) => {
                        let text = operator::audit_text(&l);
                        if !l.is_alarm() {
                            println!("{text}");
                        } else if tty {
                            println!("\x1b[1;31m{text}\x1b[0m");
                        } else {
                            // Output to a file: the alarm goes to the terminal too.
                            println!("{text}");
                            eprintln!("{text}");
                        }
                    }
                    AuditEvent::Subscribed => {
                        eprintln!("following {}/{gateway}/audit", conn.prefix)
                    }
                    AuditEvent::Lost(why) => eprintln!("connection to the broker failed: {why}"),
                },
            ))?;
            eprintln!(
                "{} record(s), {} checkpoint(s) verified, {} duplicate(s), {} gateway restart(s), \
                 {} record(s) missed (while disconnected or not published at a restart), \
                 {} not (yet) covered by a checkpoint; {} chain break(s), {} bad line(s), \
                 {} bad checkpoint(s), {} new log(s)",
                stats.records,
                stats.checkpoints,
                stats.duplicates,
                stats.restarts,
                stats.missed,
                stats.unsigned,
                stats.breaks,
                stats.bad_lines,
                stats.bad_checkpoints,
                stats.new_logs
            );
            Ok(if stats.clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
