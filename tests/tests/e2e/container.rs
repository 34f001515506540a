//! The hardened container image, proven by running it.
//!
//! `docker/build-image.sh` builds a static gateway binary on the host and
//! the image from `docker/Dockerfile` with podman. The test then inspects
//! the image (only the expected files, no shell, non-root user, size) and
//! runs it as in production: read-only root filesystem, no capabilities,
//! no new privileges, `/config` mounted read-only, `/data` the only
//! writable place, host networking to a real Mosquitto on loopback, which
//! the gateway reaches by the name `localhost`. A verifying subscriber
//! checks the signed telemetry from the simulated PLC across a stop
//! (SIGTERM) and a restart of the container.

use super::{init, Twin, GW};
use anyhow::{bail, ensure, Context as _};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use twin_model::{Continuity, Quality};
use twin_testkit::mosquitto::{BrokerOptions, Mosquitto};
use twin_testkit::pki::TestPki;
use twin_testkit::sim::PlcSim;
use twinctl::watch::WatchEvent;

/// The user the image runs as.
const UID: u32 = 65532;
/// Largest acceptable image.
const MAX_IMAGE_BYTES: u64 = 25 * 1000 * 1000;
/// Every path in the image; anything else (a shell, a package manager) fails the test.
const IMAGE_TREE: [&str; 10] = [
    "config",
    "data",
    "etc",
    "etc/group",
    "etc/nsswitch.conf",
    "etc/passwd",
    "usr",
    "usr/local",
    "usr/local/bin",
    "usr/local/bin/gateway",
];

/// podman with the settings that work on hosts without systemd (and in
/// sandboxes); `PODMAN` overrides it, as in `docker/build-image.sh`.
fn podman_cmd() -> tokio::process::Command {
    let line = std::env::var("PODMAN")
        .unwrap_or_else(|_| "podman --runtime runc --cgroup-manager cgroupfs".into());
    let mut words = line.split_whitespace();
    let mut cmd = tokio::process::Command::new(words.next().unwrap_or("podman"));
    cmd.args(words);
    cmd.stdin(std::process::Stdio::null());
    cmd
}

/// Runs podman, returns (success, stdout, stderr).
async fn podman(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = podman_cmd()
        .args(args)
        .output()
        .await
        .with_context(|| format!("running podman {}", args.join(" ")))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs podman and returns its stdout, failing with its stderr.
async fn podman_ok(args: &[&str]) -> anyhow::Result<String> {
    let (ok, stdout, stderr) = podman(args).await?;
    ensure!(ok, "podman {} failed:\n{stderr}{stdout}", args.join(" "));
    Ok(stdout)
}

/// Removes the container or image when dropped (also when the test fails).
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let line = std::env::var("PODMAN")
            .unwrap_or_else(|_| "podman --runtime runc --cgroup-manager cgroupfs".into());
        let mut words = line.split_whitespace();
        let mut cmd = std::process::Command::new(words.next().unwrap_or("podman"));
        cmd.args(words).args(&self.0);
        let _ = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("twin-e2e-{what}-{}-{nanos}", std::process::id())
}

fn chown(path: &Path) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(UID), Some(UID))
        .with_context(|| format!("chown {UID} {}", path.display()))
}

fn chmod(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// A `/config` folder for the container: `gateway.toml` and the PKI files the
/// gateway needs, all owned by the container's user, keys with mode 0600.
fn config_dir(parent: &Path, pki: &TestPki, text: &str) -> anyhow::Result<PathBuf> {
    let dir = parent.join(unique("config"));
    let pki_dir = dir.join("pki");
    std::fs::create_dir_all(&pki_dir)?;
    std::fs::write(dir.join("gateway.toml"), text)?;
    for (from, mode) in [
        (&pki.ca_cert, 0o644),
        (&pki.gateway.cert, 0o644),
        (&pki.gateway.key, 0o600),
        (&pki.gateway_signing_key, 0o600),
    ] {
        let to = pki_dir.join(from.file_name().context("a file name")?);
        std::fs::copy(from, &to)?;
        chmod(&to, mode)?;
        chown(&to)?;
    }
    for (path, mode) in [
        (dir.join("gateway.toml"), 0o644),
        (pki_dir, 0o700),
        (dir.clone(), 0o700),
    ] {
        chmod(&path, mode)?;
        chown(&path)?;
    }
    Ok(dir)
}

/// The example configuration for the container: broker `localhost:<port>`
/// (resolved inside the container through its /etc/hosts), data in `/data`,
/// a 100 ms poll so the test sees many batches quickly.
fn container_config(broker_port: u16, plc: std::net::SocketAddr) -> anyhow::Result<String> {
    let mut text = twin_testkit::render_example_config(broker_port, plc)?;
    ensure!(
        text.contains("\nhost = \"localhost\"\n"),
        "the example configuration names the broker `localhost`"
    );
    for (from, to) in [
        ("data_dir = \"data\"", "data_dir = \"/data\""),
        ("poll_interval_ms = 1000", "poll_interval_ms = 100"),
    ] {
        ensure!(
            text.matches(from).count() == 1,
            "the example configuration must contain `{from}` exactly once"
        );
        text = text.replace(from, to);
    }
    Ok(text)
}

/// Common `podman run` options: the production hardening.
const HARDENED: [&str; 8] = [
    "--read-only",
    // No tmpfs on /tmp, /var/tmp, /run either: /data is the only writable place.
    "--read-only-tmpfs=false",
    "--cap-drop=all",
    "--security-opt=no-new-privileges",
    "--network=host",
    "--ulimit=nofile=1024:1024",
    "--ulimit=nproc=1024:1024",
    "--pull=never",
];

/// Host pid of the container's main process.
async fn host_pid(name: &str) -> anyhow::Result<u32> {
    let pid = podman_ok(&["inspect", "--format", "{{.State.Pid}}", name]).await?;
    let pid: u32 = pid.trim().parse().context("container pid")?;
    ensure!(pid > 0, "container {name} is not running");
    Ok(pid)
}

fn status_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_hardened_container_image_runs_read_only_as_non_root_and_its_telemetry_verifies(
) -> anyhow::Result<()> {
    init();
    let started = Instant::now();

    // 1. Build the image exactly as a user does.
    let tag = format!("localhost/{}:test", unique("image"));
    let script = twin_testkit::workspace_root().join("docker/build-image.sh");
    let _image = Cleanup(vec!["rmi".into(), "-f".into(), tag.clone()]);
    let out = tokio::process::Command::new(&script)
        .args(["--tag", &tag])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .with_context(|| format!("running {}", script.display()))?
        .wait_with_output()
        .await?;
    ensure!(
        out.status.success(),
        "{} failed ({}); see its output above",
        script.display(),
        out.status
    );
    eprintln!("image built in {:.1?}", started.elapsed());

    // 2. The image: size, user, health check, labels, files.
    let size: u64 = podman_ok(&["image", "inspect", "--format", "{{.Size}}", &tag])
        .await?
        .trim()
        .parse()
        .context("image size")?;
    eprintln!(
        "IMAGE SIZE: {size} bytes ({:.1} MB)",
        size as f64 / 1_000_000.0
    );
    ensure!(size <= MAX_IMAGE_BYTES, "the image is {size} bytes");
    let inspect: serde_json::Value =
        serde_json::from_str(&podman_ok(&["image", "inspect", &tag]).await?)?;
    let config = &inspect[0]["Config"];
    assert_eq!(config["User"], "65532:65532", "{config}");
    // Podman shows the Docker-format health check at the top level.
    let health = inspect[0]["Healthcheck"]["Test"].to_string();
    assert!(
        health.contains("\"CMD\"") && health.contains("\"health\""),
        "exec-form health check: {health}"
    );
    let labels = &config["Labels"];
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    for label in ["version", "revision", "source"] {
        let v = labels[format!("org.opencontainers.image.{label}")]
            .as_str()
            .unwrap_or_default();
        assert!(!v.is_empty(), "label {label} missing: {labels}");
    }

    let mount = podman_ok(&["image", "mount", &tag]).await?;
    let root = PathBuf::from(mount.trim());
    let files = list_tree(&root);
    let meta = std::fs::metadata(root.join("data"));
    let _ = podman(&["image", "unmount", &tag]).await;
    assert_eq!(files, IMAGE_TREE, "exactly these files are in the image");
    let meta = meta.context("/data in the image")?;
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!((meta.uid(), meta.gid()), (UID, UID), "/data owner");
        assert_eq!(meta.mode() & 0o777, 0o700, "/data mode");
    }
    let (ok, _, err) = podman(&[
        "run",
        "--rm",
        "--pull=never",
        "--no-healthcheck",
        "--ulimit=nofile=1024:1024",
        "--ulimit=nproc=1024:1024",
        "--entrypoint",
        "/bin/sh",
        &tag,
        "-c",
        "true",
    ])
    .await?;
    assert!(!ok, "the image has a shell");
    eprintln!("no shell, as expected: {}", err.trim());

    // 3. The plant: broker, PLC, cloud twin, and the container's mounts.
    let pki = TestPki::new(GW)?;
    let broker = Mosquitto::start(&pki, BrokerOptions::default()).await?;
    let plc = PlcSim::start("127.0.0.1:0".parse()?).await?;
    let mut twin = Twin::start(&broker, &pki, 4096).await?;
    let work = tempfile::Builder::new()
        .prefix("twin-container-")
        .tempdir()?;
    let config = config_dir(
        work.path(),
        &pki,
        &container_config(broker.port(), plc.addr())?,
    )?;
    let data = work.path().join("data");
    std::fs::create_dir(&data)?;
    chmod(&data, 0o700)?;
    chown(&data)?;

    let name = unique("gateway");
    let _container = Cleanup(vec![
        "rm".into(),
        "-f".into(),
        "-t".into(),
        "0".into(),
        name.clone(),
    ]);
    let config_mount = format!("{}:/config:ro", config.display());
    let data_mount = format!("{}:/data", data.display());
    let mut args = vec!["run", "-d", "--name", &name];
    args.extend(HARDENED);
    args.extend(["-v", &config_mount, "-v", &data_mount, &tag]);
    podman_ok(&args).await?;
    let logs = || {
        let name = name.clone();
        async move {
            podman(&["logs", &name])
                .await
                .map(|(_, o, e)| format!("{o}{e}"))
                .unwrap_or_default()
        }
    };

    // 4. Signed telemetry arrives, complete and in order.
    let outcome = twin
        .until(Duration::from_secs(20), "20 verified batches", |t| {
            t.view().batches >= 20
        })
        .await;
    if let Err(e) = outcome {
        bail!(
            "{e:#}\ncontainer log:\n{}\nbroker log:\n{}",
            logs().await,
            broker.log()
        );
    }
    let v = twin.view();
    assert_eq!(v.tags.len(), 16, "every tag of the example config");
    assert!(
        v.tags.values().all(|t| t.quality == Quality::Good),
        "{:?}",
        v.tags
    );
    assert!(
        v.gaps.is_empty() && twin.rejections().is_empty(),
        "gaps {:?}, rejected {:?}",
        v.gaps,
        twin.rejections()
    );

    // 5. The process: not root, no capabilities, no new privileges; its memory.
    let pid = host_pid(&name).await?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let uids: Vec<String> = status_field(&status, "Uid:")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(
        uids,
        vec![UID.to_string(); 4],
        "real/effective/saved/fs uid"
    );
    assert_eq!(status_field(&status, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(&status, "CapPrm:"), "0000000000000000");
    assert_eq!(status_field(&status, "NoNewPrivs:"), "1");
    let top = podman(&["top", &name, "user", "huser", "pid", "args"]).await?;
    eprintln!("podman top:\n{}", top.1.trim_end());
    eprintln!(
        "CONTAINER MEMORY: VmRSS {} (VmHWM {}) of the gateway process, example config with 16 tags, 100 ms poll",
        status_field(&status, "VmRSS:"),
        status_field(&status, "VmHWM:")
    );
    match podman(&[
        "stats",
        "--no-stream",
        "--format",
        "{{.Name}} {{.MemUsage}} {{.CPUPerc}}",
        &name,
    ])
    .await?
    {
        (true, out, _) => eprintln!("podman stats: {}", out.trim()),
        (false, _, err) => eprintln!("podman stats unavailable here: {}", err.trim()),
    }

    // 6. The health check (exec form, the gateway's own subcommand).
    let health = podman(&["healthcheck", "run", &name]).await?;
    assert!(
        health.0,
        "health check failed: {} {}\n{}",
        health.1,
        health.2,
        logs().await
    );

    // 7. SIGTERM: an orderly stop, quickly, exit code 0, offline status.
    let t = Instant::now();
    podman_ok(&["stop", "-t", "10", &name]).await?;
    let stop_time = t.elapsed();
    let exit = podman_ok(&["inspect", "--format", "{{.State.ExitCode}}", &name]).await?;
    eprintln!("STOP (SIGTERM): {stop_time:.2?}, exit code {}", exit.trim());
    assert_eq!(exit.trim(), "0", "exit code; log:\n{}", logs().await);
    assert!(
        stop_time < Duration::from_secs(5),
        "stop took {stop_time:?}"
    );
    twin.until(Duration::from_secs(5), "offline status", |t| {
        matches!(
            t.view().status.as_ref().map(|s| s.state),
            Some(twin_model::status::State::Offline)
        )
    })
    .await?;
    let before_restart = twin.view().latest_seq;

    // 8. A restart continues the sequence from /data: in order, no new chain.
    let before = twin.events.len();
    podman_ok(&["start", &name]).await?;
    let outcome = twin
        .until(Duration::from_secs(15), "batches after the restart", |t| {
            t.view().latest_seq >= before_restart + 5
        })
        .await;
    if let Err(e) = outcome {
        bail!("{e:#}\ncontainer log:\n{}", logs().await);
    }
    let continuities: Vec<_> = twin.events[before..]
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Batch { continuity, .. } => Some(continuity.clone()),
            _ => None,
        })
        .collect();
    assert!(
        !continuities.is_empty() && continuities.iter().all(|c| *c == Continuity::InOrder),
        "{continuities:?}"
    );
    let t = Instant::now();
    podman_ok(&["stop", "-t", "10", &name]).await?;
    eprintln!("second stop: {:.2?}", t.elapsed());
    let v = twin.view();
    assert!(
        v.gaps.is_empty() && twin.rejections().is_empty() && v.duplicates == 0,
        "gaps {:?}, rejected {:?}, duplicates {}",
        v.gaps,
        twin.rejections(),
        v.duplicates
    );
    eprintln!(
        "verified {} batches up to seq {} across a restart",
        v.batches, v.latest_seq
    );

    // 9. Nothing outside /data is writable: with a data_dir anywhere else,
    //    even in /tmp or in the /config mount, the gateway meets a read-only
    //    file system, and its health check says so.
    for dir in ["/var/lib/twin", "/tmp/twin", "/config/data"] {
        let text = container_config(broker.port(), plc.addr())?
            .replace("data_dir = \"/data\"", &format!("data_dir = \"{dir}\""));
        let config = config_dir(work.path(), &pki, &text)?;
        let config_mount = format!("{}:/config:ro", config.display());
        let name = unique("elsewhere");
        let _container = Cleanup(vec![
            "rm".into(),
            "-f".into(),
            "-t".into(),
            "0".into(),
            name.clone(),
        ]);
        let mut args = vec!["run", "-d", "--name", &name];
        args.extend(HARDENED);
        args.extend(["-v", &config_mount, "-v", &data_mount, &tag]);
        podman_ok(&args).await?;
        let deadline = Instant::now() + Duration::from_secs(15);
        let log = loop {
            let (_, out, err) = podman(&["logs", &name]).await?;
            let log = format!("{out}{err}");
            if log.contains("Read-only file system") || Instant::now() > deadline {
                break log;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let line = log
            .lines()
            .find(|l| l.contains("Read-only file system"))
            .with_context(|| format!("data_dir {dir}: no read-only file system error:\n{log}"))?;
        eprintln!("data_dir {dir}: {}", line.trim());
        let (healthy, out, _) = podman(&["healthcheck", "run", &name]).await?;
        assert!(!healthy, "data_dir {dir}: reported healthy: {out}");
    }

    eprintln!("container test done in {:.1?}", started.elapsed());
    Ok(())
}

/// Every path below `root`, relative and sorted.
fn list_tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if let Ok(rel) = path.strip_prefix(root) {
                out.push(rel.display().to_string());
            }
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}
