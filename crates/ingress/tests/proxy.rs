//! The ingress against real upstream servers on loopback: HTTP/1.1 and HTTP/2 (with trailers, as gRPC needs),
//! forwarded and hop-by-hop headers, the least busy replica, and the 503s the SDK retries.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use compute_ingress::{ColdPolicy, GroupRoute, Ingress, RouteSettings, UpstreamProtocol};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type UpstreamBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Echoes what the upstream saw (its name, method, path and query, version, then the headers).
async fn echo(name: &'static str, req: Request<Incoming>) -> Result<Response<UpstreamBody>, Infallible> {
    let mut headers: Vec<String> =
        req.headers().iter().map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?"))).collect();
    headers.sort();
    let text = format!("{name} {} {} {:?}\n{}", req.method(), req.uri(), req.version(), headers.join("\n"));
    if req.uri().path() == "/slow" {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if req.uri().path().starts_with("/pkg.Svc/") {
        // A body, then trailers, as a gRPC server answers.
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames = vec![Ok::<_, Infallible>(Frame::data(Bytes::from(text))), Ok(Frame::trailers(trailers))];
        let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
        return Ok(Response::builder().header("content-type", "application/grpc").body(body).unwrap());
    }
    Ok(Response::builder()
        .header("connection", "x-hop")
        .header("x-hop", "must not pass")
        .body(Full::new(Bytes::from(text)).boxed())
        .unwrap())
}

async fn upstream(name: &'static str, h2: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service_fn(move |req| echo(name, req));
            tokio::spawn(async move {
                let io = TokioIo::new(stream);
                let _ = if h2 {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, service).await
                } else {
                    hyper::server::conn::http1::Builder::new().serve_connection(io, service).await
                };
            });
        }
    });
    addr
}

fn route(protocol: UpstreamProtocol, cold: ColdPolicy) -> Arc<GroupRoute> {
    GroupRoute::new("env-1", RouteSettings { protocol, authenticated: false, cold })
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .uri(format!("http://front.example:8420/sg/default/api{path}"))
        .header("host", "front.example:8420")
        .header("connection", "x-private")
        .header("x-private", "hop-by-hop")
        .header("x-custom", "kept")
        .body(Empty::new())
        .unwrap()
}

async fn text(resp: Response<compute_ingress::IngressBody>) -> (StatusCode, String) {
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn http1_replicas_get_the_path_forwarded_headers_and_no_hop_by_hop_ones() {
    let ingress = Ingress::new();
    let r = route(UpstreamProtocol::Http1, ColdPolicy::Error);
    ingress.insert("default", "api", r.clone());
    r.set_replicas(vec![("a".into(), upstream("a", false).await)]);
    let (route, key, rest) = ingress.lookup("default/api/items/7").unwrap();
    assert!(Arc::ptr_eq(&route, &r));
    assert_eq!((key, rest), ("default/api", "/items/7"));
    assert_eq!(ingress.lookup("default/api").map(|(_, k, r)| (k, r)), Some(("default/api", "")));
    assert!(ingress.lookup("default/other/x").is_none());
    assert!(ingress.lookup("default").is_none());

    let resp = ingress.proxy(&r, Some("/sg/default/api"), "/items/7?q=1", get("/items/7?q=1")).await;
    assert!(resp.headers().get("x-hop").is_none(), "a header the replica named in Connection stays behind");
    let (status, body) = text(resp).await;
    assert_eq!(status, StatusCode::OK);
    let mut lines = body.lines();
    assert_eq!(lines.next(), Some("a GET /items/7?q=1 HTTP/1.1"));
    let headers: Vec<&str> = lines.collect();
    for want in [
        "host: front.example:8420",
        "x-custom: kept",
        "x-forwarded-host: front.example:8420",
        "x-forwarded-prefix: /sg/default/api",
        "x-forwarded-proto: http",
    ] {
        assert!(headers.contains(&want), "{want} missing from {headers:?}");
    }
    assert!(!headers.iter().any(|h| h.starts_with("x-private") || h.starts_with("connection")), "{headers:?}");
    assert_eq!(r.in_flight(), 0, "the request stopped counting when its body ended");
}

#[tokio::test]
async fn h2c_replicas_get_http2_and_their_trailers_come_back() {
    let ingress = Ingress::new();
    let r = route(UpstreamProtocol::H2c, ColdPolicy::Error);
    ingress.insert("default", "grpc", r.clone());
    r.set_replicas(vec![("g".into(), upstream("g", true).await)]);
    let req = Request::builder()
        .method("POST")
        .uri("http://front.example/sg/default/grpc/pkg.Svc/Call")
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let resp = ingress.proxy(&r, Some("/sg/default/grpc"), "/pkg.Svc/Call", req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers pass through");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    let body = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
    assert!(body.starts_with("g POST http://"), "{body}");
    assert!(body.contains("/pkg.Svc/Call HTTP/2.0"), "{body}");
    assert!(body.contains("te: trailers"), "{body}");
}

#[tokio::test]
async fn requests_go_to_the_least_busy_replica() {
    let ingress = Arc::new(Ingress::new());
    let r = route(UpstreamProtocol::Http1, ColdPolicy::Error);
    r.set_replicas(vec![("a".into(), upstream("a", false).await), ("b".into(), upstream("b", false).await)]);
    // Four slow requests at once spread two and two; then a quick one finds either idle.
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let (ingress, r) = (ingress.clone(), r.clone());
            tokio::spawn(
                async move { text(ingress.proxy(&r, Some("/sg/default/api"), "/slow", get("/slow")).await).await },
            )
        })
        .collect();
    let mut by = std::collections::HashMap::new();
    for s in slow {
        let (status, body) = s.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        *by.entry(body[..1].to_string()).or_insert(0) += 1;
    }
    assert_eq!(by.get("a"), Some(&2), "{by:?}");
    assert_eq!(by.get("b"), Some(&2), "{by:?}");
}

#[tokio::test]
async fn no_replica_and_a_dead_replica_answer_the_503s_the_sdk_retries() {
    let ingress = Ingress::new();
    let cold = route(UpstreamProtocol::Http1, ColdPolicy::Error);
    let (status, body) = text(ingress.proxy(&cold, Some("/sg/default/api"), "/", get("/")).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("scaling up from zero"), "{body}");
    assert_eq!(cold.take_starved(), 1, "the supervisor hears of the demand");

    let held = route(UpstreamProtocol::Http1, ColdPolicy::Hold(Duration::from_millis(200)));
    let (status, body) = text(ingress.proxy(&held, Some("/sg/default/api"), "/", get("/")).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("no healthy upstream"), "{body}");

    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gone = route(UpstreamProtocol::Http1, ColdPolicy::Error);
    gone.set_replicas(vec![("d".into(), dead)]);
    let (status, body) = text(ingress.proxy(&gone, Some("/sg/default/api"), "/", get("/")).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("upstream connect error") && body.contains("replica d"), "{body}");

    // A held request is answered when its group goes away.
    let closing = route(UpstreamProtocol::Http1, ColdPolicy::Hold(Duration::from_secs(30)));
    ingress.insert("default", "closing", closing.clone());
    let waiter = {
        let closing = closing.clone();
        tokio::spawn(async move {
            let ingress = Ingress::new();
            text(ingress.proxy(&closing, Some("/sg/default/closing"), "/", get("/")).await).await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    ingress.remove("default", "closing", &closing);
    let (status, body) = waiter.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("deleted"), "{body}");
    assert!(ingress.lookup("default/closing/").is_none());
}

/// An HTTP/1.1 server that upgrades `/ws` to a byte echo.
async fn upgrading_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service_fn(|mut req: Request<Incoming>| async move {
                let on = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    let mut io = TokioIo::new(on.await.unwrap());
                    let mut buf = [0u8; 64];
                    loop {
                        let n = tokio::io::AsyncReadExt::read(&mut io, &mut buf).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        tokio::io::AsyncWriteExt::write_all(&mut io, &buf[..n]).await.unwrap();
                    }
                });
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::SWITCHING_PROTOCOLS)
                        .header("connection", "upgrade")
                        .header("upgrade", req.headers()["upgrade"].clone())
                        .body(Empty::<Bytes>::new())
                        .unwrap(),
                )
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upgrade_becomes_a_tunnel_to_the_replica() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ingress = Arc::new(Ingress::new());
    let r = route(UpstreamProtocol::Http1, ColdPolicy::Error);
    r.set_replicas(vec![("w".into(), upgrading_upstream().await)]);
    // The front: a real HTTP/1.1 server (with upgrades) that hands every request to the ingress.
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    {
        let (ingress, r) = (ingress.clone(), r.clone());
        tokio::spawn(async move {
            let (stream, _) = front.accept().await.unwrap();
            let service = service_fn(move |req: Request<Incoming>| {
                let (ingress, r) = (ingress.clone(), r.clone());
                async move { Ok::<_, Infallible>(ingress.proxy(&r, Some("/sg/default/ws"), "/ws", req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
    let mut conn = tokio::net::TcpStream::connect(front_addr).await.unwrap();
    conn.write_all(b"GET /sg/default/ws/ws HTTP/1.1\r\nHost: front\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        conn.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    assert_eq!(r.in_flight(), 1, "an open tunnel counts as a request in flight");
    for msg in [&b"ping"[..], b"two way"] {
        conn.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        conn.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
    drop(conn);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while r.in_flight() > 0 {
        assert!(std::time::Instant::now() < deadline, "the tunnel's end was not noticed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
