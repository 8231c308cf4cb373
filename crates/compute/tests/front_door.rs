//! The front door against a real `compute serve`: gRPC over h2c, Connect over HTTP/1.1, TLS, the HTTP
//! endpoints, and bad input of every kind, after each of which the server must keep serving.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::TestServer;
use compute_proto::chalk::server::v1::auth_service_client::AuthServiceClient;
use compute_proto::chalk::server::v1::team_service_client::TeamServiceClient;
use compute_proto::chalk::server::v1::{GetEnvRequest, GetTokenRequest, GetTokenResponse};
use http_body_util::{BodyExt, Full};
use prost::Message;
use tonic::metadata::MetadataValue;
use tonic::Code;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// One raw HTTP/1.1 exchange; returns the whole response.
fn http1_bytes(server: &TestServer, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// One raw HTTP/1.1 exchange; returns the whole response as text.
fn http1(server: &TestServer, request: &[u8]) -> String {
    String::from_utf8_lossy(&http1_bytes(server, request)).into_owned()
}

fn connect_post(server: &TestServer, path: &str, content_type: &str, body: &[u8], extra_headers: &str) -> String {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {content_type}\r\n\
         Connect-Protocol-Version: 1\r\nContent-Length: {}\r\n{extra_headers}\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    http1(server, &req)
}

fn body_of(resp: &str) -> &str {
    resp.split("\r\n\r\n").nth(1).unwrap_or("")
}

fn assert_healthy(server: &TestServer) {
    let resp = http1(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 200"), "server stopped serving: {resp}");
}

async fn channel(server: &TestServer) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(server.url.clone()).unwrap().connect().await.unwrap()
}

async fn token(server: &TestServer) -> String {
    let mut auth = AuthServiceClient::new(channel(server).await);
    auth.get_token(GetTokenRequest {
        client_id: server.client_id.clone(),
        client_secret: server.client_secret.clone(),
        grant_type: "client_credentials".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .access_token
}

#[test]
fn grpc_h2c_auth_and_gzip() {
    let server = TestServer::start("grpc", &[]);
    rt().block_on(async {
        let ch = channel(&server).await;
        let mut auth = AuthServiceClient::new(ch.clone()).send_compressed(tonic::codec::CompressionEncoding::Gzip);
        let resp = auth
            .get_token(GetTokenRequest {
                client_id: server.client_id.clone(),
                client_secret: server.client_secret.clone(),
                grant_type: "client_credentials".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.token_type, "Bearer");
        let env_id = resp.primary_environment.clone().unwrap();
        assert_eq!(resp.environment_id_to_name.get(&env_id).map(String::as_str), Some("default"));
        assert!(resp.expires_in > 30 * 86400, "tokens are long-lived by default");

        // Second call with scope, as the SDK does.
        let scoped = auth
            .get_token(GetTokenRequest {
                client_id: server.client_id.clone(),
                client_secret: server.client_secret.clone(),
                grant_type: "client_credentials".into(),
                scope: Some(format!("env:{env_id}")),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();

        let mut team = TeamServiceClient::new(ch.clone());
        let err = team.get_env(GetEnvRequest {}).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert!(err.message().contains("Bearer"), "{}", err.message());

        let mut req = tonic::Request::new(GetEnvRequest {});
        let bearer: MetadataValue<_> = format!("Bearer {}", scoped.access_token).parse().unwrap();
        req.metadata_mut().insert("authorization", bearer.clone());
        req.metadata_mut().insert("x-chalk-env-id", env_id.parse().unwrap());
        let env = team.get_env(req).await.unwrap().into_inner().environment.unwrap();
        assert_eq!((env.id.as_str(), env.name.as_str()), (env_id.as_str(), "default"));

        let mut req = tonic::Request::new(GetEnvRequest {});
        req.metadata_mut().insert("authorization", "Bearer not.a.token".parse().unwrap());
        assert_eq!(team.get_env(req).await.unwrap_err().code(), Code::Unauthenticated);

        let mut req = tonic::Request::new(GetEnvRequest {});
        req.metadata_mut().insert("authorization", bearer);
        req.metadata_mut().insert("x-chalk-env-id", "env-someone-else".parse().unwrap());
        let err = team.get_env(req).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

        let err = auth
            .get_token(GetTokenRequest {
                client_id: server.client_id.clone(),
                client_secret: "wrong".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(err.message().contains("invalid client credentials"), "{}", err.message());
    });
}

#[test]
fn unimplemented_methods_answer_promptly_naming_themselves() {
    let server = TestServer::start("unimpl", &[]);
    rt().block_on(async {
        let token = token(&server).await;
        let mut grpc = tonic::client::Grpc::new(channel(&server).await);
        grpc.ready().await.unwrap();
        use compute_proto::chalk::sandbox::v1::{ExecutePythonRequest, ExecutePythonResponse};
        let mut req = tonic::Request::new(futures_util::stream::iter([ExecutePythonRequest::default()]));
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        let path = http::uri::PathAndQuery::from_static("/chalk.sandbox.v1.SandboxRuntimeService/ExecutePython");
        let started = std::time::Instant::now();
        let err = grpc
            .streaming::<_, _, ExecutePythonResponse, _>(req, path, tonic_prost::ProstCodec::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented);
        assert!(err.message().contains("chalk.sandbox.v1.SandboxRuntimeService/ExecutePython"), "{}", err.message());
        // Not a performance bound: a generous limit that only a hang would exceed.
        assert!(started.elapsed() < Duration::from_secs(30));

        // A path we do not serve at all.
        grpc.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static("/chalk.nope.v1.Nope/Nope");
        let err = grpc
            .unary::<_, GetEnvRequest, _>(
                tonic::Request::new(GetEnvRequest {}),
                path,
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented);
        assert!(err.message().contains("/chalk.nope.v1.Nope/Nope"), "{}", err.message());
    });
}

#[test]
fn connect_unary_over_http1_proto_and_json() {
    let server = TestServer::start("connect", &[]);
    let req = GetTokenRequest {
        client_id: server.client_id.clone(),
        client_secret: server.client_secret.clone(),
        grant_type: "client_credentials".into(),
        ..Default::default()
    };
    let body = req.encode_to_vec();
    let mut request = format!(
        "POST /chalk.server.v1.AuthService/GetToken HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/proto\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let raw = http1_bytes(&server, &request);
    let resp = String::from_utf8_lossy(&raw).into_owned();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.to_ascii_lowercase().contains("content-type: application/proto"));
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let token = GetTokenResponse::decode(&raw[split..]).unwrap().access_token;
    assert_eq!(token.split('.').count(), 3);

    // JSON codec, gzip-compressed body.
    let json = format!(r#"{{"clientId":"{}","clientSecret":"{}"}}"#, server.client_id, server.client_secret);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(json.as_bytes()).unwrap();
    let resp = connect_post(
        &server,
        "/chalk.server.v1.AuthService/GetToken",
        "application/json",
        &gz.finish().unwrap(),
        "Content-Encoding: gzip\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let v: serde_json::Value = serde_json::from_str(body_of(&resp)).unwrap();
    assert!(v["accessToken"].as_str().unwrap().split('.').count() == 3, "{v}");

    // Errors use the Connect JSON error body and HTTP status.
    let resp = connect_post(
        &server,
        "/chalk.server.v1.AuthService/GetToken",
        "application/json",
        br#"{"clientId":"x","clientSecret":"y"}"#,
        "",
    );
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    let v: serde_json::Value = serde_json::from_str(body_of(&resp)).unwrap();
    assert_eq!(v["code"], "unauthenticated");

    let resp = connect_post(&server, "/chalk.server.v1.TeamService/GetEnv", "application/proto", b"", "");
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");

    let auth = format!("Authorization: Bearer {token}\r\n");
    let resp = connect_post(&server, "/chalk.server.v1.TeamService/GetEnv", "application/json", b"{}", &auth);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(body_of(&resp).contains("\"default\""), "{resp}");

    // A streaming method over Connect unary: refused, naming the method and the transport that carries it.
    let resp =
        connect_post(&server, "/chalk.sandbox.v1.SandboxRuntimeService/ExecutePython", "application/proto", b"", &auth);
    assert!(resp.starts_with("HTTP/1.1 501"), "{resp}");
    let v: serde_json::Value = serde_json::from_str(body_of(&resp)).unwrap();
    assert_eq!(v["code"], "unimplemented");
    let message = v["message"].as_str().unwrap();
    assert!(message.contains("SandboxRuntimeService/ExecutePython") && message.contains("gRPC"), "{message}");

    let resp = connect_post(&server, "/chalk.server.v1.TeamService/GetEnv", "application/json", b"{not json", &auth);
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(body_of(&resp).contains("invalid_argument"), "{resp}");

    let resp = connect_post(&server, "/chalk.server.v1.TeamService/GetEnv", "text/plain", b"hi", &auth);
    assert!(resp.starts_with("HTTP/1.1 415"), "{resp}");

    let resp =
        connect_post(&server, "/chalk.sandbox.v2.SandboxProcessService/OpenSession", "application/proto", b"", &auth);
    assert!(body_of(&resp).contains("streaming method"), "{resp}");

    // who-am-i, as the native volume client calls it.
    let resp =
        http1(&server, format!("GET /v1/who-am-i HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n").as_bytes());
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let v: serde_json::Value = serde_json::from_str(body_of(&resp)).unwrap();
    assert_eq!(v["user"], server.client_id.as_str());
    assert!(v["environment_id"].as_str().unwrap().starts_with("env-"));
    let resp = http1(&server, b"GET /v1/who-am-i HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
}

#[test]
fn bad_input_gets_protocol_errors_and_the_server_keeps_serving() {
    let server = TestServer::start("badinput", &["--max-message-size", "1MiB"]);

    // Garbage bytes instead of any protocol.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"\x00\x01\x02garbage\xff\xfe\r\n\r\n").unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 400"), "{text}");
    assert_healthy(&server);

    // A broken HTTP/2 preface.
    // (The server waits for the rest of the claimed frame; the client gives up after a second.)
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\xff\x04\x00\x00\x00\x00\x00garbage-frames").unwrap();
    let _ = s.read_to_end(&mut Vec::new());
    assert_healthy(&server);

    // gRPC content over HTTP/1.1.
    let resp = connect_post(&server, "/chalk.server.v1.AuthService/GetToken", "application/grpc", b"\0\0\0\0\0", "");
    assert!(resp.starts_with("HTTP/1.1 505"), "{resp}");
    assert!(resp.contains("HTTP/2"), "{resp}");
    // An HTTP/1.1 GET of a gRPC path.
    let resp =
        http1(&server, b"GET /chalk.server.v1.AuthService/GetToken HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 4") || resp.starts_with("HTTP/1.1 5"), "{resp}");

    // Bytes that are not the method's message: the caller's error, not ours.
    let resp =
        connect_post(&server, "/chalk.server.v1.AuthService/GetToken", "application/proto", b"\xff\xff\xff\x0f", "");
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(body_of(&resp).contains("invalid_argument") && body_of(&resp).contains("GetTokenRequest"), "{resp}");

    // Oversized Connect request.
    let big = vec![b'a'; 2 << 20];
    let resp = connect_post(&server, "/chalk.server.v1.AuthService/GetToken", "application/proto", &big, "");
    assert!(resp.starts_with("HTTP/1.1 429"), "{resp}");
    assert!(body_of(&resp).contains("resource_exhausted"), "{resp}");
    assert_healthy(&server);

    rt().block_on(async {
        // Oversized gRPC message.
        let mut auth = AuthServiceClient::new(channel(&server).await);
        let err =
            auth.get_token(GetTokenRequest { client_id: "x".repeat(2 << 20), ..Default::default() }).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

        // A frame that claims gzip but is not.
        let (code, message) =
            raw_grpc(&server, "/chalk.server.v1.AuthService/GetToken", true, b"this is not gzip").await;
        assert_ne!(code, 0, "a malformed gzip frame must fail");
        assert!(!message.is_empty());
        // A frame that claims gzip without the grpc-encoding header: a protocol error too.
        // A truncated frame (length says 100, 3 bytes follow).
        let (code, _) = raw_grpc_bytes(
            &server,
            "/chalk.server.v1.AuthService/GetToken",
            None,
            Bytes::from_static(b"\0\0\0\0\x64abc"),
        )
        .await;
        assert_ne!(code, 0);

        // And the server still answers properly.
        let t = token(&server).await;
        assert!(!t.is_empty());
    });
    assert_healthy(&server);
}

/// One gRPC call with a hand-made body over a fresh h2c connection; returns (grpc-status, grpc-message).
async fn raw_grpc(server: &TestServer, path: &str, compressed: bool, payload: &[u8]) -> (i32, String) {
    let mut framed = BytesMut::new();
    framed.put_u8(u8::from(compressed));
    framed.put_u32(payload.len() as u32);
    framed.put_slice(payload);
    raw_grpc_bytes(server, path, Some("gzip"), framed.freeze()).await
}

async fn raw_grpc_bytes(server: &TestServer, path: &str, encoding: Option<&str>, body: Bytes) -> (i32, String) {
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("{}{path}", server.url))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(enc) = encoding {
        req = req.header("grpc-encoding", enc);
    }
    let resp = send.send_request(req.body(Full::new(body)).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let get =
        |name: &str| parts.headers.get(name).or_else(|| trailers.get(name)).map(|v| v.to_str().unwrap().to_string());
    (get("grpc-status").unwrap_or_default().parse().unwrap_or(-1), get("grpc-message").unwrap_or_default())
}

#[test]
fn tls_on_the_same_port() {
    let dir = common::temp_dir("tls");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ok = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is needed to make a test certificate");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let server =
        TestServer::start_in(dir.clone(), &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    let https = format!("https://127.0.0.1:{}", server.addr.port());
    // HTTP/2 negotiated by ALPN.
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--cacert",
            cert.to_str().unwrap(),
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
        ])
        .arg(format!("{https}/healthz"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200", "{}", String::from_utf8_lossy(&out.stderr));
    // Connect over TLS with HTTP/1.1.
    let body = format!(r#"{{"clientId":"{}","clientSecret":"{}"}}"#, server.client_id, server.client_secret);
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--cacert",
            cert.to_str().unwrap(),
            "--http1.1",
            "-H",
            "content-type: application/json",
            "-d",
            &body,
        ])
        .arg(format!("{https}/chalk.server.v1.AuthService/GetToken"))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["accessToken"].is_string(), "{v}");
    // Cleartext still works on the same port.
    assert_healthy(&server);
}

#[test]
fn metrics_count_requests_and_errors() {
    let server = TestServer::start("metrics", &[]);
    rt().block_on(async {
        token(&server).await;
        let mut auth = AuthServiceClient::new(channel(&server).await);
        let _ = auth.get_token(GetTokenRequest { client_id: "nobody".into(), ..Default::default() }).await;
    });
    let resp = http1(&server, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let body = body_of(&resp);
    assert!(
        body.contains(
            r#"compute_api_requests_total{method="/chalk.server.v1.AuthService/GetToken",protocol="grpc",code="OK"} 1"#
        ),
        "{body}"
    );
    assert!(body.contains(r#"code="UNAUTHENTICATED"} 1"#), "{body}");
    assert!(body.contains("compute_api_request_duration_seconds_bucket"), "{body}");
    assert!(body.contains("compute_api_in_flight_requests 0"), "{body}");
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let mut server = TestServer::start("sigterm", &[]);
    assert_healthy(&server);
    let status = server.stop();
    assert!(status.success(), "exit status {status:?}");
    assert!(!server.data_dir.join("server.json").exists(), "server.json is removed on a clean shutdown");
    // A restart on the same data directory keeps the same admin credentials and works.
    let again = TestServer::start_in(server.data_dir.clone(), &[]);
    assert_eq!(again.client_id, server.client_id);
    assert_healthy(&again);
}

/// Reads until the server closes the connection (or `within` passes); true if it closed it.
fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn server_closed(server: &TestServer, reason: &str) -> u64 {
    let metrics = http1(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let key = format!("compute_api_connections_closed_by_server_total{{reason=\"{reason}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(key.as_str())).map(|n| n.trim().parse().unwrap()).unwrap_or(0)
}

#[test]
fn a_connection_that_sends_no_whole_request_in_time_is_closed() {
    let server = TestServer::start("slowloris", &["--request-header-timeout", "1s"]);
    // Half a request line, a silent socket, and half an HTTP/2 preface: none becomes a request.
    let mut half = TcpStream::connect(server.addr).unwrap();
    half.write_all(b"GET /healthz HT").unwrap();
    let mut silent = TcpStream::connect(server.addr).unwrap();
    let mut preface = TcpStream::connect(server.addr).unwrap();
    preface.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
    for (name, s) in [("half request", &mut half), ("silent", &mut silent), ("half preface", &mut preface)] {
        assert!(closed_by_server(s, Duration::from_secs(20)), "the {name} connection was left open");
    }
    assert_eq!(server_closed(&server, "slow_request"), 3);
    // A connection that did send its request is served as always, and kept alive afterwards.
    let mut ok = TcpStream::connect(server.addr).unwrap();
    ok.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 512];
    ok.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let n = ok.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert_healthy(&server);
}

#[test]
fn a_connection_past_max_connections_is_closed_at_once_and_counted() {
    let server = TestServer::start("connlimit", &["--max-connections", "2", "--request-header-timeout", "30s"]);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 512];
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert!(s.read(&mut buf).unwrap() > 0);
        held.push(s);
    }
    let mut third = TcpStream::connect(server.addr).unwrap();
    let _ = third.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(closed_by_server(&mut third, Duration::from_secs(10)), "a third connection was served past the limit");
    drop(held.pop());
    // The freed place serves again (the count is read over it).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server_closed(&server, "over_limit") == 0 {
        assert!(std::time::Instant::now() < deadline, "the refusal was not counted");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn post(server: &TestServer, path: &str, content_type: &str, body: &str, extra: &str) -> (u16, serde_json::Value) {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    );
    let resp = http1(server, req.as_bytes());
    let code = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, serde_json::from_str(body_of(&resp)).unwrap_or(serde_json::Value::Null))
}

#[test]
fn the_oauth_token_endpoint_exchanges_client_credentials_as_oauth_clients_expect() {
    use base64::Engine as _;
    let server = TestServer::start("oauth", &[]);
    let (id, secret) = (server.client_id.clone(), server.client_secret.clone());
    let body = format!(r#"{{"client_id":"{id}","client_secret":"{secret}","grant_type":"client_credentials"}}"#);
    let (code, v) = post(&server, "/v1/oauth/token", "application/json", &body, "");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["token_type"], "Bearer");
    assert!(v["expires_in"].as_i64().unwrap() > 0);
    let token = v["access_token"].as_str().unwrap().to_string();
    // The token is the API's own.
    let whoami = http1(
        &server,
        format!("GET /v1/who-am-i HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\r\n")
            .as_bytes(),
    );
    assert!(whoami.starts_with("HTTP/1.1 200") && whoami.contains(&id), "{whoami}");
    // A form, and HTTP Basic credentials, as OAuth libraries send them.
    let form = format!("grant_type=client_credentials&client_id={id}&client_secret={secret}");
    assert_eq!(post(&server, "/v1/oauth/token", "application/x-www-form-urlencoded", &form, "").0, 200);
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
    let (code, _) = post(
        &server,
        "/v1/oauth/token",
        "application/x-www-form-urlencoded",
        "grant_type=client_credentials",
        &format!("Authorization: Basic {basic}\r\n"),
    );
    assert_eq!(code, 200);
    // OAuth's errors.
    let wrong = format!(r#"{{"client_id":"{id}","client_secret":"nope","grant_type":"client_credentials"}}"#);
    let (code, v) = post(&server, "/v1/oauth/token", "application/json", &wrong, "");
    assert_eq!((code, v["error"].as_str()), (401, Some("invalid_client")), "{v}");
    let grant = format!(r#"{{"client_id":"{id}","client_secret":"{secret}","grant_type":"password"}}"#);
    let (code, v) = post(&server, "/v1/oauth/token", "application/json", &grant, "");
    assert_eq!((code, v["error"].as_str()), (400, Some("unsupported_grant_type")), "{v}");
    let scope = format!(
        r#"{{"client_id":"{id}","client_secret":"{secret}","grant_type":"client_credentials","scope":"env:nowhere"}}"#
    );
    let (code, v) = post(&server, "/v1/oauth/token", "application/json", &scope, "");
    assert_eq!((code, v["error"].as_str()), (400, Some("invalid_scope")), "{v}");
    let (code, v) = post(&server, "/v1/oauth/token", "application/json", "{}", "");
    assert_eq!((code, v["error"].as_str()), (400, Some("unsupported_grant_type")), "{v}");
    let resp = http1(&server, b"GET /v1/oauth/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 405"), "{resp}");
}
