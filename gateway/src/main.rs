//! `gateway`: the edge service and its command line.

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "Secure digital-twin synchronization gateway"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM or Ctrl-C.
    Run {
        #[arg(short, long, default_value = "gateway.toml")]
        config: PathBuf,
    },
    /// Validate a configuration and run the security self-check without connecting to anything; exits non-zero on any configuration error or on a finding at or above --fail-on.
    Check {
        #[arg(short, long, default_value = "gateway.toml")]
        config: PathBuf,
        /// Print the self-check report as JSON (schema: docs/selfcheck.schema.json).
        #[arg(long)]
        json: bool,
        /// Lowest finding severity that makes the check fail: info, low, medium, high, critical.
        #[arg(long, default_value = "high")]
        fail_on: gateway::selfcheck::Severity,
        /// Development profile: development PKI material is expected.
        #[arg(long)]
        dev: bool,
        /// Certificates expiring within this many days are reported.
        #[arg(long, default_value_t = 30)]
        expiry_days: u32,
    },
    /// Public key material.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// The tamper-evident audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Command policies: check them, run their test cases, dry-run a command.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Development PKI.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Health check (for containers): exits 0 when the configuration is valid
    /// and a batch was committed to data_dir recently, 1 otherwise.
    Health {
        #[arg(short, long, default_value = "gateway.toml")]
        config: PathBuf,
        /// Oldest acceptable last batch, in seconds. Default: three poll
        /// intervals of the slowest device, at least 60.
        #[arg(long)]
        max_age_s: Option<u64>,
    },
    /// Print the software bill of materials (CycloneDX 1.5 JSON, made from
    /// Cargo.lock at build time) and, on stderr, the build information.
    Sbom,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a key for encrypting the outbox at rest (AES-256-GCM, 64 hex characters, mode 0600).
    Outbox {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the key id and public key (PEM) of a telemetry signing key, for the cloud twin's trust store.
    Public {
        /// Ed25519 private key, PKCS#8 PEM.
        key_file: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify an audit log: names the first edited, deleted, inserted, reordered or truncated record; exit 1 if any.
    Verify {
        file: PathBuf,
        /// The gateway's signing public key (PEM) that signed the checkpoints; repeat for several.
        #[arg(long = "trust", required = true)]
        trust: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
struct PolicyTarget {
    /// The policy folder (every *.toml except *.tests.toml).
    #[arg(default_value = "policies")]
    dir: PathBuf,
    /// The gateway configuration that declares the tags.
    #[arg(short, long, default_value = "gateway.toml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Report every error and warning of a policy with file:line:col; exit 1 on any error.
    Check {
        #[command(flatten)]
        target: PolicyTarget,
    },
    /// Run the test cases next to the policy (*.tests.toml); exit 1 on any failure.
    Cases {
        #[command(flatten)]
        target: PolicyTarget,
    },
    /// Dry-run one command: the decision, the rule that decided it, and why.
    Test {
        #[command(flatten)]
        target: PolicyTarget,
        #[arg(long)]
        tag: String,
        /// The value asked for: true/false, a number, or text.
        #[arg(long)]
        value: String,
        /// The operator (token subject).
        #[arg(long)]
        operator: String,
        /// Role claims of the token; repeat for several.
        #[arg(long = "role")]
        roles: Vec<String>,
        /// Authentication methods (e.g. mfa); repeat for several.
        #[arg(long = "amr")]
        amr: Vec<String>,
        /// Subjects of operators who approved; repeat for several.
        #[arg(long = "approver")]
        approvers: Vec<String>,
        /// When (RFC 3339, e.g. 2026-11-25T03:00:00+01:00); default now.
        #[arg(long)]
        at: Option<String>,
        /// Current value of a tag, TAG=VALUE (good quality); repeat for several.
        #[arg(long = "current")]
        current: Vec<String>,
    },
}

/// A value typed on the command line: bool, integer, float, else text.
fn parse_value(s: &str) -> twin_model::Value {
    use twin_model::Value;
    if let Ok(b) = s.parse::<bool>() {
        return Value::Bool(b);
    }
    if let Ok(i) = s.parse::<i64>() {
        return Value::Int(i);
    }
    if let Ok(u) = s.parse::<u64>() {
        return Value::UInt(u);
    }
    match s.parse::<f64>() {
        Ok(f) if f.is_finite() => Value::Float(f),
        _ => Value::Text(s.to_owned()),
    }
}

fn load_config_or_report(path: &std::path::Path) -> anyhow::Result<gateway::config::Config> {
    gateway::config::load(path).map_err(|errors| {
        eprint!("{errors}");
        anyhow::anyhow!("{} error(s) in {}", errors.errors.len(), path.display())
    })
}

fn policy_main(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    use gateway::policy::{self, Approver, Command as PolicyCmd, CurrentValue, Policy};
    match command {
        PolicyCommand::Check { target } => {
            let cfg = load_config_or_report(&target.config)?;
            match Policy::load_dir(&target.dir, &cfg) {
                Ok((p, warnings)) => {
                    for w in &warnings {
                        eprintln!("{w}");
                    }
                    println!("{p}");
                    println!(
                        "{}: OK ({} warning(s))",
                        target.dir.display(),
                        warnings.len()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => {
                    eprint!("{errors}");
                    eprintln!(
                        "{} error(s) in {}; a policy with errors permits no write at all",
                        errors.errors.len(),
                        target.dir.display()
                    );
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        PolicyCommand::Cases { target } => {
            let cfg = load_config_or_report(&target.config)?;
            match policy::run_tests(&target.dir, &cfg) {
                Ok(report) => {
                    print!("{report}");
                    Ok(if report.passed() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    })
                }
                Err(errors) => {
                    eprint!("{errors}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        PolicyCommand::Test {
            target,
            tag,
            value,
            operator,
            roles,
            amr,
            approvers,
            at,
            current,
        } => {
            let cfg = load_config_or_report(&target.config)?;
            let p = match Policy::load_dir(&target.dir, &cfg) {
                Ok((p, _)) => p,
                Err(errors) => {
                    eprint!("{errors}");
                    anyhow::bail!(
                        "the policy has errors: every command would be denied (invalid_policy)"
                    );
                }
            };
            let at_ms = match at {
                Some(t) => {
                    let ts: jiff::Timestamp = t
                        .parse()
                        .with_context(|| format!("--at {t:?} is not an RFC 3339 time"))?;
                    u64::try_from(ts.as_millisecond()).context("--at is before 1970")?
                }
                None => gateway::clock::now_ms(),
            };
            let mut now = std::collections::BTreeMap::new();
            for c in current {
                let (t, v) = c
                    .split_once('=')
                    .with_context(|| format!("--current {c:?} must be TAG=VALUE"))?;
                now.insert(t.to_owned(), CurrentValue::good(parse_value(v)));
            }
            let cmd = PolicyCmd {
                id: "dry-run".into(),
                tag,
                value: parse_value(&value),
                operator,
                roles,
                amr,
                approvers: approvers.into_iter().map(Approver::subject).collect(),
                at_ms,
            };
            println!("{}", policy::dry_run(&p, &cmd, &now));
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create a development CA, broker and client certificates and signing keys (never for production).
    Dev {
        /// Output folder (created with mode 0700).
        #[arg(long, default_value = "pki")]
        out: PathBuf,
        #[arg(long)]
        gateway_id: String,
        /// Host names and IP addresses for the broker certificate.
        #[arg(long = "broker-host", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        broker_hosts: Vec<String>,
        /// Common name of the operator's client certificate.
        #[arg(long, default_value = "twin-operator")]
        operator: String,
        #[arg(long, default_value_t = 90)]
        days: i64,
    },
}

/// Reports what the gateway will do with commands; false when commands
/// are configured but none could be accepted (no operator key, or a policy
/// with errors).
fn check_commands(cfg: &gateway::config::Config) -> bool {
    let Some(cc) = &cfg.commands else {
        println!("commands: disabled (no [commands] table): the gateway writes nothing");
        return true;
    };
    let mut ok = true;
    match gateway::command_auth::OperatorTrustStore::load_dir(&cc.operator_keys_dir) {
        Ok(keys) if keys.is_empty() => {
            println!(
                "commands: {}: no operator key (*.pem): every command would be refused",
                cc.operator_keys_dir.display()
            );
            ok = false;
        }
        Ok(keys) => println!(
            "commands: {} operator key(s) from {}, issuer \"{}\"",
            keys.len(),
            cc.operator_keys_dir.display(),
            cc.issuer
        ),
        Err(e) => {
            println!(
                "commands: {}: operator keys cannot be loaded ({e}): every command would be refused",
                cc.operator_keys_dir.display()
            );
            ok = false;
        }
    }
    match gateway::policy::Policy::load_dir(&cc.policy_dir, cfg) {
        Ok((p, warnings)) => {
            for w in &warnings {
                eprintln!("{w}");
            }
            println!(
                "commands: policy {} in {} mode, {} rule(s), {} warning(s)",
                cc.policy_dir.display(),
                p.mode().as_str(),
                p.rule_ids().count(),
                warnings.len()
            );
            if p.mode() == gateway::policy::Mode::Audit {
                println!("commands: the policy is in audit mode: every command is denied");
            }
        }
        Err(errors) => {
            eprint!("{errors}");
            println!(
                "commands: policy {}: {} error(s): every command would be denied",
                cc.policy_dir.display(),
                errors.errors.len()
            );
            ok = false;
        }
    }
    ok
}

fn main() -> ExitCode {
    gateway::tls::install_default_provider();
    let cli = Cli::parse();
    gateway::logging::init("info", matches!(cli.log_format, LogFormat::Json));
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check {
            config,
            json,
            fail_on,
            dev,
            expiry_days,
        } => match gateway::config::load(&config) {
            Ok(cfg) if json => {
                let mut opts = gateway::selfcheck::CheckOptions::at(gateway::clock::now_ms());
                opts.dev_profile = dev || cfg.gateway.dev_profile;
                opts.expiry_warning_days = expiry_days;
                let report = gateway::selfcheck::check(&cfg, &opts);
                println!("{}", serde_json::to_string_pretty(&report)?);
                Ok(if report.max_severity().is_some_and(|s| s >= fail_on) {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                })
            }
            Ok(cfg) => {
                let tags: usize = cfg.devices.iter().map(|d| d.tag_count()).sum();
                println!(
                    "{}: OK: gateway {}, {} device(s), {} tag(s), broker {}:{} (TLS {})",
                    config.display(),
                    cfg.gateway.id,
                    cfg.devices.len(),
                    tags,
                    cfg.mqtt.host,
                    cfg.mqtt.port,
                    match cfg.mqtt.tls.min_version {
                        gateway::config::TlsVersion::Tls13 => "1.3 only",
                        gateway::config::TlsVersion::Tls12 => "1.2 allowed",
                    }
                );
                println!("audit log: {}", cfg.audit.file.display());
                for d in &cfg.devices {
                    if let gateway::config::DeviceConfig::OpcUa(o) = d {
                        let security = match o.security_policy {
                            Some(gateway::config::OpcUaPolicy::None) => {
                                "INSECURE: security None (allow_security_none = true)".to_string()
                            }
                            Some(p) => format!("{} {:?}", p.name(), o.security_mode),
                            None => format!("best secure policy, {:?}", o.security_mode),
                        };
                        println!(
                            "device {}: OPC UA {} ({security}); trust list {}",
                            o.name,
                            o.endpoint_url,
                            o.pki_dir.join("trusted").display()
                        );
                    }
                }
                let commands_ok = check_commands(&cfg);
                let mut opts = gateway::selfcheck::CheckOptions::at(gateway::clock::now_ms());
                opts.dev_profile = dev || cfg.gateway.dev_profile;
                opts.expiry_warning_days = expiry_days;
                let report = gateway::selfcheck::check(&cfg, &opts);
                if report.findings.is_empty() {
                    println!("security self-check: no finding");
                }
                for f in &report.findings {
                    println!(
                        "security self-check: {}: {} ({}): {}\n  fix: {}",
                        f.severity, f.code, f.subject, f.message, f.fix
                    );
                }
                let failing = report.max_severity().is_some_and(|s| s >= fail_on);
                Ok(if commands_ok && !failing {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Err(errors) => {
                eprint!("{errors}");
                eprintln!("{} error(s) in {}", errors.errors.len(), config.display());
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Run { config } => {
            let cfg = match gateway::config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprint!("{errors}");
                    anyhow::bail!(
                        "{} error(s) in {}; not starting",
                        errors.errors.len(),
                        config.display()
                    );
                }
            };
            let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
            rt.block_on(async move {
                let handle = gateway::run::start(cfg).await?;
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: shutting down"),
                    _ = handle.fatal() => tracing::error!("a fatal error stopped the gateway"),
                }
                let stragglers = handle.stop().await;
                anyhow::Ok(if stragglers.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            })
        }
        Command::Policy { command } => policy_main(command),
        Command::Audit {
            command: AuditCommand::Verify { file, trust },
        } => {
            let mut store = twin_model::TrustStore::new();
            for t in &trust {
                let pem = std::fs::read_to_string(t).with_context(|| format!("{}", t.display()))?;
                store
                    .add_pem(&pem)
                    .with_context(|| format!("{}", t.display()))?;
            }
            let report = gateway::audit::verify_file(&file, &store)
                .with_context(|| format!("{}", file.display()))?;
            println!("{report}");
            Ok(if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Key {
            command: KeyCommand::Outbox { out },
        } => {
            let mut key = [0u8; 32];
            aws_lc_rs::rand::fill(&mut key).context("the system random generator")?;
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            if out.exists() {
                anyhow::bail!("{} exists; not overwriting a key", out.display());
            }
            gateway::keyfile::write_private(&out, &format!("{hex}\n"))?;
            println!(
                "outbox key written to {} (mode 0600); set [outbox] encryption_key_file to it",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Key {
            command: KeyCommand::Public { key_file },
        } => {
            let key = gateway::run::load_signing_key(&key_file)?;
            println!("kid: {}", key.kid());
            print!("{}", key.public_key_pem());
            Ok(ExitCode::SUCCESS)
        }
        Command::Pki {
            command:
                PkiCommand::Dev {
                    out,
                    gateway_id,
                    broker_hosts,
                    operator,
                    days,
                },
        } => {
            let files = gateway::pki::create_dev_pki(&gateway::pki::DevPkiOptions {
                out_dir: out.clone(),
                gateway_id,
                broker_hosts,
                operator,
                valid_days: days,
            })?;
            println!(
                "development PKI written to {} (private keys mode 0600; not for production)",
                files.dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Sbom => {
            let doc: serde_json::Value = serde_json::from_str(gateway::sbom::SBOM_JSON)?;
            println!("{}", serde_json::to_string_pretty(&doc)?);
            let b = gateway::sbom::build();
            eprintln!(
                "gateway {} (commit {}, {}, {} {}); SBOM sha256 {}, {} components",
                b.version,
                b.commit,
                b.rustc,
                b.target,
                b.profile,
                gateway::sbom::sbom_sha256(),
                gateway::sbom::component_count()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Health { config, max_age_s } => {
            let cfg = match gateway::config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprint!("{errors}");
                    println!(
                        "unhealthy: {} error(s) in {}",
                        errors.errors.len(),
                        config.display()
                    );
                    return Ok(ExitCode::FAILURE);
                }
            };
            let slowest = cfg
                .devices
                .iter()
                .map(|d| d.poll_interval())
                .max()
                .unwrap_or_default();
            let max_age = max_age_s
                .map(std::time::Duration::from_secs)
                .unwrap_or_else(|| (slowest * 3).max(std::time::Duration::from_secs(60)));
            // The gateway commits its chain position to data_dir with every
            // batch: the newest file there tells when it last made progress.
            let dir = &cfg.gateway.data_dir;
            let age = std::fs::read_dir(dir).and_then(|entries| {
                let mut newest = None;
                for entry in entries {
                    let modified = entry?.metadata()?.modified()?;
                    newest = newest.max(Some(modified));
                }
                newest
                    .map(|t| t.elapsed().unwrap_or_default())
                    .ok_or_else(|| std::io::Error::other("no batch committed yet"))
            });
            match age {
                Ok(age) if age <= max_age => {
                    println!("healthy: last batch committed {} ms ago", age.as_millis());
                    Ok(ExitCode::SUCCESS)
                }
                Ok(age) => {
                    println!(
                        "unhealthy: no batch committed for {} s (limit {} s)",
                        age.as_secs(),
                        max_age.as_secs()
                    );
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => {
                    println!("unhealthy: {}: {e}", dir.display());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}
