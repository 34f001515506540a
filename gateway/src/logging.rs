//! Structured logs on standard error, as text or JSON lines; `RUST_LOG`
//! overrides the default level.

/// Library messages that are noise for the gateway: the OPC UA client warns
/// that its (unused) endpoint table is empty, because the gateway chooses
/// endpoints itself, and reports every disconnect of its event loop, which
/// the driver reports itself (with the device's name).
const QUIET: &str = "opcua_client::config=error,opcua_client::session::event_loop=error";

/// Installs the global subscriber (once; later calls do nothing).
pub fn init(default_filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| format!("{default_filter},{QUIET}").into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
