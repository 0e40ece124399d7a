//! Security of `trainmetrics serve` as a process: loopback defaults, TLS (and mutual TLS) on
//! both OTLP protocols with certificates made at test time, bearer-token authentication,
//! request size limits including a gzip bomb over gRPC, rate limits, and secrets that never
//! show in any output of `serve` or `validate`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;

use common::{otlp, read_tb, trainmetrics_bin, Loader};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use prost::Message;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A `trainmetrics` process with stdout piped and stderr in a file.
struct Proc {
    child: Child,
    stdout: BufReader<ChildStdout>,
    stderr: PathBuf,
    grpc: String,
    http: String,
    telemetry: String,
}

/// `trainmetrics serve` with `args`, `env`, on free ports unless `args` say otherwise.
fn serve(dir: &Path, args: &[String], env: &[(&str, String)]) -> Proc {
    let stderr = dir.join(format!("serve-{}.log", common::free_port()));
    let mut cmd = Command::new(trainmetrics_bin());
    cmd.arg("serve")
        .args(["--set", "receivers.otlp.protocols.grpc.endpoint=127.0.0.1:0"])
        .args(["--set", "receivers.otlp.protocols.http.endpoint=127.0.0.1:0"])
        .args(["--set", "service.telemetry.endpoint=127.0.0.1:0"])
        .arg("--set")
        .arg(format!("exporters.tensorboard.logdir={}", dir.join("tb").display()))
        .args(["--set", "exporters.tensorboard.linger=100ms"])
        .args(args)
        .env_remove("MLFLOW_TRACKING_URI")
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"));
    start(cmd, stderr)
}

fn start(mut cmd: Command, stderr: PathBuf) -> Proc {
    let mut child = cmd.spawn().expect("run trainmetrics serve");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    let _ = stdout.read_line(&mut line);
    let field = |k: &str| {
        line.split_whitespace().find_map(|w| w.strip_prefix(k)).map(str::to_string).unwrap_or_else(|| {
            panic!("serve did not start: {line:?}; stderr: {}", std::fs::read_to_string(&stderr).unwrap_or_default())
        })
    };
    let (grpc, http, telemetry) = (field("grpc="), field("http="), field("telemetry="));
    Proc { child, stdout, stderr, grpc, http, telemetry }
}

impl Proc {
    /// SIGTERM; returns (stdout after the listening line, stderr).
    fn stop(mut self) -> (String, String) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        let mut out = String::new();
        let _ = self.stdout.read_to_string(&mut out);
        (out, std::fs::read_to_string(&self.stderr).unwrap_or_default())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

fn run_res(name: &str) -> Vec<opentelemetry_proto::tonic::common::v1::KeyValue> {
    vec![otlp::s("ml.run.name", name), otlp::s("ml.run.id", name)]
}

fn req(run: &str, points: &[(&str, Option<i64>, f64)]) -> ExportMetricsServiceRequest {
    otlp::request(vec![otlp::resource(run_res(run), points)])
}

/// One OTLP/gRPC export with an optional `authorization` value.
async fn grpc_export(channel: Channel, r: ExportMetricsServiceRequest, auth: Option<&str>) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(r);
    if let Some(a) = auth {
        request.metadata_mut().insert("authorization", a.parse().expect("metadata"));
    }
    MetricsServiceClient::new(channel).export(request).await.map(|_| ())
}

async fn plain_channel(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}")).expect("uri").connect().await.expect("connect")
}

/// An HTTP answer: status, headers (lower-case names), body.
type Answer = (u16, Vec<(String, String)>, String);

fn agent(tls: Option<ureq::tls::TlsConfig>) -> ureq::Agent {
    let mut c = ureq::Agent::config_builder().http_status_as_error(false);
    if let Some(t) = tls {
        c = c.tls_config(t);
    }
    ureq::Agent::new_with_config(c.build())
}

fn http_post(agent: &ureq::Agent, url: &str, body: Vec<u8>, auth: Option<&str>) -> Result<Answer, ureq::Error> {
    let mut r = agent.post(url).header("Content-Type", "application/x-protobuf");
    if let Some(a) = auth {
        r = r.header("Authorization", a);
    }
    let mut resp = r.send(body)?;
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let status = resp.status().as_u16();
    Ok((status, headers, resp.body_mut().read_to_string().unwrap_or_default()))
}

fn header<'a>(a: &'a Answer, name: &str) -> Option<&'a str> {
    a.1.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Run directories TensorBoard's exporter created under `logdir`.
fn run_dirs(logdir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(logdir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn default_endpoints_are_loopback_in_settings_validate_and_a_started_service() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = trainmetrics::config::PipelineConfig::from_yaml_str("exporters: {tensorboard: {}}", Path::new("t.yaml"))
        .and_then(|c| c.validate())
        .expect("default config");
    let addrs: Vec<std::net::SocketAddr> = [settings.grpc.map(|g| g.0), settings.http.map(|h| h.0), settings.telemetry]
        .into_iter()
        .map(|a| a.expect("enabled by default").parse().expect("ip:port"))
        .collect();
    assert_eq!(addrs.iter().map(|a| a.port()).collect::<Vec<_>>(), [14317, 14318, 14319]);
    assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");

    let config = dir.path().join("c.yaml");
    std::fs::write(&config, "exporters: {tensorboard: {}}\n").expect("write");
    let out = Command::new(trainmetrics_bin()).arg("validate").arg("--config").arg(&config).output().expect("validate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    for line in ["receiver grpc: 127.0.0.1:14317 tls off auth off", "receiver http: 127.0.0.1:14318 tls off auth off", "telemetry: 127.0.0.1:14319"] {
        assert!(stdout.contains(line), "{line:?} missing in {stdout}");
    }

    // The default config as `serve` runs it without --config, on its default ports: in a
    // network namespace of its own, so nothing else on this host can hold those ports.
    let stderr = dir.path().join("serve.log");
    let mut cmd = Command::new("unshare");
    cmd.args(["--net", "--", "sh", "-c", "ip link set lo up && exec \"$0\" serve"])
        .arg(trainmetrics_bin())
        .current_dir(dir.path())
        .env_remove("MLFLOW_TRACKING_URI")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"));
    let ok = Command::new("unshare").args(["--net", "true"]).status().is_ok_and(|s| s.success());
    assert!(ok, "missing: `unshare --net` (util-linux, run as root) to start the service on its default ports in a private network namespace");
    let p = start(cmd, stderr);
    assert_eq!((p.grpc.as_str(), p.http.as_str(), p.telemetry.as_str()), ("127.0.0.1:14317", "127.0.0.1:14318", "127.0.0.1:14319"));
    let (out, log) = p.stop();
    assert!(out.contains("tensorboard: received 0 delivered 0 dropped 0"), "{out}");
    assert!(log.contains("receiver OTLP/gRPC: 127.0.0.1:14317, tls off, auth off, rate limit off"), "{log}");
    assert!(log.contains("receiver OTLP/HTTP: 127.0.0.1:14318, tls off, auth off, rate limit off"), "{log}");
}

/// A self-signed server certificate for 127.0.0.1 / localhost: (cert PEM, key PEM).
fn server_cert() -> (String, String) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("rcgen");
    (c.cert.pem(), c.signing_key.serialize_pem())
}

/// A CA and a client certificate it signed: (CA PEM, client cert PEM, client key PEM).
fn client_ca_and_cert() -> (String, String, String) {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
    ca.distinguished_name.push(rcgen::DnType::CommonName, "trainmetrics test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().expect("key")).expect("CA");
    let mut client = rcgen::CertificateParams::new(vec!["trainer".to_string()]).expect("params");
    client.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = client.signed_by(&key, &ca).expect("client cert");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

fn tls_sets(cert: &Path, key: &Path, ca: Option<&Path>) -> Vec<String> {
    let mut v = Vec::new();
    for proto in ["grpc", "http"] {
        v.push(format!("receivers.otlp.protocols.{proto}.tls.cert_file={}", cert.display()));
        v.push(format!("receivers.otlp.protocols.{proto}.tls.key_file={}", key.display()));
        if let Some(ca) = ca {
            v.push(format!("receivers.otlp.protocols.{proto}.tls.client_ca_file={}", ca.display()));
        }
    }
    v.iter().flat_map(|s| ["--set".to_string(), s.clone()]).collect()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

#[test]
fn tls_on_both_protocols_delivers_and_plaintext_clients_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_pem, key_pem) = server_cert();
    let (cert, key) = (write(dir.path(), "server.pem", &cert_pem), write(dir.path(), "server.key", &key_pem));
    let p = serve(dir.path(), &tls_sets(&cert, &key, None), &[]);
    let rt = rt();
    rt.block_on(async {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&cert_pem)).domain_name("localhost");
        let ch = Endpoint::from_shared(format!("https://{}", p.grpc)).expect("uri").tls_config(tls).expect("tls").connect().await.expect("TLS connect");
        grpc_export(ch, req("tls-grpc", &[("loss", Some(1), 1.0), ("loss", Some(2), 2.0)]), None).await.expect("export over TLS");
        // A plaintext HTTP/2 client gets no gRPC answer from a TLS port.
        let plain = match Endpoint::from_shared(format!("http://{}", p.grpc)).expect("uri").connect().await {
            Ok(ch) => grpc_export(ch, req("plain-grpc", &[("loss", Some(1), 9.0)]), None).await,
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        };
        assert!(plain.is_err(), "a plaintext gRPC client must be refused");
    });
    let ca = ureq::tls::Certificate::from_pem(cert_pem.as_bytes()).expect("pem");
    let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![ca]))).build();
    let body = req("tls-http", &[("loss", Some(1), 3.0)]).encode_to_vec();
    let a = http_post(&agent(Some(tls)), &format!("https://{}/v1/metrics", p.http), body, None).expect("POST over TLS");
    assert_eq!(a.0, 200, "{a:?}");
    let plain = http_post(&agent(None), &format!("http://{}/v1/metrics", p.http), req("plain-http", &[("loss", Some(1), 9.0)]).encode_to_vec(), None);
    assert!(!matches!(plain, Ok((200, _, _))), "a plaintext HTTP client must be refused: {plain:?}");
    let (report, log) = p.stop();
    assert!(report.contains("tensorboard: received 3 delivered 3 dropped 0"), "{report}");
    assert!(log.contains("tls on (cert"), "{log}");
    assert!(log.contains("OTLP/HTTP TLS handshake failed"), "the refused plaintext client is logged: {log}");
    let tb = read_tb(&dir.path().join("tb"), Loader::Python);
    assert_eq!(tb.scalars["tls-grpc"]["loss"], vec![(1, 1.0), (2, 2.0)]);
    assert_eq!(tb.scalars["tls-http"]["loss"], vec![(1, 3.0)]);
    assert_eq!(run_dirs(&dir.path().join("tb")), ["tls-grpc", "tls-http"], "nothing from the plaintext clients");
}

#[test]
fn mutual_tls_requires_a_client_certificate_the_ca_signed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_pem, key_pem) = server_cert();
    let (ca_pem, client_pem, client_key) = client_ca_and_cert();
    let (cert, key) = (write(dir.path(), "server.pem", &cert_pem), write(dir.path(), "server.key", &key_pem));
    let ca = write(dir.path(), "ca.pem", &ca_pem);
    let p = serve(dir.path(), &tls_sets(&cert, &key, Some(&ca)), &[]);
    let rt = rt();
    rt.block_on(async {
        let base = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&cert_pem)).domain_name("localhost");
        let with_cert = base.clone().identity(Identity::from_pem(&client_pem, &client_key));
        let ch = Endpoint::from_shared(format!("https://{}", p.grpc)).expect("uri").tls_config(with_cert).expect("tls").connect().await.expect("connect");
        grpc_export(ch, req("mtls-grpc", &[("loss", Some(1), 1.0)]), None).await.expect("export with a client certificate");
        let without = match Endpoint::from_shared(format!("https://{}", p.grpc)).expect("uri").tls_config(base).expect("tls").connect().await {
            Ok(ch) => grpc_export(ch, req("anon-grpc", &[("loss", Some(1), 9.0)]), None).await,
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        };
        assert!(without.is_err(), "a client without a certificate must be refused");
    });
    let server_ca = || ureq::tls::RootCerts::Specific(Arc::new(vec![ureq::tls::Certificate::from_pem(cert_pem.as_bytes()).expect("pem")]));
    let client = ureq::tls::ClientCert::new_with_certs(
        &[ureq::tls::Certificate::from_pem(client_pem.as_bytes()).expect("pem")],
        ureq::tls::PrivateKey::from_pem(client_key.as_bytes()).expect("key"),
    );
    let with = ureq::tls::TlsConfig::builder().root_certs(server_ca()).client_cert(Some(client)).build();
    let url = format!("https://{}/v1/metrics", p.http);
    let a = http_post(&agent(Some(with)), &url, req("mtls-http", &[("loss", Some(1), 2.0)]).encode_to_vec(), None).expect("POST");
    assert_eq!(a.0, 200, "{a:?}");
    let without = ureq::tls::TlsConfig::builder().root_certs(server_ca()).build();
    let refused = http_post(&agent(Some(without)), &url, req("anon-http", &[("loss", Some(1), 9.0)]).encode_to_vec(), None);
    assert!(refused.is_err(), "a client without a certificate must be refused: {refused:?}");
    let (report, log) = p.stop();
    assert!(report.contains("tensorboard: received 2 delivered 2 dropped 0"), "{report}");
    assert!(log.contains("tls on (mutual"), "{log}");
    assert_eq!(run_dirs(&dir.path().join("tb")), ["mtls-grpc", "mtls-http"]);
    let tb = read_tb(&dir.path().join("tb"), Loader::Python);
    assert_eq!(tb.scalars["mtls-grpc"]["loss"], vec![(1, 1.0)]);
    assert_eq!(tb.scalars["mtls-http"]["loss"], vec![(1, 2.0)]);
}

#[test]
fn tls_and_auth_problems_are_listed_by_validate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = write(dir.path(), "garbage.pem", "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n");
    let (cert_pem, _) = server_cert();
    let (_, other_key) = server_cert();
    let cert = write(dir.path(), "server.pem", &cert_pem);
    let wrong_key = write(dir.path(), "other.key", &other_key);
    let empty_token = write(dir.path(), "token", "\n");
    let config = write(
        dir.path(),
        "c.yaml",
        &format!(
            "receivers:\n  otlp:\n    auth: {{bearer_token_file: {}}}\n    protocols:\n      grpc: {{tls: {{cert_file: {}, key_file: /nonexistent/server.key}}, rate_limit: {{requests_per_second: 0}}}}\n      http: {{tls: {{cert_file: {}, key_file: {}}}}}\nexporters: {{tensorboard: {{}}}}\n",
            empty_token.display(),
            garbage.display(),
            cert.display(),
            wrong_key.display()
        ),
    );
    let out = Command::new(trainmetrics_bin()).arg("validate").arg("--config").arg(&config).output().expect("validate");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    for needle in [
        "receivers.otlp.auth.bearer_token_file: ",
        "is empty",
        "receivers.otlp.protocols.grpc.tls.cert_file: ",
        "receivers.otlp.protocols.grpc.tls.key_file: cannot read /nonexistent/server.key",
        "receivers.otlp.protocols.grpc.rate_limit.requests_per_second: must be at least 1",
        "receivers.otlp.protocols.http.tls: the certificate and key do not make a TLS identity",
    ] {
        assert!(text.contains(needle), "{needle:?} missing in {text}");
    }
}

#[test]
fn bearer_token_is_required_on_both_protocols_and_rejections_are_logged_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = write(dir.path(), "token", "  right-t0ken\n");
    let sets = ["--set".to_string(), format!("receivers.otlp.auth.bearer_token_file={}", token.display())];
    let p = serve(dir.path(), &sets, &[]);
    let rt = rt();
    rt.block_on(async {
        let ch = plain_channel(&p.grpc).await;
        grpc_export(ch.clone(), req("auth-grpc", &[("loss", Some(1), 1.0)]), Some("Bearer right-t0ken")).await.expect("right token");
        for (auth, run) in [(Some("Bearer wrong-t0ken"), "intruder-grpc"), (None, "intruder-grpc"), (Some("Basic cmlnaHQtdDBrZW4="), "intruder-grpc")] {
            let e = grpc_export(ch.clone(), req(run, &[("loss", Some(1), 9.0)]), auth).await.expect_err("must be refused");
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{auth:?}: {e:?}");
        }
    });
    let url = format!("http://{}/v1/metrics", p.http);
    let a = agent(None);
    let ok = http_post(&a, &url, req("auth-http", &[("loss", Some(1), 2.0)]).encode_to_vec(), Some("Bearer right-t0ken")).expect("POST");
    assert_eq!(ok.0, 200, "{ok:?}");
    for auth in [Some("Bearer wrong-t0ken"), None, Some("Bearer right-t0ken-and-more")] {
        for _ in 0..5 {
            let r = http_post(&a, &url, req("intruder-http", &[("loss", Some(1), 9.0)]).encode_to_vec(), auth).expect("POST");
            assert_eq!(r.0, 401, "{auth:?}: {r:?}");
            assert_eq!(header(&r, "www-authenticate"), Some("Bearer"), "{r:?}");
        }
    }
    let metrics = agent(None).get(format!("http://{}/metrics", p.telemetry)).call().expect("scrape").body_mut().read_to_string().expect("text");
    for line in [
        "trainmetrics_receiver_requests_total{protocol=\"grpc\",outcome=\"unauthenticated\"} 3",
        "trainmetrics_receiver_requests_total{protocol=\"http\",outcome=\"unauthenticated\"} 15",
        "trainmetrics_receiver_requests_total{protocol=\"grpc\",outcome=\"ok\"} 1",
        "trainmetrics_receiver_requests_total{protocol=\"http\",outcome=\"ok\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line:?} missing in {metrics}");
    }
    let (report, log) = p.stop();
    assert!(report.contains("tensorboard: received 2 delivered 2 dropped 0"), "only authenticated points are received: {report}");
    assert_eq!(run_dirs(&dir.path().join("tb")), ["auth-grpc", "auth-http"], "no event file for refused runs");
    let tb = read_tb(&dir.path().join("tb"), Loader::Python);
    assert_eq!(tb.scalars["auth-grpc"]["loss"], vec![(1, 1.0)]);
    assert_eq!(tb.scalars["auth-http"]["loss"], vec![(1, 2.0)]);
    // Startup summary: auth on, by source, never the token.
    assert!(log.contains(&format!("auth bearer token from file {}", token.display())), "{log}");
    // 15 HTTP and 3 gRPC refusals: one warning per cause within LOG_EVERY, and at shutdown the
    // count of what the rate limit held back.
    assert_eq!(log.matches("OTLP/HTTP unauthenticated").count(), 2, "{log}");
    assert_eq!(log.matches("OTLP/gRPC unauthenticated").count(), 2, "{log}");
    assert!(log.contains("OTLP/HTTP unauthenticated: 14 more time(s)"), "{log}");
    assert!(log.contains("OTLP/gRPC unauthenticated: 2 more time(s)"), "{log}");
    assert!(!log.contains("right-t0ken") && !log.contains("wrong-t0ken"), "{log}");
}

/// A raw gRPC call to Export: `frame` is the length-prefixed message as sent (compressed or
/// not, per its flag byte). Returns the grpc-status and grpc-message.
async fn raw_grpc(addr: &str, frame: Vec<u8>, gzip: bool) -> (String, String) {
    use tonic::codegen::{http, Service};
    let mut ch = plain_channel(addr).await;
    let mut b = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if gzip {
        b = b.header("grpc-encoding", "gzip");
    }
    let request = b.body(tonic::body::Body::new(http_body_util::Full::new(prost::bytes::Bytes::from(frame)))).expect("request");
    std::future::poll_fn(|cx| ch.poll_ready(cx)).await.expect("ready");
    let resp = ch.call(request).await.expect("call");
    let h = resp.headers().clone();
    let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    (get("grpc-status"), get("grpc-message"))
}

fn frame(compressed: bool, body: &[u8]) -> Vec<u8> {
    let mut f = vec![u8::from(compressed)];
    f.extend_from_slice(&u32::try_from(body.len()).expect("len").to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// Peak resident memory of a process, KiB (Linux `VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn grpc_size_limits_refuse_large_messages_and_a_gzip_bomb_without_exhausting_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sets = ["--set".to_string(), "receivers.otlp.protocols.grpc.max_recv_msg_size_mib=1".to_string()];
    let p = serve(dir.path(), &sets, &[]);
    // 512 MiB of zeros, gzip'd to about half a MiB: under the 1 MiB limit as sent.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..512 {
        gz.write_all(&chunk).expect("gzip");
    }
    let bomb = gz.finish().expect("gzip");
    assert!(bomb.len() < 1 << 20, "the bomb must pass the limit as sent: {} bytes", bomb.len());
    let rt = rt();
    let (status, message) = rt.block_on(raw_grpc(&p.grpc, frame(true, &bomb), true));
    assert_eq!(status, (tonic::Code::ResourceExhausted as i32).to_string(), "{message}");
    assert!(message.contains("decompress"), "{message}");
    let peak = peak_rss_kib(p.child.id());
    eprintln!("peak RSS of serve after a 512 MiB gzip bomb: {peak} KiB");
    assert!(peak < 200 * 1024, "the bomb was not inflated: peak RSS {peak} KiB");
    // Over the limit as sent: refused before it is read.
    let big = vec![0x0a_u8; (1 << 20) + 10];
    // RESOURCE_EXHAUSTED without RetryInfo (tonic's own OUT_OF_RANGE would be retried).
    let (status, message) = rt.block_on(raw_grpc(&p.grpc, frame(false, &big), false));
    assert_eq!(status, (tonic::Code::ResourceExhausted as i32).to_string(), "{message}");
    let message = percent_encoding::percent_decode_str(&message).decode_utf8_lossy().into_owned();
    assert!(message.contains("decoded message length too large"), "{message}");
    // And the service goes on serving.
    let ok = rt.block_on(async { grpc_export(plain_channel(&p.grpc).await, req("after-bomb", &[("loss", Some(1), 4.0)]), None).await });
    ok.expect("export after the bomb");
    let metrics = agent(None).get(format!("http://{}/metrics", p.telemetry)).call().expect("scrape").body_mut().read_to_string().expect("text");
    assert!(metrics.lines().any(|l| l == "trainmetrics_receiver_requests_total{protocol=\"grpc\",outcome=\"invalid\"} 2"), "{metrics}");
    let (report, _) = p.stop();
    assert!(report.contains("tensorboard: received 1 delivered 1 dropped 0"), "{report}");
    let tb = read_tb(&dir.path().join("tb"), Loader::Python);
    assert_eq!(tb.scalars["after-bomb"]["loss"], vec![(1, 4.0)]);
}

#[test]
fn rate_limits_answer_429_and_resource_exhausted_with_retry_info() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sets = Vec::new();
    for proto in ["grpc", "http"] {
        sets.push("--set".to_string());
        sets.push(format!("receivers.otlp.protocols.{proto}.rate_limit={{requests_per_second: 1, burst: 3}}"));
    }
    let p = serve(dir.path(), &sets, &[]);
    // A full bucket allows the burst (3) at once; of the next 3, sent at once, at least one
    // must find it empty (it refills one per second).
    let rt = rt();
    let grpc: Vec<Result<(), tonic::Status>> = rt.block_on(async {
        let ch = plain_channel(&p.grpc).await;
        let mut out = Vec::new();
        for step in 1..=6 {
            out.push(grpc_export(ch.clone(), req("rl-grpc", &[("loss", Some(step), step as f64)]), None).await);
        }
        out
    });
    let a = agent(None);
    let url = format!("http://{}/v1/metrics", p.http);
    let http: Vec<Answer> = (1..=6)
        .map(|step| http_post(&a, &url, req("rl-http", &[("loss", Some(step), step as f64)]).encode_to_vec(), None).expect("POST"))
        .collect();
    assert!(grpc[..3].iter().all(Result::is_ok), "{grpc:?}");
    assert!(http[..3].iter().all(|r| r.0 == 200), "{http:?}");
    let refused: Vec<&tonic::Status> = grpc.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(!refused.is_empty(), "{grpc:?}");
    for s in &refused {
        use tonic_types::StatusExt;
        assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
        let delay = s.get_details_retry_info().and_then(|r| r.retry_delay).expect("RetryInfo");
        assert!(delay > std::time::Duration::ZERO && delay <= std::time::Duration::from_secs(1), "{delay:?}");
    }
    let throttled: Vec<&Answer> = http.iter().filter(|r| r.0 != 200).collect();
    assert!(!throttled.is_empty(), "{http:?}");
    for r in &throttled {
        assert_eq!(r.0, 429, "{r:?}");
        assert_eq!(header(r, "retry-after"), Some("1"), "{r:?}");
    }
    let delivered = |n: usize| -> Vec<(i64, f64)> { (1..=6).take(n).map(|s| (s, s as f64)).collect() };
    let (grpc_ok, http_ok) = (grpc.iter().filter(|r| r.is_ok()).count(), http.len() - throttled.len());
    let (report, log) = p.stop();
    assert!(report.contains(&format!("tensorboard: received {} delivered {0} dropped 0", grpc_ok + http_ok)), "{report}");
    assert!(log.contains("rate limit 1/s burst 3"), "{log}");
    let tb = read_tb(&dir.path().join("tb"), Loader::Python);
    let steps = |run: &str| tb.scalars[run]["loss"].clone();
    // The accepted requests are the first ones and whichever the refill let through.
    assert_eq!(steps("rl-grpc")[..3], delivered(3)[..], "{:?}", steps("rl-grpc"));
    assert_eq!(steps("rl-grpc").len(), grpc_ok);
    assert_eq!(steps("rl-http")[..3], delivered(3)[..]);
    assert_eq!(steps("rl-http").len(), http_ok);
}

#[test]
fn secrets_never_show_in_serve_or_validate_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let receiver_token = write(dir.path(), "receiver-token", "rcv-t0ken-7f3a\n");
    let mlflow_token = write(dir.path(), "mlflow-token", "mlf-t0ken-91c2\n");
    let uri = format!("http://user:s3cret-pw@127.0.0.1:{closed}");
    let config = |extra: &str| {
        format!(
            "shutdown_timeout: 2s\nreceivers:\n  otlp:\n    auth: {{bearer_token_file: {}}}\nexporters:\n  tensorboard: {{logdir: {}}}\n  mlflow/a: {{tracking_uri: \"http://127.0.0.1:{closed}\", token_file: {}, every_steps: 1, linger: 10ms, retry_on_failure: {{initial_interval: 100ms, max_interval: 200ms}}{extra}}}\n  mlflow/b: {{tracking_uri: \"{uri}\", every_steps: 1, linger: 10ms, retry_on_failure: {{initial_interval: 100ms, max_interval: 200ms}}}}\n",
            receiver_token.display(),
            dir.path().join("tb").display(),
            mlflow_token.display(),
        )
    };
    let good = write(dir.path(), "good.yaml", &config(""));
    let bad = write(dir.path(), "bad.yaml", &config(", timeout: 0s, password_file: /nonexistent/pw"));
    let secrets = ["rcv-t0ken-7f3a", "mlf-t0ken-91c2", "s3cret-pw", "dXNlcjpzM2NyZXQtcHc", "wrong-guess-5d1e"];
    let check = |what: &str, text: &str| {
        for s in secrets {
            assert!(!text.contains(s), "{what} shows the secret {s:?}:\n{text}");
        }
    };
    for (file, ok) in [(&good, true), (&bad, false)] {
        let out = Command::new(trainmetrics_bin()).arg("validate").arg("--config").arg(file).env("RUST_LOG", "debug").output().expect("validate");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.success(), ok, "{text}");
        if !ok {
            assert!(text.contains("exporters.mlflow/a.timeout") && text.contains("not both"), "{text}");
        }
        check("validate", &text);
    }
    let mut cmd = Command::new(trainmetrics_bin());
    let stderr = dir.path().join("serve.log");
    cmd.arg("serve")
        .arg("--config")
        .arg(&good)
        .args(["--set", "receivers.otlp.protocols.grpc.endpoint=127.0.0.1:0"])
        .args(["--set", "receivers.otlp.protocols.http.endpoint=127.0.0.1:0"])
        .args(["--set", "service.telemetry.endpoint=127.0.0.1:0"])
        .env("RUST_LOG", "debug")
        .env_remove("MLFLOW_TRACKING_URI")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"));
    let p = start(cmd, stderr);
    let rt = rt();
    rt.block_on(async {
        let ch = plain_channel(&p.grpc).await;
        grpc_export(ch.clone(), req("secret-run", &[("loss", Some(1), 1.0)]), Some("Bearer rcv-t0ken-7f3a")).await.expect("export");
        let e = grpc_export(ch, req("secret-run", &[("loss", Some(2), 2.0)]), Some("Bearer wrong-guess-5d1e")).await.expect_err("refused");
        check("the gRPC answer", e.message());
    });
    let a = agent(None);
    let url = format!("http://{}/v1/metrics", p.http);
    let r = http_post(&a, &url, req("secret-run", &[("loss", Some(3), 3.0)]).encode_to_vec(), Some("Bearer wrong-guess-5d1e")).expect("POST");
    assert_eq!(r.0, 401);
    check("the HTTP answer", &format!("{r:?}"));
    let r = http_post(&a, &url, req("secret-run", &[("loss", Some(2), 2.0)]).encode_to_vec(), Some("Bearer rcv-t0ken-7f3a")).expect("POST");
    assert_eq!(r.0, 200);
    for path in ["metrics", "health"] {
        let text = agent(None).get(format!("http://{}/{path}", p.telemetry)).call().expect("GET").body_mut().read_to_string().expect("text");
        check(path, &text);
    }
    let (out, log) = p.stop();
    // The run did reach the failing MLflow exporters (so their errors were logged and shown).
    assert!(out.contains("mlflow/a: received 2") && out.contains("mlflow/b: received 2"), "{out}");
    assert!(out.contains("last error"), "{out}");
    assert!(log.contains("DEBUG"), "the log ran at debug level: {log}");
    check("serve stdout", &out);
    check("serve stderr", &log);
}

/// The real OpenTelemetry Collector in front: its OTLP/gRPC exporter verifies our certificate
/// (`tls.ca_file`), sends the bearer token (`headers`), and retries batches our rate limit
/// refused (`RESOURCE_EXHAUSTED` with `RetryInfo` is retryable per the OTLP spec), so every
/// point lands.
#[test]
fn a_collector_delivers_over_tls_with_a_bearer_token_through_the_rate_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_pem, key_pem) = server_cert();
    let (cert, key) = (write(dir.path(), "server.pem", &cert_pem), write(dir.path(), "server.key", &key_pem));
    let token = write(dir.path(), "token", "collector-t0ken\n");
    let mut sets = tls_sets(&cert, &key, None);
    sets.extend([
        "--set".to_string(),
        format!("receivers.otlp.auth.bearer_token_file={}", token.display()),
        "--set".to_string(),
        "receivers.otlp.protocols.grpc.rate_limit={requests_per_second: 1, burst: 1}".to_string(),
    ]);
    let p = serve(dir.path(), &sets, &[]);
    let config = write(
        dir.path(),
        "collector.yaml",
        &format!(
            r#"receivers:
  otlp:
    protocols:
      grpc: {{endpoint: "${{env:OTELCOL_GRPC_ENDPOINT}}"}}
processors:
  batch: {{timeout: 100ms}}
exporters:
  otlp_grpc:
    endpoint: {}
    tls: {{ca_file: {}}}
    headers: {{authorization: "Bearer collector-t0ken"}}
    retry_on_failure: {{enabled: true, initial_interval: 100ms, max_interval: 1s, max_elapsed_time: 60s}}
service:
  pipelines:
    metrics: {{receivers: [otlp], processors: [batch], exporters: [otlp_grpc]}}
  telemetry:
    metrics:
      level: basic
      readers:
        - pull:
            exporter:
              prometheus: {{host: 127.0.0.1, port: "${{env:OTELCOL_METRICS_PORT}}"}}
"#,
            p.grpc,
            cert.display()
        ),
    );
    let collector = common::Collector::start_config(&config.display().to_string(), &[], Stdio::null());
    // Six batches about 250 ms apart: more than a 1/s rate limit with a burst of 1 admits.
    let rt = rt();
    rt.block_on(async {
        let ch = plain_channel(&collector.grpc).await;
        for step in 1..=6 {
            grpc_export(ch.clone(), req("via-collector", &[("loss", Some(step), step as f64)]), None).await.expect("to the collector");
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    });
    collector.wait_sent(6);
    let metrics = agent(None).get(format!("http://{}/metrics", p.telemetry)).call().expect("scrape").body_mut().read_to_string().expect("text");
    let count = |outcome: &str| -> u64 {
        let prefix = format!("trainmetrics_receiver_requests_total{{protocol=\"grpc\",outcome=\"{outcome}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    assert!(count("throttled") >= 1, "the rate limit must have refused some batch: {metrics}");
    assert!(count("ok") >= 1 && count("unauthenticated") == 0, "{metrics}");
    collector.stop();
    let (report, _) = p.stop();
    assert!(report.contains("tensorboard: received 6 delivered 6 dropped 0"), "{report}");
    let tb = read_tb(&dir.path().join("tb"), Loader::Python);
    assert_eq!(tb.scalars["via-collector"]["loss"], (1..=6).map(|s| (s, s as f64)).collect::<Vec<_>>());
}
