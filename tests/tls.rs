//! TLS (PROTOCOL.md Transport): ALPN `tollgate/1` or none, and mutual TLS,
//! where a verified client certificate must name HELLO's client id in its
//! subject CN or a DNS SAN, and `require_client_cert` refuses clients without.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::json;
use std::sync::Arc;
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;
use tollgate::wire::{self, FrameCodec, Kind};

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "tollgate test clients CA");
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

fn client_cert(ca: &Ca, name: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

async fn hello_with(
    d: &Daemon,
    cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    id: &str,
) -> Result<Kind, String> {
    let verifier = Arc::new(tollgate::tls::PinVerifier::new(&d.pin));
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(verifier);
    let cfg = match cert {
        Some((c, k)) => b.with_client_auth_cert(vec![c], k).unwrap(),
        None => b.with_no_client_auth(),
    };
    let tcp = TcpStream::connect(&d.addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut c = Framed::new(tls, FrameCodec::new(16 << 20));
    c.send(frame(
        Kind::Hello,
        json!({"protocol": 1, "client_id": id, "schedule": "s"}),
    ))
    .await
    .map_err(|e| e.to_string())?;
    match c.next().await {
        Some(Ok(f)) if f.kind == Kind::Reject => {
            Err(wire::parse::<wire::Reject>(&f.payload).unwrap().code)
        }
        Some(Ok(f)) => Ok(f.kind),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("closed".into()),
    }
}

fn start(required: bool) -> (TempDir, Daemon, Ca) {
    let dir = TempDir::new().unwrap();
    let ca = ca();
    std::fs::write(dir.path().join("clients-ca.pem"), &ca.pem).unwrap();
    write_config(
        dir.path(),
        &format!(
            "[server.tls]\nclient_ca = \"clients-ca.pem\"\nrequire_client_cert = {required}\n"
        ),
        &format!(
            "[default_customer]\nauto_add_clients = true\nbackup_location = \"{}/b\"\n",
            dir.path().display()
        ),
    );
    let d = Daemon::start(dir.path());
    (dir, d, ca)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_certificate_must_name_the_client() {
    let (_t, d, ca) = start(false);
    assert_eq!(
        hello_with(&d, Some(client_cert(&ca, "CLIENT-1")), "CLIENT-1").await,
        Ok(Kind::Welcome)
    );
    assert_eq!(
        hello_with(&d, Some(client_cert(&ca, "OTHER")), "CLIENT-2").await,
        Err("auth_failed".to_string())
    );
    assert_eq!(
        hello_with(&d, None, "NO-CERT").await,
        Ok(Kind::Welcome),
        "certificates are optional here"
    );
    // A certificate from another CA fails verification in the handshake.
    let stranger = ca_other();
    assert!(
        hello_with(&d, Some(client_cert(&stranger, "CLIENT-3")), "CLIENT-3")
            .await
            .is_err()
    );
}

fn ca_other() -> Ca {
    ca()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_required_certificate_is_required() {
    let (_t, d, ca) = start(true);
    assert!(
        hello_with(&d, None, "NO-CERT").await.is_err(),
        "no certificate, no session"
    );
    assert_eq!(
        hello_with(&d, Some(client_cert(&ca, "CLIENT-1")), "CLIENT-1").await,
        Ok(Kind::Welcome)
    );
}

async fn handshake_with_alpn(d: &Daemon, alpn: Vec<Vec<u8>>) -> Result<Option<Vec<u8>>, String> {
    let verifier = Arc::new(tollgate::tls::PinVerifier::new(&d.pin));
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(verifier)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn;
    let tcp = TcpStream::connect(&d.addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.alpn_protocol().map(|p| p.to_vec()))
}

#[tokio::test(flavor = "multi_thread")]
async fn alpn_tollgate_1_or_none() {
    let dir = TempDir::new().unwrap();
    write_config(
        dir.path(),
        "",
        &format!(
            "[default_customer]\nbackup_location = \"{}/b\"\n",
            dir.path().display()
        ),
    );
    let d = Daemon::start(dir.path());
    assert_eq!(
        handshake_with_alpn(&d, vec![b"tollgate/1".to_vec()]).await,
        Ok(Some(b"tollgate/1".to_vec()))
    );
    assert_eq!(
        handshake_with_alpn(&d, vec![b"h2".to_vec(), b"tollgate/1".to_vec()]).await,
        Ok(Some(b"tollgate/1".to_vec()))
    );
    assert_eq!(
        handshake_with_alpn(&d, vec![]).await,
        Ok(None),
        "no ALPN is accepted"
    );
    assert!(
        handshake_with_alpn(&d, vec![b"h2".to_vec()]).await.is_err(),
        "ALPN without tollgate/1 fails"
    );
}
