//! A complete test PKI, generated at test time in a temporary directory.
//!
//! The main set uses the file names of the dev PKI (`gateway::pki::DevPkiFiles`),
//! so configurations written for `pki/` work unchanged: CA, broker server
//! certificate (`localhost`, `127.0.0.1`), gateway client certificate
//! (CN = gateway id), operator client certificate (CN [`OPERATOR`]) and the
//! Ed25519 signing keys of gateway and operator.
//!
//! For refusal tests it adds broker certificates signed by another CA, expired,
//! and valid only for `wrong.example`, plus a client certificate from another
//! CA. The main CA is kept in memory so a test can issue more.
//! Private keys are written with mode 0600; the directory lives as long as
//! the [`TestPki`].

use anyhow::Context as _;
use gateway::keyfile;
use gateway::pki::{new_signing_key_pem, Ca, DevPkiFiles, Validity};
use std::path::{Path, PathBuf};

/// The OU= of every test certificate: a plant PKI made for the test, not
/// the development PKI (which the gateway refuses outside the dev profile).
pub const TEST_OU: &str = "twin-test-plant";

/// MQTT identity (client certificate CN) of the operator tool.
pub const OPERATOR: &str = "twin-operator";
/// Host names and addresses of the broker certificate.
pub const BROKER_HOSTS: [&str; 2] = ["localhost", "127.0.0.1"];
/// The only host of the `broker-wrong-host` certificate.
pub const WRONG_HOST: &str = "wrong.example";

/// A certificate file and its private key file.
#[derive(Debug, Clone)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Test PKI files; see the module documentation.
pub struct TestPki {
    dir: tempfile::TempDir,
    ca: Ca,
    /// The directory holding the main set (`<tmp>/pki`).
    pub pki_dir: PathBuf,
    pub gateway_id: String,
    pub operator: String,
    pub ca_cert: PathBuf,
    pub broker: CertPair,
    pub gateway: CertPair,
    pub operator_client: CertPair,
    pub gateway_signing_key: PathBuf,
    pub gateway_signing_pub: PathBuf,
    pub operator_signing_key: PathBuf,
    pub operator_signing_pub: PathBuf,
    /// The CA certificate of the other CA (signs `broker_wrong_ca` and `rogue_client`).
    pub other_ca_cert: PathBuf,
    /// Broker certificate for `localhost`/`127.0.0.1` signed by the other CA.
    pub broker_wrong_ca: CertPair,
    /// Broker certificate from the main CA that expired yesterday.
    pub broker_expired: CertPair,
    /// Broker certificate from the main CA valid only for [`WRONG_HOST`].
    pub broker_wrong_host: CertPair,
    /// Client certificate with CN = gateway id, signed by the other CA.
    pub rogue_client: CertPair,
}

impl TestPki {
    /// Generates everything for gateway `gateway_id` (valid 30 days).
    pub fn new(gateway_id: &str) -> anyhow::Result<TestPki> {
        let dir = tempfile::Builder::new()
            .prefix("twin-test-pki-")
            .tempdir()
            .context("creating the test PKI directory")?;
        let pki_dir = dir.path().join("pki");
        std::fs::create_dir_all(&pki_dir)
            .with_context(|| format!("creating {}", pki_dir.display()))?;
        let files = DevPkiFiles::in_dir(&pki_dir);
        let validity = Validity::days(30);
        let hosts: Vec<String> = BROKER_HOSTS.iter().map(|h| h.to_string()).collect();

        let ca = Ca::in_unit("twin test CA", validity, TEST_OU)?;
        keyfile::write_public(&files.ca_cert, &ca.cert_pem)?;
        let write = |name: &str, issued: gateway::pki::Issued| -> anyhow::Result<CertPair> {
            let pair = CertPair {
                cert: pki_dir.join(format!("{name}.crt.pem")),
                key: pki_dir.join(format!("{name}.key.pem")),
            };
            keyfile::write_public(&pair.cert, &issued.cert_pem)?;
            keyfile::write_private(&pair.key, &issued.key_pem)?;
            Ok(pair)
        };
        // Names match DevPkiFiles::in_dir: broker, gateway, operator.
        let broker = write("broker", ca.issue_server("twin-broker", &hosts, validity)?)?;
        let gateway = write("gateway", ca.issue_client(gateway_id, validity)?)?;
        let operator_client = write("operator", ca.issue_client(OPERATOR, validity)?)?;
        debug_assert_eq!(broker.cert, files.broker_cert);
        debug_assert_eq!(gateway.key, files.gateway_key);
        debug_assert_eq!(operator_client.cert, files.operator_cert);

        for (key_path, pub_path) in [
            (&files.gateway_signing_key, &files.gateway_signing_pub),
            (&files.operator_signing_key, &files.operator_signing_pub),
        ] {
            let pem = new_signing_key_pem()?;
            let key = twin_model::SigningKey::from_pkcs8_pem(&pem)
                .context("the generated Ed25519 key does not load")?;
            keyfile::write_private(key_path, &pem)?;
            keyfile::write_public(pub_path, &key.public_key_pem())?;
        }

        let broker_expired = write(
            "broker-expired",
            ca.issue_server("twin-broker", &hosts, Validity::expired())?,
        )?;
        let broker_wrong_host = write(
            "broker-wrong-host",
            ca.issue_server("twin-broker", &[WRONG_HOST.to_string()], validity)?,
        )?;
        let other = Ca::in_unit("rogue CA", validity, TEST_OU)?;
        let other_ca_cert = pki_dir.join("other-ca.crt.pem");
        keyfile::write_public(&other_ca_cert, &other.cert_pem)?;
        let broker_wrong_ca = write(
            "broker-wrong-ca",
            other.issue_server("twin-broker", &hosts, validity)?,
        )?;
        let rogue_client = write("rogue-client", other.issue_client(gateway_id, validity)?)?;

        Ok(TestPki {
            dir,
            ca,
            pki_dir,
            gateway_id: gateway_id.to_string(),
            operator: OPERATOR.to_string(),
            ca_cert: files.ca_cert,
            broker,
            gateway,
            operator_client,
            gateway_signing_key: files.gateway_signing_key,
            gateway_signing_pub: files.gateway_signing_pub,
            operator_signing_key: files.operator_signing_key,
            operator_signing_pub: files.operator_signing_pub,
            other_ca_cert,
            broker_wrong_ca,
            broker_expired,
            broker_wrong_host,
            rogue_client,
        })
    }

    /// The temporary directory (parent of [`TestPki::pki_dir`]); removed on drop.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The main set under the dev PKI names.
    pub fn files(&self) -> DevPkiFiles {
        DevPkiFiles::in_dir(&self.pki_dir)
    }

    /// Issues one more client certificate from the main CA, written as
    /// `<name>.crt.pem` / `<name>.key.pem` in the PKI directory.
    pub fn issue_client(
        &self,
        name: &str,
        cn: &str,
        validity: Validity,
    ) -> anyhow::Result<CertPair> {
        let issued = self.ca.issue_client(cn, validity)?;
        let pair = CertPair {
            cert: self.pki_dir.join(format!("{name}.crt.pem")),
            key: self.pki_dir.join(format!("{name}.key.pem")),
        };
        keyfile::write_public(&pair.cert, &issued.cert_pem)?;
        keyfile::write_private(&pair.key, &issued.key_pem)?;
        Ok(pair)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn test_pki_uses_dev_pki_names_and_keeps_private_keys_0600() {
        let pki = TestPki::new("gw-test").unwrap();
        let files = pki.files();
        assert!(pki.ca_cert.ends_with("pki/ca.crt.pem"));
        assert_eq!(pki.gateway.cert, files.gateway_cert);
        assert_eq!(pki.operator_client.key, files.operator_key);
        for key in [
            &pki.broker.key,
            &pki.gateway.key,
            &pki.operator_client.key,
            &pki.gateway_signing_key,
            &pki.operator_signing_key,
            &pki.broker_wrong_ca.key,
            &pki.broker_expired.key,
            &pki.broker_wrong_host.key,
            &pki.rogue_client.key,
        ] {
            let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let pem = keyfile::read_private(&pki.gateway_signing_key).unwrap();
        let key = twin_model::SigningKey::from_pkcs8_pem(&pem).unwrap();
        let public = std::fs::read_to_string(&pki.gateway_signing_pub).unwrap();
        assert_eq!(
            twin_model::jws::public_key_from_pem(&public),
            Some(key.public_key())
        );
        let extra = pki
            .issue_client("extra", "someone", Validity::days(1))
            .unwrap();
        assert!(extra.cert.exists() && extra.key.exists());
    }
}
