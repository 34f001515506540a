//! The development PKI: a CA, a broker server certificate, client
//! certificates for the gateway and the operator tool, and Ed25519 signing
//! keys for telemetry (gateway) and commands (operator).
//!
//! For development, tests and demos only. Production plants bring their own
//! CA; nothing here is ever shipped with keys, and every private key is
//! written with mode 0600. Certificates made here carry `OU=twin-dev-pki` so
//! the gateway can recognise dev material.

use crate::keyfile;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// Organizational unit marking dev PKI material.
pub const DEV_OU: &str = "twin-dev-pki";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(transparent)]
    Key(#[from] keyfile::KeyFileError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Validity window of a certificate.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago for `days` days.
    pub fn days(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }

    /// A window that ended yesterday.
    pub fn expired() -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::days(30),
            not_after: now - Duration::days(1),
        }
    }
}

/// A certificate authority able to issue server and client certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The OU= of the CA and of everything it issues.
    unit: &'static str,
    pub cert_pem: String,
    pub key_pem: String,
}

fn dn(cn: &str, unit: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    // O= is deliberately absent: some brokers turn it into a tenant prefix.
    dn.push(DnType::OrganizationalUnitName, unit);
    dn
}

impl Ca {
    /// A development CA: it and everything it issues carry OU=[`DEV_OU`],
    /// which the gateway refuses outside `profile = "dev"`.
    pub fn new(cn: &str, validity: Validity) -> Result<Self, PkiError> {
        Ca::in_unit(cn, validity, DEV_OU)
    }

    /// A CA whose certificates carry OU=`unit` (a test or plant PKI).
    pub fn in_unit(cn: &str, validity: Validity, unit: &'static str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(cn, unit);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Ca {
            issuer: Issuer::new(params, key),
            unit,
            cert_pem: cert.pem(),
            key_pem,
        })
    }

    /// A TLS server certificate for `hosts` (DNS names or IP addresses).
    pub fn issue_server(
        &self,
        cn: &str,
        hosts: &[String],
        validity: Validity,
    ) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = hosts
            .iter()
            .map(|h| match h.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(h.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, cn, validity)
    }

    /// A TLS client certificate whose CN is the MQTT identity.
    pub fn issue_client(&self, cn: &str, validity: Validity) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, cn, validity)
    }

    fn issue(
        &self,
        mut params: CertificateParams,
        cn: &str,
        validity: Validity,
    ) -> Result<Issued, PkiError> {
        params.distinguished_name = dn(cn, self.unit);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A new Ed25519 signing key as PKCS#8 PEM.
pub fn new_signing_key_pem() -> Result<String, PkiError> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ED25519)?.serialize_pem())
}

/// What [`create_dev_pki`] makes.
#[derive(Debug, Clone)]
pub struct DevPkiOptions {
    pub out_dir: PathBuf,
    pub gateway_id: String,
    /// Names and addresses the broker certificate is valid for.
    pub broker_hosts: Vec<String>,
    /// CN of the operator's client certificate (MQTT identity of the operator tool).
    pub operator: String,
    pub valid_days: i64,
}

/// Paths of the files [`create_dev_pki`] wrote.
#[derive(Debug, Clone)]
pub struct DevPkiFiles {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub broker_cert: PathBuf,
    pub broker_key: PathBuf,
    pub gateway_cert: PathBuf,
    pub gateway_key: PathBuf,
    pub gateway_signing_key: PathBuf,
    pub gateway_signing_pub: PathBuf,
    pub operator_cert: PathBuf,
    pub operator_key: PathBuf,
    pub operator_signing_key: PathBuf,
    pub operator_signing_pub: PathBuf,
    /// The OPC UA client's folder: `own/cert.der`, `private/private.pem`,
    /// the empty trust list `trusted/` and `rejected/`.
    pub opcua_dir: PathBuf,
    pub opcua_cert: PathBuf,
    pub opcua_key: PathBuf,
}

/// The application URI of the gateway's OPC UA client certificate.
pub fn opcua_application_uri(gateway_id: &str) -> String {
    format!("urn:twin-gateway:{gateway_id}")
}

/// A self-signed OPC UA application instance certificate (RSA 2048,
/// SHA-256) for `application_uri` and `hosts`: DER certificate and PEM key.
/// It carries OU=[`DEV_OU`] (see [`opcua_application_cert_in_unit`]).
pub fn opcua_application_cert(
    application_uri: &str,
    hosts: &[String],
    validity: Validity,
) -> Result<(Vec<u8>, String), PkiError> {
    opcua_application_cert_in_unit(application_uri, hosts, validity, DEV_OU)
}

/// [`opcua_application_cert`] with OU=`unit`.
pub fn opcua_application_cert_in_unit(
    application_uri: &str,
    hosts: &[String],
    validity: Validity,
    unit: &str,
) -> Result<(Vec<u8>, String), PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut sans = vec![SanType::URI(application_uri.try_into()?)];
    for h in hosts {
        sans.push(match h.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(h.clone().try_into()?),
        });
    }
    params.subject_alt_names = sans;
    params.distinguished_name = dn("twin gateway OPC UA client", unit);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::ContentCommitment,
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::DataEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    let key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)?;
    let cert = params.self_signed(&key)?;
    Ok((cert.der().to_vec(), key.serialize_pem()))
}

impl DevPkiFiles {
    /// The file names used inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        let p = |n: &str| dir.join(n);
        DevPkiFiles {
            dir: dir.into(),
            ca_cert: p("ca.crt.pem"),
            broker_cert: p("broker.crt.pem"),
            broker_key: p("broker.key.pem"),
            gateway_cert: p("gateway.crt.pem"),
            gateway_key: p("gateway.key.pem"),
            gateway_signing_key: p("gateway-signing.key.pem"),
            gateway_signing_pub: p("gateway-signing.pub.pem"),
            operator_cert: p("operator.crt.pem"),
            operator_key: p("operator.key.pem"),
            operator_signing_key: p("operator-signing.key.pem"),
            operator_signing_pub: p("operator-signing.pub.pem"),
            opcua_dir: p("opcua"),
            opcua_cert: p("opcua/own/cert.der"),
            opcua_key: p("opcua/private/private.pem"),
        }
    }
}

/// The OPC UA client's folders under `files.opcua_dir` (`own/`,
/// `private/`, `trusted/` empty, `rejected/`) and its application instance
/// certificate (OU=`unit`) and key (mode 0600) for gateway `gateway_id`.
/// Returns the application URI.
pub fn create_opcua_client(
    files: &DevPkiFiles,
    gateway_id: &str,
    validity: Validity,
    unit: &str,
) -> Result<String, PkiError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PkiError::Io { path, source }
    };
    for sub in ["own", "private", "trusted", "rejected"] {
        let d = files.opcua_dir.join(sub);
        std::fs::create_dir_all(&d).map_err(io(&d))?;
    }
    let uri = opcua_application_uri(gateway_id);
    let (der, key) =
        opcua_application_cert_in_unit(&uri, &["localhost".to_string()], validity, unit)?;
    std::fs::write(&files.opcua_cert, der).map_err(io(&files.opcua_cert))?;
    keyfile::write_private(&files.opcua_key, &key)?;
    Ok(uri)
}

/// Creates the whole dev PKI in `opts.out_dir` (created with mode 0700).
/// The CA private key is not kept: nothing else can be issued from it later.
pub fn create_dev_pki(opts: &DevPkiOptions) -> Result<DevPkiFiles, PkiError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PkiError::Io { path, source }
    };
    std::fs::create_dir_all(&opts.out_dir).map_err(io(&opts.out_dir))?;
    std::fs::set_permissions(&opts.out_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(&opts.out_dir))?;
    let files = DevPkiFiles::in_dir(&opts.out_dir);
    let validity = Validity::days(opts.valid_days);
    let ca = Ca::new("twin dev CA", validity)?;
    keyfile::write_public(&files.ca_cert, &ca.cert_pem)?;

    let broker = ca.issue_server("twin-broker", &opts.broker_hosts, validity)?;
    keyfile::write_public(&files.broker_cert, &broker.cert_pem)?;
    keyfile::write_private(&files.broker_key, &broker.key_pem)?;

    let gw = ca.issue_client(&opts.gateway_id, validity)?;
    keyfile::write_public(&files.gateway_cert, &gw.cert_pem)?;
    keyfile::write_private(&files.gateway_key, &gw.key_pem)?;

    create_opcua_client(&files, &opts.gateway_id, validity, DEV_OU)?;

    let op = ca.issue_client(&opts.operator, validity)?;
    keyfile::write_public(&files.operator_cert, &op.cert_pem)?;
    keyfile::write_private(&files.operator_key, &op.key_pem)?;

    for (key_path, pub_path) in [
        (&files.gateway_signing_key, &files.gateway_signing_pub),
        (&files.operator_signing_key, &files.operator_signing_pub),
    ] {
        let pem = new_signing_key_pem()?;
        let key =
            twin_model::SigningKey::from_pkcs8_pem(&pem).expect("rcgen makes valid Ed25519 PKCS#8");
        keyfile::write_private(key_path, &pem)?;
        keyfile::write_public(pub_path, &key.public_key_pem())?;
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_pki_writes_keys_0600_and_signing_keys_load() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let files = create_dev_pki(&DevPkiOptions {
            out_dir: dir.path().join("pki"),
            gateway_id: "gw-1".into(),
            broker_hosts: vec!["localhost".into(), "127.0.0.1".into()],
            operator: "operator-1".into(),
            valid_days: 30,
        })
        .unwrap();
        for k in [
            &files.broker_key,
            &files.gateway_key,
            &files.operator_key,
            &files.gateway_signing_key,
            &files.operator_signing_key,
        ] {
            assert_eq!(
                std::fs::metadata(k).unwrap().permissions().mode() & 0o777,
                0o600,
                "{}",
                k.display()
            );
        }
        let pem = keyfile::read_private(&files.gateway_signing_key).unwrap();
        let key = twin_model::SigningKey::from_pkcs8_pem(&pem).unwrap();
        let public = std::fs::read_to_string(&files.gateway_signing_pub).unwrap();
        assert_eq!(
            twin_model::jws::public_key_from_pem(&public),
            Some(key.public_key())
        );
    }
}
