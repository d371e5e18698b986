//! Delivery to `https://` services against Tansu and the sidecar binary. A CA and a server
//! certificate for 127.0.0.1 (IP SAN) are made at test time with the `openssl` CLI; an
//! in-test HTTPS service (native-tls, the OpenSSL the sidecar links) records what it gets
//! and counts the handshakes it refused; a second one (plain OpenSSL) requires a client
//! certificate from a second CA.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use eventwire_e2e::push::produce_events;
use eventwire_e2e::*;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_native_tls::native_tls;

const WAIT: Duration = Duration::from_secs(30);
/// Listening on after the awaited requests, to see any that should not come. The check
/// itself, not a wait for something to happen.
const QUIET: Duration = Duration::from_millis(1500);

/// A private CA and a server certificate it signed, in `dir`.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// `ca.pem` (the CA certificate), `server.pem` and `server.key` (PKCS#8) for
    /// `IP:127.0.0.1`, valid for a day; P-256 keys, which are quick to make.
    fn generate() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
        };
        pki.ca("ca", "eventwire e2e test CA");
        pki.issue(
            "server",
            "ca",
            "127.0.0.1",
            "extendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1\n",
        );
        pki
    }

    /// `client-ca.pem` and, signed by it, `client.pem` / `client.key` (PKCS#8) with the
    /// common name `cn`, for TLS client authentication.
    fn client(&self, cn: &str) {
        self.ca("client-ca", "eventwire e2e client CA");
        self.issue("client", "client-ca", cn, "extendedKeyUsage = clientAuth\n");
    }

    /// A self-signed CA: `<name>.pem`, `<name>.key`.
    fn ca(&self, name: &str, cn: &str) {
        let at = |file: &str| self.path(file).display().to_string();
        let subject = format!("/CN={cn}");
        openssl(
            &[
                &["req", "-x509", "-nodes", "-days", "1"][..],
                &EC_KEY,
                &["-subj", &subject],
                &["-addext", "basicConstraints = critical, CA:TRUE"],
                &["-addext", "keyUsage = critical, keyCertSign, cRLSign"],
                &[
                    "-keyout",
                    &at(&format!("{name}.key")),
                    "-out",
                    &at(&format!("{name}.pem")),
                ],
            ]
            .concat(),
        );
    }

    /// `<name>.pem` and `<name>.key` for `cn`, signed by the CA `ca`, with `usage` (extension
    /// lines) besides a leaf's constraints.
    fn issue(&self, name: &str, ca: &str, cn: &str, usage: &str) {
        let at = |file: &str| self.path(file).display().to_string();
        let (ext, csr) = (at(&format!("{name}.ext")), at(&format!("{name}.csr")));
        std::fs::write(
            &ext,
            format!(
                "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n{usage}"
            ),
        )
        .unwrap();
        let subject = format!("/CN={cn}");
        openssl(
            &[
                &["req", "-nodes"][..],
                &EC_KEY,
                &["-subj", &subject],
                &["-keyout", &at(&format!("{name}.key")), "-out", &csr],
            ]
            .concat(),
        );
        let (ca_pem, ca_key, out) = (
            at(&format!("{ca}.pem")),
            at(&format!("{ca}.key")),
            at(&format!("{name}.pem")),
        );
        openssl(&[
            "x509",
            "-req",
            "-days",
            "1",
            // A random serial, kept in <ca>.srl.
            "-CAcreateserial",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-extfile",
            &ext,
            "-out",
            &out,
        ]);
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn identity(&self) -> native_tls::Identity {
        let read = |name: &str| std::fs::read(self.path(name)).unwrap();
        native_tls::Identity::from_pkcs8(&read("server.pem"), &read("server.key"))
            .unwrap_or_else(|e| panic!("server identity: {e}"))
    }
}

/// The sidecar with `toml` as its deliveries file, in the PKI's directory (where a relative
/// `ca_file` or client certificate is read from).
async fn sidecar_delivering(broker: &Broker, pki: &Pki, toml: &str) -> Sidecar {
    let file = pki.path("deliveries.toml");
    std::fs::write(&file, toml).unwrap();
    let file = file.display().to_string();
    Sidecar::start_with(
        &broker.bootstrap(),
        &["--deliveries-file", &file, "--push-fetch-wait-ms", "50"],
    )
    .await
}

/// A new P-256 key: quick to make.
const EC_KEY: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

/// Runs `/usr/bin/openssl` (Debian's `openssl`, in the Makefile's APT_PACKAGES).
fn openssl(args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run openssl (Debian package `openssl`): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the service got: (path, `ce-id`) per request, and the handshakes it refused.
#[derive(Default)]
struct Service {
    got: Mutex<Vec<(String, String)>>,
    refused_handshakes: AtomicUsize,
}

impl Service {
    fn ids(&self, path: &str) -> Vec<String> {
        let got = self.got.lock().unwrap();
        got.iter()
            .filter(|(p, _)| p == path)
            .map(|(_, id)| id.clone())
            .collect()
    }
}

/// A TCP listener that hands axum only connections whose TLS handshake succeeded. One
/// handshake at a time (enough here), each given 5 s.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    tls: tokio_native_tls::TlsAcceptor,
    service: Arc<Service>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_native_tls::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            match tokio::time::timeout(Duration::from_secs(5), self.tls.accept(tcp)).await {
                Ok(Ok(tls)) => return (tls, addr),
                _ => {
                    self.service
                        .refused_handshakes
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// `POST /{path}` records the event, answers 200; `POST /v1/traces` is an OTLP collector
/// stand-in (records the path only).
async fn receive(
    State(s): State<Arc<Service>>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> &'static str {
    let id = headers
        .get("ce-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    s.got.lock().unwrap().push((path, id));
    "{}"
}

/// The HTTPS service on 127.0.0.1:0; its base URL (`https://127.0.0.1:<port>`).
async fn https_service(pki: &Pki) -> (Arc<Service>, String) {
    let service = Arc::new(Service::default());
    let tls = native_tls::TlsAcceptor::new(pki.identity()).unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let listener = TlsListener {
        tcp,
        tls: tls.into(),
        service: service.clone(),
    };
    let app = axum::Router::new()
        .route("/{*path}", axum::routing::post(receive))
        .with_state(service.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (service, format!("https://127.0.0.1:{port}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn https_is_delivered_with_the_ca_file_and_dead_lettered_without() {
    let pki = Pki::generate();
    let (svc, base) = https_service(&pki).await;
    let broker = Broker::start().await;
    let topic = topic("deliver-tls");
    let dlq = format!("{topic}.dlq");
    broker.create_topic(&topic, 1).await;
    broker.create_topic(&dlq, 1).await;

    // Each delivery reads the whole topic (a group each). `ca_file` is relative: read from
    // the deliveries file's directory, where the CA is. `wrongname` trusts the CA but asks
    // for `localhost`, which the certificate (IP 127.0.0.1 only) does not name.
    let port = base.rsplit(':').next().unwrap();
    let toml = format!(
        "[[delivery]]\nname = \"trusted\"\ntopic = \"{topic}\"\nurl = \"{base}/trusted\"\n\
         ca_file = \"ca.pem\"\n\n\
         [[delivery]]\nname = \"untrusted\"\ntopic = \"{topic}\"\nurl = \"{base}/untrusted\"\n\
         max_attempts = 3\ninitial_backoff_ms = 50\nmax_backoff_ms = 100\n\
         dead_letter_topic = \"{dlq}\"\n\n\
         [[delivery]]\nname = \"wrongname\"\ntopic = \"{topic}\"\n\
         url = \"https://localhost:{port}/wrongname\"\nca_file = \"ca.pem\"\n\
         max_attempts = 2\ninitial_backoff_ms = 50\nmax_backoff_ms = 100\n"
    );
    let sidecar = sidecar_delivering(&broker, &pki, &toml).await;

    let events = [
        ("a", "tls-1", "t.one", "s"),
        ("b", "tls-2", "t.two", "s"),
        ("c", "tls-3", "t.three", "s"),
    ];
    produce_events(&broker.bootstrap(), &topic, &events).await;

    wait_until("3 events delivered over https", WAIT, || {
        let n = svc.ids("trusted").len();
        async move { n >= 3 }
    })
    .await;
    let dead = tokio::task::block_in_place(|| broker.records_settled(&dlq, 3, WAIT));
    wait_until("wrongname to give up on all 3 events", WAIT, || {
        let log = sidecar.proc.log_text();
        async move {
            log.lines()
                .filter(|l| l.contains("wrongname") && l.contains("event dropped"))
                .count()
                >= 3
        }
    })
    .await;
    tokio::time::sleep(QUIET).await;

    assert_eq!(svc.ids("trusted"), ["tls-1", "tls-2", "tls-3"]);
    assert!(
        svc.ids("untrusted").is_empty() && svc.ids("wrongname").is_empty(),
        "delivered without a valid certificate: {:?}",
        svc.got.lock().unwrap()
    );
    let refused = svc.refused_handshakes.load(Ordering::Relaxed);
    assert!(
        refused >= 9 + 6,
        "3 + 2 attempts x 3 events refused at the handshake, saw {refused}"
    );

    // The failures say why, in OpenSSL's words.
    let log = sidecar.proc.log_text();
    let failure = |delivery: &str| {
        log.lines()
            .find(|l| l.contains(delivery) && l.contains("delivery failed; retrying"))
            .unwrap_or_else(|| panic!("no retry logged for {delivery}:\n{log}"))
            .to_owned()
    };
    let untrusted = failure("untrusted");
    assert!(
        untrusted.contains("certificate verify failed")
            && untrusted.contains("unable to get local issuer certificate"),
        "{untrusted}"
    );
    let wrongname = failure("wrongname");
    assert!(
        wrongname.contains("certificate verify failed") && wrongname.contains("hostname mismatch"),
        "{wrongname}"
    );

    assert_eq!(dead.len(), 3, "one dead letter per event: {dead:?}");
    for (d, id) in dead.iter().zip(["tls-1", "tls-2", "tls-3"]) {
        assert_eq!(d.header("ce_id"), Some(id));
        assert_eq!(d.header("eventwire_dlq_reason"), Some("attempts-exhausted"));
        assert_eq!(d.header("eventwire_dlq_status"), Some(""));
        assert_eq!(d.header("eventwire_dlq_attempts"), Some("3"));
    }

    let m = sidecar.metrics().await;
    let attempts = |delivery: &str, outcome: &str| {
        m.get(
            "eventwire_delivery_attempts_total",
            &[("delivery", delivery), ("outcome", outcome)],
        )
    };
    let events = |delivery: &str, outcome: &str| {
        m.get(
            "eventwire_delivery_events_total",
            &[("delivery", delivery), ("outcome", outcome)],
        )
    };
    assert_eq!(attempts("trusted", "2xx"), Some(3.0));
    assert_eq!(attempts("trusted", "connection_error"), None);
    assert_eq!(attempts("untrusted", "connection_error"), Some(9.0));
    assert_eq!(events("trusted", "delivered"), Some(3.0));
    assert_eq!(events("untrusted", "dead_lettered"), Some(3.0));
    assert_eq!(attempts("wrongname", "connection_error"), Some(6.0));
    assert_eq!(events("wrongname", "dropped"), Some(3.0));
}

/// Without `ca_file` the system's CAs (OpenSSL's store) are trusted: `SSL_CERT_FILE` points
/// that store at the test CA. A `ca_file` of another CA adds to that store rather than
/// replacing it. The OTLP exporter's client is the same reqwest, so spans go to an
/// `https://` collector too.
#[tokio::test(flavor = "multi_thread")]
async fn the_system_ca_store_serves_deliveries_and_otlp_over_https() {
    let pki = Pki::generate();
    let other = Pki::generate();
    let (svc, base) = https_service(&pki).await;
    let broker = Broker::start().await;
    let topic = topic("deliver-tls-system");
    broker.create_topic(&topic, 1).await;
    let file = pki.path("deliveries.toml");
    let other_ca = other.path("ca.pem").display().to_string();
    std::fs::write(
        &file,
        format!(
            "[[delivery]]\nname = \"system\"\ntopic = \"{topic}\"\nurl = \"{base}/system\"\n\n\
             [[delivery]]\nname = \"merged\"\ntopic = \"{topic}\"\nurl = \"{base}/merged\"\n\
             ca_file = \"{other_ca}\"\n"
        ),
    )
    .unwrap();
    let file = file.display().to_string();
    let ca = pki.path("ca.pem").display().to_string();
    let sidecar = Sidecar::start_with_env(
        &broker.bootstrap(),
        &["--deliveries-file", &file, "--push-fetch-wait-ms", "50"],
        &[
            ("SSL_CERT_FILE", &ca),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &base),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    sidecar.wait_ready().await;

    // Through the sidecar's ingest: an ingest span to export, then the delivery.
    let status = reqwest::Client::new()
        .post(sidecar.url("/v1/events"))
        .header("eventwire-topic", &topic)
        .header("ce-specversion", "1.0")
        .header("ce-id", "sys-1")
        .header("ce-source", "/tests/delivery_tls")
        .header("ce-type", "com.example.tls")
        .header("content-type", "application/json")
        .body(r#"{"n":1}"#)
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "ingest answered {status}");

    wait_until("the event delivered over https twice", WAIT, || {
        let n = svc.ids("system").len() + svc.ids("merged").len();
        async move { n >= 2 }
    })
    .await;
    wait_until("spans exported to the https collector", WAIT, || {
        let n = svc.ids("v1/traces").len();
        async move { n >= 1 }
    })
    .await;
    assert_eq!(svc.ids("system"), ["sys-1"]);
    assert_eq!(svc.ids("merged"), ["sys-1"]);
    assert_eq!(svc.refused_handshakes.load(Ordering::Relaxed), 0);
}

/// What the mutual-TLS service saw: (client certificate CN, `ce-id`) per request, and the
/// handshakes it refused.
#[derive(Default)]
struct MtlsService {
    got: Mutex<Vec<(String, String)>>,
    refused_handshakes: AtomicUsize,
}

/// An HTTPS service on 127.0.0.1:0 that requires a client certificate signed by
/// `client-ca.pem`: plain OpenSSL, a thread per connection, HTTP/1.1 keep-alive, 200 to
/// every request. Its base URL.
fn mtls_service(pki: &Pki) -> (Arc<MtlsService>, String) {
    use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod, SslVerifyMode};
    let mut tls = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
    tls.set_private_key_file(pki.path("server.key"), SslFiletype::PEM)
        .unwrap();
    tls.set_certificate_chain_file(pki.path("server.pem"))
        .unwrap();
    tls.set_ca_file(pki.path("client-ca.pem")).unwrap();
    tls.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    let tls = Arc::new(tls.build());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let service = Arc::new(MtlsService::default());
    let svc = service.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let (tls, svc) = (tls.clone(), svc.clone());
            std::thread::spawn(move || serve_mtls(&tls, &svc, tcp));
        }
    });
    (service, format!("https://127.0.0.1:{port}"))
}

fn serve_mtls(tls: &openssl::ssl::SslAcceptor, svc: &MtlsService, tcp: std::net::TcpStream) {
    use std::io::{BufRead, BufReader, Read, Write};
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(stream) = tls.accept(tcp) else {
        svc.refused_handshakes.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let cn = stream
        .ssl()
        .peer_certificate()
        .and_then(|c| {
            let name = c.subject_name();
            let cn = name.entries_by_nid(openssl::nid::Nid::COMMONNAME).next()?;
            cn.data().to_string().ok()
        })
        .unwrap_or_default();
    let mut conn = BufReader::new(stream);
    loop {
        let (mut id, mut length) = (String::new(), 0usize);
        let mut line = String::new();
        if conn.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            line.clear();
            if conn.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let Some((name, value)) = line.trim_end().split_once(':') else {
                break;
            };
            match name.to_ascii_lowercase().as_str() {
                "ce-id" => id = value.trim().to_owned(),
                "content-length" => length = value.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        if conn.read_exact(&mut body).is_err() {
            return;
        }
        svc.got.lock().unwrap().push((cn.clone(), id));
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        if conn.get_mut().write_all(answer).is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_is_shown_to_a_service_that_requires_one() {
    let pki = Pki::generate();
    pki.client("eventwire-sidecar");
    let (svc, base) = mtls_service(&pki);
    let broker = Broker::start().await;
    let topic = topic("deliver-mtls");
    broker.create_topic(&topic, 1).await;

    // `anonymous` trusts the server but shows no certificate: refused at every handshake.
    let toml = format!(
        "[[delivery]]\nname = \"mtls\"\ntopic = \"{topic}\"\nurl = \"{base}/mtls\"\n\
         ca_file = \"ca.pem\"\nclient_cert_file = \"client.pem\"\nclient_key_file = \"client.key\"\n\n\
         [[delivery]]\nname = \"anonymous\"\ntopic = \"{topic}\"\nurl = \"{base}/anonymous\"\n\
         ca_file = \"ca.pem\"\nmax_attempts = 2\ninitial_backoff_ms = 50\nmax_backoff_ms = 100\n"
    );
    let sidecar = sidecar_delivering(&broker, &pki, &toml).await;
    let events = [("a", "mtls-1", "t", "s"), ("b", "mtls-2", "t", "s")];
    produce_events(&broker.bootstrap(), &topic, &events).await;

    wait_until("anonymous to give up on both events", WAIT, || {
        let m = sidecar.metrics();
        async move {
            m.await.get(
                "eventwire_delivery_events_total",
                &[("delivery", "anonymous"), ("outcome", "dropped")],
            ) == Some(2.0)
        }
    })
    .await;
    wait_until("both events delivered with the certificate", WAIT, || {
        let n = svc.got.lock().unwrap().len();
        async move { n >= 2 }
    })
    .await;
    tokio::time::sleep(QUIET).await;
    let got = svc.got.lock().unwrap().clone();
    let want = [
        ("eventwire-sidecar", "mtls-1"),
        ("eventwire-sidecar", "mtls-2"),
    ]
    .map(|(cn, id)| (cn.to_owned(), id.to_owned()));
    assert_eq!(
        got, want,
        "each event once, from the client certificate's holder"
    );
    let refused = svc.refused_handshakes.load(Ordering::Relaxed);
    assert!(
        refused >= 4,
        "anonymous: 2 events x 2 attempts refused, got {refused}"
    );
    let m = sidecar.metrics().await;
    assert_eq!(
        m.get(
            "eventwire_delivery_attempts_total",
            &[("delivery", "anonymous"), ("outcome", "connection_error")]
        ),
        Some(4.0)
    );
}
