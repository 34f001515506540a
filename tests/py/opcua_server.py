#!/usr/bin/env python3
"""Independent OPC UA peer for the interoperability tests.

An asyncua server with its own self-signed application instance certificate,
offering only Basic256Sha256 / SignAndEncrypt and user name login, so a
passing test proves the gateway's OPC UA client against another stack.

Usage: opcua_server.py --port PORT --dir DIR --user USER --password PASSWORD

Listens on opc.tcp://127.0.0.1:PORT/twin/. Writes its key (PEM) and
certificate (DER) into DIR as server_key.pem and server_cert.der (the test
puts the latter into the gateway's trust list), then prints
`VERSION <asyncua version>` and `READY <endpoint_url>` on stdout once it
accepts connections. Exits cleanly on SIGTERM or SIGINT.

BuildInfo (Server.ServerStatus.BuildInfo): product URI
urn:twin-gateway:asyncua-peer:product, manufacturer "asyncua peer works",
product name "asyncua peer", software version = the asyncua version, build
number "peer-1", build date 2026-01-02T03:04:05Z.

Nodes, in namespace urn:twin-gateway:asyncua-peer with string ids:
  Peer.Double    Double   21.5, +0.5 every 200 ms, wrapping 31.0 -> 21.5
  Peer.Int32     Int32    -42
  Peer.UInt16    UInt16   7
  Peer.Bool      Boolean  true
  Peer.String    String   "peer"
  Peer.Setpoint  Double   1.0, the only writable node
"""

import argparse
import asyncio
import datetime
import ipaddress
import logging
import signal
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import asyncua
from asyncua import Server, ua
from asyncua.crypto.permission_rules import PermissionRuleset
from asyncua.server.users import User, UserRole

APP_URI = "urn:twin-gateway:asyncua-peer"
NAMESPACE = APP_URI
CERT_FILE = "server_cert.der"
KEY_FILE = "server_key.pem"

PRODUCT_URI = "urn:twin-gateway:asyncua-peer:product"
MANUFACTURER = "asyncua peer works"
PRODUCT_NAME = "asyncua peer"
SOFTWARE_VERSION = asyncua.__version__
BUILD_NUMBER = "peer-1"
BUILD_DATE = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)

DOUBLE_START = 21.5
DOUBLE_STEP = 0.5
DOUBLE_STEPS = 20  # 21.5, 22.0, ..., 31.0, then 21.5 again
DOUBLE_PERIOD_S = 0.2

log = logging.getLogger("opcua_server")


def make_certificate(directory: Path):
    """A fresh RSA 2048 key and a self-signed application instance certificate.

    Built with `cryptography` rather than asyncua's cert_gen helper, which marks
    every self-signed certificate as a CA (basicConstraints cA=true,
    keyCertSign); this one is a plain end-entity certificate as OPC 10000-6
    6.2.2 describes: SAN with the application URI, localhost and 127.0.0.1,
    key usage for signing and encryption, server and client auth.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "twin-gateway asyncua peer"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "twin-gateway tests"),
    ])
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        # Back-dated a little so a client's clock a bit behind still accepts it.
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([
                x509.UniformResourceIdentifier(APP_URI),
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
            ]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / KEY_FILE
    cert_path = directory / CERT_FILE
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    return key_path, cert_path


class PasswordUserManager:
    """Accepts exactly one user name and password.

    asyncua calls get_user(iserver, username, password, certificate) on
    ActivateSession; returning None makes it answer BadUserAccessDenied. For a
    user name token, `certificate` is the client certificate of the secure
    channel. asyncua accepts an unadvertised None secure channel (it only
    lists the endpoints it was given, but always lets SecurityPolicy#None
    open), so refusing a login without a channel certificate is what really
    keeps sessions on the encrypted endpoint. Anonymous tokens never get here:
    they are refused with BadIdentityTokenRejected because only "Username" is
    in the server's identity token policies.
    """

    def __init__(self, user: str, password: str):
        self._user = user
        self._password = password

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if certificate is None:
            log.warning("login refused: no secure channel certificate (SecurityPolicy None)")
            return None
        if username != self._user or password != self._password:
            log.warning("login refused for user %r", username)
            return None
        return User(role=UserRole.User, name=username)


class LoggedInUserRuleset(PermissionRuleset):
    """Lets a logged-in user use every service except address space changes.

    Without a ruleset asyncua installs SimpleRoleRuleset on every secure
    channel, which lets only UserRole.Admin call Write (and refuses BrowseNext
    and ModifySubscription to everyone). Admins however bypass the nodes'
    AccessLevel, so the user stays a plain User and this ruleset lets Write
    through: asyncua then refuses writes to nodes without CurrentWrite in their
    (User)AccessLevel with BadUserAccessDenied, per node.
    """

    REFUSED = {
        ua.NodeId(i)
        for i in (
            ua.ObjectIds.AddNodesRequest_Encoding_DefaultBinary,
            ua.ObjectIds.DeleteNodesRequest_Encoding_DefaultBinary,
            ua.ObjectIds.AddReferencesRequest_Encoding_DefaultBinary,
            ua.ObjectIds.DeleteReferencesRequest_Encoding_DefaultBinary,
            ua.ObjectIds.RegisterServerRequest_Encoding_DefaultBinary,
            ua.ObjectIds.RegisterServer2Request_Encoding_DefaultBinary,
        )
    }

    def check_validity(self, user, action_type_id, body):
        return user is not None and user.role == UserRole.User and action_type_id not in self.REFUSED


async def accept_any_client_certificate(certificate, app_description):
    """Certificate validator that trusts every client certificate.

    Acceptable for this test peer only: the tests exercise the gateway's
    trust decisions, not the peer's. asyncua's default is to validate nothing
    at all; setting this explicitly documents the choice and logs the client.
    """
    log.info(
        "client certificate accepted without validation: %s (%s)",
        certificate.subject.rfc4514_string(),
        app_description.ApplicationUri,
    )


async def tick(node):
    step = 0
    while True:
        await asyncio.sleep(DOUBLE_PERIOD_S)
        step = (step + 1) % DOUBLE_STEPS
        await node.write_value(ua.Variant(DOUBLE_START + DOUBLE_STEP * step, ua.VariantType.Double))


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True, help="where to write the key and certificate")
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)

    key_path, cert_path = make_certificate(args.dir)
    endpoint = f"opc.tcp://127.0.0.1:{args.port}/twin/"

    server = Server(user_manager=PasswordUserManager(args.user, args.password))
    # Also the ProductUri of the endpoints' application description.
    server.product_uri = PRODUCT_URI
    server.manufacturer_name = MANUFACTURER
    await server.init()
    # init() wrote asyncua's default BuildInfo ("1.0pre", build date now).
    await server.set_build_info(
        PRODUCT_URI, MANUFACTURER, PRODUCT_NAME, SOFTWARE_VERSION, BUILD_NUMBER, BUILD_DATE
    )
    server.set_endpoint(endpoint)
    server.set_server_name("twin-gateway asyncua peer")
    server.application_type = ua.ApplicationType.Server
    # Also makes APP_URI namespace index 1 (asyncua overwrites entry 1 of the
    # namespace array with the application URI).
    await server.set_application_uri(APP_URI)
    # Only Basic256Sha256 / SignAndEncrypt: no None endpoint is advertised.
    server.set_security_policy(
        [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt],
        permission_ruleset=LoggedInUserRuleset(),
    )
    # Only user name tokens: no anonymous, no X.509 user tokens.
    server.set_security_IDs(["Username"])
    await server.load_certificate(str(cert_path))  # .der suffix: read as DER
    await server.load_private_key(str(key_path))  # .pem suffix: read as PEM
    server.set_certificate_validator(accept_any_client_certificate)

    idx = await server.register_namespace(NAMESPACE)
    peer = await server.nodes.objects.add_object(ua.NodeId("Peer", idx), ua.QualifiedName("Peer", idx))

    async def variable(name, value, vtype):
        return await peer.add_variable(
            ua.NodeId(f"Peer.{name}", idx), ua.QualifiedName(name, idx), ua.Variant(value, vtype)
        )

    double = await variable("Double", DOUBLE_START, ua.VariantType.Double)
    await variable("Int32", -42, ua.VariantType.Int32)
    await variable("UInt16", 7, ua.VariantType.UInt16)
    await variable("Bool", True, ua.VariantType.Boolean)
    await variable("String", "peer", ua.VariantType.String)
    setpoint = await variable("Setpoint", 1.0, ua.VariantType.Double)
    await setpoint.set_writable()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    await server.start()
    if not server.iserver.endpoints:
        raise RuntimeError("asyncua created no endpoint (certificate or key not loaded?)")
    ticker = asyncio.create_task(tick(double))
    try:
        print(f"VERSION {SOFTWARE_VERSION}", flush=True)
        print(f"READY {endpoint}", flush=True)
        await stop.wait()
    finally:
        ticker.cancel()
        try:
            await ticker
        except asyncio.CancelledError:
            pass
        await server.stop()


if __name__ == "__main__":
    asyncio.run(main())
