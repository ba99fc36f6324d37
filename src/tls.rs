//! TLS for the listener (PROTOCOL.md Transport): the configured certificate
//! and key, or a self-signed pair made once in `state_dir` and reused; ALPN
//! `tollgate/1`; optional client certificates checked against a CA.

use crate::config::Config;
use crate::wire::ALPN;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File names of the self-signed pair under `state_dir/tls/`.
pub const SELF_SIGNED_CERT: &str = "tls/self-signed.crt";
/// See [`SELF_SIGNED_CERT`].
pub const SELF_SIGNED_KEY: &str = "tls/self-signed.key";

/// A TLS setup that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no usable PEM.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// rustls refused the configuration.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// Making the self-signed pair failed.
    #[error("making a self-signed certificate: {0}")]
    Generate(String),
}

/// The server's TLS configuration and its certificate's fingerprint.
pub struct ServerTls {
    /// For tokio-rustls.
    pub config: Arc<ServerConfig>,
    /// `sha256:<hex>` of the end-entity certificate, for `--pin`.
    pub fingerprint: String,
    /// Whether the pair was generated here.
    pub self_signed: bool,
}

/// aws-lc-rs, with AES-128-GCM-SHA256 listed first (rustls's default
/// lists AES-256-GCM-SHA384 first). The servers take the client's order,
/// as Mozilla's TLS guidelines advise (a client without AES hardware
/// lists ChaCha20 first), so this is what the reference client offers:
/// its key schedule's SHA-256 runs on the CPU's SHA extensions where
/// SHA-384 does not, and AES-128 has fewer rounds. With the tickets
/// below, 1,000 registrations at once went from about 1,550/s to 1,800/s
/// (docs/benchmarks.md). Every suite is still offered and accepted.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        _ => 1,
    });
    Arc::new(p)
}

/// `sha256:<hex>` of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    let d = Sha256::digest(der);
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Pem {
            path: path.into(),
            what: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.into(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.into(),
            what: "no certificate found".into(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.into(),
        what: e.to_string(),
    })
}

/// Makes (once) or reuses the self-signed pair in `state_dir`.
fn self_signed(state_dir: &Path) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert = state_dir.join(SELF_SIGNED_CERT);
    let key = state_dir.join(SELF_SIGNED_KEY);
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io { path, source }
    };
    let dir = cert.parent().expect("the pair lives in a directory");
    crate::storage::create_private_dirs(dir).map_err(io(dir))?;
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let pair =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    write_private(&key, pair.signing_key.serialize_pem().as_bytes()).map_err(io(&key))?;
    write_private(&cert, pair.cert.pem().as_bytes()).map_err(io(&cert))?;
    Ok((cert, key))
}

/// Writes a file readable by its owner only, durably (temp, fsync, rename).
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    crate::storage::write_durably(path, data, 0o600)
}

/// The daemon's certificate and key files, and whether they are the
/// self-signed pair (made on first use).
fn pair_paths(cfg: &Config) -> Result<(PathBuf, PathBuf, bool), TlsError> {
    Ok(match (&cfg.server.tls.cert, &cfg.server.tls.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone(), false),
        _ => {
            let (c, k) = self_signed(&cfg.server.state_dir)?;
            (c, k, true)
        }
    })
}

/// The fingerprint clients pin (`sha256:<hex>`), read from the daemon's
/// certificate file.
pub fn server_fingerprint(cfg: &Config) -> Result<String, TlsError> {
    let (cert, _, _) = pair_paths(cfg)?;
    Ok(fingerprint(&read_certs(&cert)?[0]))
}

/// TLS for the web console (`[server.web]`): its own pair when given, else
/// the daemon's; HTTP/1.1, no client certificates.
pub fn web_tls(cfg: &Config) -> Result<Arc<ServerConfig>, TlsError> {
    let web = cfg.server.web.as_ref();
    let (cert, key) = match web.and_then(|w| w.cert.clone().zip(w.key.clone())) {
        Some(pair) => pair,
        None => {
            let (c, k, _) = pair_paths(cfg)?;
            (c, k)
        }
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(read_certs(&cert)?, read_key(&key)?)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Builds the server's TLS configuration from the config.
pub fn server_tls(cfg: &Config) -> Result<ServerTls, TlsError> {
    let (cert_path, key_path, self_signed) = pair_paths(cfg)?;
    let certs = read_certs(&cert_path)?;
    let key = read_key(&key_path)?;
    let fingerprint = fingerprint(&certs[0]);
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match &cfg.server.tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(ca)? {
                roots.add(c)?;
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let v = if cfg.server.tls.require_client_cert {
                v
            } else {
                v.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                v.build().map_err(|e| TlsError::Generate(e.to_string()))?,
            )
        }
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption: no TLS 1.3 tickets (rustls sends two by default)
    // and no TLS 1.2 session cache. A backup client connects for a
    // session, not for many short ones, and the reference client never
    // resumes; each ticket cost every handshake a key derivation, a
    // record and a turn on the session cache's lock, and a cache of 256
    // could not serve 10,000 clients anyway. (The web console keeps
    // both: browsers resume.)
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(ServerTls {
        config: Arc::new(config),
        fingerprint,
        self_signed,
    })
}

/// A client verifier that accepts exactly one server certificate, by its
/// The server's certificate is not the pinned one (`--pin`); its `Display`
/// is what the client prints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the server's certificate does not match the pin: the server presents {server}, --pin is {pinned}; if the server's certificate was replaced, pin the new fingerprint (the daemon prints it at start)"
)]
pub struct PinMismatch {
    /// The certificate the server presented.
    pub server: String,
    /// The pin.
    pub pinned: String,
}

/// SHA-256 (`--pin`); signatures are still checked.
#[derive(Debug)]
pub struct PinVerifier {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinVerifier {
    /// Pins `sha256:<hex>`.
    pub fn new(pin: &str) -> PinVerifier {
        PinVerifier {
            pin: pin.to_ascii_lowercase(),
            provider: provider(),
        }
    }
}

impl rustls::client::danger::ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if fingerprint(end_entity) == self.pin {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch {
                    server: fingerprint(end_entity),
                    pinned: self.pin.clone(),
                }))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client TLS configuration: pinned (`--pin`) or verified against a CA
/// file (`--ca`). Offers ALPN `tollgate/1`.
pub fn client_config(
    pin: Option<&str>,
    ca: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let mut config = match (pin, ca) {
        (Some(p), _) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier::new(p)))
            .with_no_client_auth(),
        (None, Some(ca)) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(ca)? {
                roots.add(c)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (None, None) => {
            return Err(TlsError::Pem {
                path: PathBuf::from("--pin/--ca"),
                what: "give --pin sha256:<hex> (printed by the daemon at start) or --ca FILE"
                    .into(),
            });
        }
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The subject CN and DNS SANs of a certificate (PROTOCOL.md: with mutual
/// TLS, one of them must equal HELLO's `client_id`). Empty if unparsable.
pub fn peer_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|a| a.as_str().ok())
        .map(str::to_string)
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_string());
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::ClientSessionStore;
    use rustls::pki_types::ServerName;
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A client's session store that counts the TLS 1.3 tickets it is given.
    #[derive(Debug, Default)]
    struct Tickets(AtomicUsize);

    impl ClientSessionStore for Tickets {
        fn set_kx_hint(&self, _: ServerName<'static>, _: rustls::NamedGroup) {}
        fn kx_hint(&self, _: &ServerName<'_>) -> Option<rustls::NamedGroup> {
            None
        }
        fn set_tls12_session(
            &self,
            _: ServerName<'static>,
            _: rustls::client::Tls12ClientSessionValue,
        ) {
        }
        fn tls12_session(
            &self,
            _: &ServerName<'_>,
        ) -> Option<rustls::client::Tls12ClientSessionValue> {
            None
        }
        fn remove_tls12_session(&self, _: &ServerName<'static>) {}
        fn insert_tls13_ticket(
            &self,
            _: ServerName<'static>,
            _: rustls::client::Tls13ClientSessionValue,
        ) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn take_tls13_ticket(
            &self,
            _: &ServerName<'static>,
        ) -> Option<rustls::client::Tls13ClientSessionValue> {
            None
        }
    }

    /// Moves what `from` has to send into `to`; whether anything moved.
    fn flow<A, B>(
        from: &mut rustls::ConnectionCommon<A>,
        to: &mut rustls::ConnectionCommon<B>,
    ) -> bool {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).unwrap();
            to.process_new_packets().unwrap();
        }
        !buf.is_empty()
    }

    /// A client of the backup listener and its server end, handshaken:
    /// records move both ways until neither has anything to send.
    fn connect(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> (rustls::ClientConnection, rustls::ServerConnection) {
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(client, name).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        while flow(&mut c, &mut s) | flow(&mut s, &mut c) {}
        assert!(!c.is_handshaking() && !s.is_handshaking());
        (c, s)
    }

    /// A client pinned to the server, with `provider`'s suites.
    fn pinned(
        provider: rustls::crypto::CryptoProvider,
        versions: &[&'static rustls::SupportedProtocolVersion],
        pin: &str,
    ) -> rustls::ClientConfig {
        let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier::new(pin)))
            .with_no_client_auth();
        c.alpn_protocols = vec![ALPN.to_vec()];
        c
    }

    /// The suite a client gets from the backup listener, and the TLS 1.3
    /// tickets it is given.
    fn handshake(
        server: Arc<rustls::ServerConfig>,
        mut client: rustls::ClientConfig,
    ) -> (rustls::CipherSuite, usize) {
        let tickets = Arc::new(Tickets::default());
        client.resumption = rustls::client::Resumption::store(tickets.clone());
        let (mut c, mut s) = connect(Arc::new(client), server);
        // Tickets follow the handshake: data both ways flushes them out.
        c.writer().write_all(b"ping").unwrap();
        s.writer().write_all(b"pong").unwrap();
        while flow(&mut c, &mut s) | flow(&mut s, &mut c) {}
        let mut got = [0u8; 4];
        std::io::Read::read_exact(&mut c.reader(), &mut got).unwrap();
        assert_eq!(&got, b"pong");
        let suite = s.negotiated_cipher_suite().unwrap().suite();
        (suite, tickets.0.load(Ordering::SeqCst))
    }

    /// The reference client gets AES-128-GCM-SHA256; any other client
    /// gets the suite it lists first (a stock rustls client AES-256, one
    /// without AES hardware ChaCha20); nobody gets a ticket.
    #[test]
    fn clients_choose_the_suite_and_get_no_tickets() {
        use rustls::CipherSuite::*;
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("tollgate.toml");
        let cfg = Config::from_str(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nstate = \"sqlite://state/state.db\"\n\
             [default_customer]\nbackup_location = \"./backup\"\n",
            &path,
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        let server = server_tls(&cfg).unwrap();
        let pin = server.fingerprint.clone();
        let reference = (*client_config(Some(&pin), None).unwrap()).clone();
        let stock = |first: Option<rustls::CipherSuite>| {
            let mut p = rustls::crypto::aws_lc_rs::default_provider();
            p.cipher_suites.sort_by_key(|s| Some(s.suite()) != first);
            pinned(p, rustls::DEFAULT_VERSIONS, &pin)
        };
        for (who, client, want) in [
            ("the reference client", reference, TLS13_AES_128_GCM_SHA256),
            (
                "a stock rustls client",
                stock(None),
                TLS13_AES_256_GCM_SHA384,
            ),
            (
                "a client preferring ChaCha20",
                stock(Some(TLS13_CHACHA20_POLY1305_SHA256)),
                TLS13_CHACHA20_POLY1305_SHA256,
            ),
        ] {
            assert_eq!(handshake(server.config.clone(), client), (want, 0), "{who}");
        }
        // Nor does a TLS 1.2 client resume by session id.
        let tls12 = Arc::new(pinned(
            Arc::unwrap_or_clone(provider()),
            &[&rustls::version::TLS12],
            &pin,
        ));
        for round in ["first", "second"] {
            let (c, _) = connect(tls12.clone(), server.config.clone());
            assert_eq!(
                c.handshake_kind(),
                Some(rustls::HandshakeKind::Full),
                "{round} TLS 1.2 handshake"
            );
        }
    }
}
