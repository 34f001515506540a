//! Every TLS client setting of the gateway, in one place.
//!
//! - The broker's certificate is always verified against the configured CA
//!   file and host name (or the configured `server_name`); there is no
//!   option to skip verification.
//! - The gateway authenticates with its client certificate.
//! - TLS 1.3 only, unless `min_version = "1.2"` is configured.
//! - The crypto provider is aws-lc-rs, chosen explicitly (not the process default).

use crate::config::{TlsConfig, TlsVersion};
use crate::keyfile;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{path}: cannot read certificates: {reason}")]
    Certs { path: PathBuf, reason: String },
    #[error("{path}: contains no certificate")]
    NoCerts { path: PathBuf },
    #[error("{path}: no usable private key: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error(transparent)]
    KeyFile(#[from] keyfile::KeyFileError),
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("server name {0:?} is not a valid DNS name or IP address")]
    ServerName(String),
}

/// The process-wide crypto provider (aws-lc-rs).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Installs aws-lc-rs as the process default provider, for libraries that
/// ask for the default. Call first thing in `main`; harmless if repeated.
pub fn install_default_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Reads every certificate of a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsSetupError::Certs {
            path: path.into(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCerts { path: path.into() });
    }
    Ok(certs)
}

/// Reads a private key after checking its file permissions.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    let pem = keyfile::read_private(path)?;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsSetupError::Key {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// A root store holding exactly the certificates of `ca_file`.
pub fn root_store(ca_file: &Path) -> Result<RootCertStore, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca_file)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// The rustls client configuration for the MQTT connection.
#[allow(
    clippy::disallowed_methods,
    reason = "the one place where the gateway's TLS client settings are made"
)]
pub fn client_config(tls: &TlsConfig) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let roots = Arc::new(root_store(&tls.ca_file)?);
    let chain = read_certs(&tls.cert_file)?;
    let key = read_key(&tls.key_file)?;
    let versions: &[&'static rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let provider = provider();
    let builder =
        ClientConfig::builder_with_provider(provider.clone()).with_protocol_versions(versions)?;
    let builder = match &tls.server_name {
        None => builder.with_root_certificates(roots),
        Some(name) => {
            let name = ServerName::try_from(name.clone())
                .map_err(|_| TlsSetupError::ServerName(name.clone()))?;
            let inner = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(FixedNameVerifier { inner, name }))
        }
    };
    Ok(Arc::new(builder.with_client_auth_cert(chain, key)?))
}

/// Verifies the server certificate with the standard WebPKI verifier, but
/// against a configured name instead of the host connected to (for brokers
/// reached by IP address or through a tunnel). Nothing is skipped.
#[derive(Debug)]
struct FixedNameVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for FixedNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Explains a TLS or connection failure in words an engineer can act on.
pub fn explain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut chain = vec![err.to_string()];
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !chain.iter().any(|c| c.contains(&s)) {
            chain.push(s);
        }
        cur = e.source();
    }
    let text = chain.join(": ");
    let hint = if text.contains("UnknownIssuer") {
        Some("the broker's certificate is not signed by the CA in mqtt.tls.ca_file")
    } else if text.contains("expired") || text.contains("Expired") {
        Some("the broker's certificate has expired (or the gateway's clock is wrong)")
    } else if text.contains("not valid for name") || text.contains("NotValidForName") {
        Some("the broker's certificate is not issued for this host name; set mqtt.host (or mqtt.tls.server_name) to a name in the certificate")
    } else if text.contains("CertificateRequired")
        || text.contains("certificate required")
        || text.contains("BadCertificate")
        || text.contains("bad certificate")
    {
        Some("the broker refused the gateway's client certificate")
    } else if text.contains("Connection refused") {
        Some("nothing is listening at mqtt.host:mqtt.port")
    } else {
        None
    };
    match hint {
        Some(h) => format!("{text} ({h})"),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, Validity};
    use rustls::server::WebPkiClientVerifier;
    use rustls::{ClientConnection, ServerConfig, ServerConnection};

    struct Fixture {
        _dir: tempfile::TempDir,
        tls: TlsConfig,
        server_chain: Vec<CertificateDer<'static>>,
        server_key_pem: String,
        ca_file: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("test CA", Validity::days(1)).unwrap();
        let server = ca
            .issue_server("broker", &["localhost".into()], Validity::days(1))
            .unwrap();
        let client = ca.issue_client("gw-1", Validity::days(1)).unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("ca.pem"), &ca.cert_pem).unwrap();
        std::fs::write(p("client.pem"), &client.cert_pem).unwrap();
        keyfile::write_private(&p("client.key"), &client.key_pem).unwrap();
        let server_chain = CertificateDer::pem_slice_iter(server.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        Fixture {
            tls: TlsConfig {
                ca_file: p("ca.pem"),
                cert_file: p("client.pem"),
                key_file: p("client.key"),
                min_version: TlsVersion::Tls13,
                server_name: None,
            },
            server_chain,
            server_key_pem: server.key_pem,
            ca_file: p("ca.pem"),
            _dir: dir,
        }
    }

    /// A broker-like server that requires a client certificate from the CA.
    fn server(
        f: &Fixture,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> ServerConnection {
        let roots = Arc::new(root_store(&f.ca_file).unwrap());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(f.server_key_pem.as_bytes()).unwrap();
        let cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(f.server_chain.clone(), key)
            .unwrap();
        ServerConnection::new(Arc::new(cfg)).unwrap()
    }

    /// Runs a handshake in memory; the negotiated version, or the error.
    fn handshake(
        client_cfg: Arc<ClientConfig>,
        name: &str,
        mut server: ServerConnection,
    ) -> Result<rustls::ProtocolVersion, rustls::Error> {
        let mut client =
            ClientConnection::new(client_cfg, ServerName::try_from(name.to_owned()).unwrap())
                .unwrap();
        for _ in 0..20 {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).unwrap();
            server.read_tls(&mut buf.as_slice()).unwrap();
            server.process_new_packets()?;
            let mut buf = Vec::new();
            server.write_tls(&mut buf).unwrap();
            client.read_tls(&mut buf.as_slice()).unwrap();
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(client.protocol_version().unwrap());
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn tls_13_is_the_default_and_12_needs_the_setting() {
        let f = fixture();
        let both = [&rustls::version::TLS13, &rustls::version::TLS12];
        let v = handshake(
            client_config(&f.tls).unwrap(),
            "localhost",
            server(&f, &both),
        )
        .unwrap();
        assert_eq!(v, rustls::ProtocolVersion::TLSv1_3);
        // A server that only speaks TLS 1.2 is refused by default...
        let e = handshake(
            client_config(&f.tls).unwrap(),
            "localhost",
            server(&f, &[&rustls::version::TLS12]),
        );
        assert!(e.is_err());
        // ...and accepted when 1.2 is configured.
        let tls12 = TlsConfig {
            min_version: TlsVersion::Tls12,
            ..f.tls.clone()
        };
        let v = handshake(
            client_config(&tls12).unwrap(),
            "localhost",
            server(&f, &[&rustls::version::TLS12]),
        )
        .unwrap();
        assert_eq!(v, rustls::ProtocolVersion::TLSv1_2);
    }

    #[test]
    fn the_broker_name_is_always_verified_and_server_name_overrides_the_host() {
        let f = fixture();
        let both = [&rustls::version::TLS13, &rustls::version::TLS12];
        let e = handshake(
            client_config(&f.tls).unwrap(),
            "127.0.0.1",
            server(&f, &both),
        )
        .unwrap_err();
        assert!(
            explain(&e).contains("not issued for this host name"),
            "{}",
            explain(&e)
        );
        let named = TlsConfig {
            server_name: Some("localhost".into()),
            ..f.tls.clone()
        };
        assert!(handshake(
            client_config(&named).unwrap(),
            "127.0.0.1",
            server(&f, &both)
        )
        .is_ok());
        let wrong = TlsConfig {
            server_name: Some("other.example".into()),
            ..f.tls.clone()
        };
        assert!(handshake(
            client_config(&wrong).unwrap(),
            "localhost",
            server(&f, &both)
        )
        .is_err());
    }
}
