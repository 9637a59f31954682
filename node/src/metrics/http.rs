//! A minimal HTTP/1.1 responder for the metrics endpoints.
//!
//! Three read-only pages do not need a web framework: each connection sends
//! one GET (or HEAD), gets one response, and is closed. The request head is
//! bounded in size and time, and so is the number of connections served at
//! once, so a misbehaving client cannot hold the node's memory or tasks.
//!
//! A server bound to loopback answers only requests addressed to a loopback
//! name (see [`HostGuard`]): otherwise any web page the node's user opens
//! could read the status page through DNS rebinding.

use super::Metrics;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::debug;

/// Largest request head accepted; metrics clients send a few hundred bytes.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// How long a client may take to send its request and read the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; further ones are closed straight away.
pub const MAX_CONNECTIONS: usize = 32;

/// The status page, self-contained: inline CSS, JS and SVG, nothing fetched from elsewhere.
pub const STATUS_PAGE: &str = include_str!("status.html");

/// Why the metrics server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound (in use, not ours, no permission).
    #[error("cannot serve metrics on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
}

/// Binds `addr` and serves `metrics` on it from a background task; returns
/// the bound address (useful when `addr` has port 0).
pub async fn serve(addr: SocketAddr, metrics: Metrics) -> Result<SocketAddr, ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    let guard = HostGuard::for_listener(bound);
    tokio::spawn(accept_loop(listener, metrics, guard));
    Ok(bound)
}

/// Which `Host` headers a request may carry.
///
/// A web page can make the browser of the node's user send requests to a
/// name of the attacker's that resolves first to the attacker's server and
/// then to 127.0.0.1 (DNS rebinding); the browser then lets the page read
/// the answers. Such requests carry the attacker's name in `Host`. A server
/// on loopback is only meant for the machine itself, so it refuses any name
/// but `localhost` and loopback addresses. A server bound to another address
/// is meant to be reached by name (a Prometheus scrape target, a reverse
/// proxy) and takes any `Host`: whoever can rebind a name to it can reach
/// it directly anyway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostGuard {
    /// Only `localhost` (and its subdomains) and loopback IP addresses.
    LoopbackNames,
    /// Any `Host`.
    AnyName,
}

impl HostGuard {
    /// The guard for a server bound to `addr`.
    pub fn for_listener(addr: SocketAddr) -> HostGuard {
        if addr.ip().is_loopback() {
            HostGuard::LoopbackNames
        } else {
            HostGuard::AnyName
        }
    }

    /// Whether a request whose head is `head` may be answered: it names an
    /// allowed host, or none (clients that omit `Host` are not browsers).
    fn allows(self, head: &[u8]) -> bool {
        match self {
            HostGuard::AnyName => true,
            HostGuard::LoopbackNames => host_header(head).is_none_or(is_loopback_host),
        }
    }
}

/// The value of the request's `Host` header, if it has one.
fn host_header(head: &[u8]) -> Option<String> {
    head.split(|b| *b == b'\n').skip(1).find_map(|line| {
        let line = String::from_utf8_lossy(line);
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("host")
            .then(|| value.trim().to_string())
    })
}

/// Whether `host` (a `Host` header value, with or without a port) names this
/// machine's loopback interface.
fn is_loopback_host(host: String) -> bool {
    let name = match host.strip_prefix('[') {
        // An IPv6 literal: `[::1]` or `[::1]:9100`.
        Some(rest) => match rest.split_once(']') {
            Some((ip, port)) if port.is_empty() || port.starts_with(':') => ip,
            _ => return false,
        },
        None => host
            .rsplit_once(':')
            .map_or(host.as_str(), |(name, _)| name),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn accept_loop(listener: TcpListener, metrics: Metrics, guard: HostGuard) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "too many metrics connections; closed");
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if tokio::time::timeout(IO_TIMEOUT, handle(stream, &metrics, guard))
                .await
                .is_err()
            {
                debug!(%peer, "metrics client too slow; closed");
            }
            drop(permit);
        });
    }
}

/// A response: status line, content type and body.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code and reason, e.g. `200 OK`.
    pub status: &'static str,
    /// Content-Type header value.
    pub content_type: &'static str,
    /// The body (empty for HEAD requests once sent).
    pub body: Vec<u8>,
}

impl Response {
    fn text(status: &'static str, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
        }
    }
}

async fn handle(mut stream: TcpStream, metrics: &Metrics, guard: HostGuard) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let mut scanned = 0;
    let head_end = loop {
        if let Some(end) = find_head_end(&buf, scanned) {
            break Some(end);
        }
        // What was searched stays searched: a head sent a byte at a time
        // costs one pass, not one per byte.
        scanned = buf.len();
        if buf.len() >= MAX_REQUEST_BYTES {
            break None;
        }
        let room = (MAX_REQUEST_BYTES - buf.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let (response, head_only) = match head_end {
        Some(end) => respond(&buf[..end], metrics, guard),
        None => (
            Response::text("431 Request Header Fields Too Large", "request too large\n"),
            false,
        ),
    };
    let header = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    let _ = stream.write_all(header.as_bytes()).await;
    if !head_only {
        let _ = stream.write_all(&response.body).await;
    }
    let _ = stream.shutdown().await;
}

/// Where the request head in `buf` ends (at its blank line: `\r\n\r\n`, or a
/// bare `\n\n` from a lax client), looking only at what follows the first
/// `from` bytes (already searched) and the few before them.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    let rest = buf.get(start..)?;
    let crlf = rest.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = rest.windows(2).position(|w| w == b"\n\n");
    let end = match (crlf, lf) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    Some(start + end)
}

/// Answers one request head; the flag says the body must not be sent (HEAD).
pub fn respond(head: &[u8], metrics: &Metrics, guard: HostGuard) -> (Response, bool) {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return (
            Response::text("400 Bad Request", "bad request line\n"),
            false,
        );
    };
    if !version.starts_with("HTTP/1.") {
        return (
            Response::text("505 HTTP Version Not Supported", "HTTP/1.x only\n"),
            false,
        );
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            return (
                Response::text("405 Method Not Allowed", "GET or HEAD only\n"),
                false,
            )
        }
    };
    if !guard.allows(head) {
        return (
            Response::text(
                "403 Forbidden",
                "this server listens on loopback and answers only requests to localhost or a \
                 loopback address (the Host header); a reverse proxy in front of it should \
                 send Host: localhost\n",
            ),
            head_only,
        );
    }
    let path = target.split('?').next().unwrap_or_default();
    let response = match path {
        "/" | "/index.html" => Response {
            status: "200 OK",
            content_type: "text/html; charset=utf-8",
            body: STATUS_PAGE.as_bytes().to_vec(),
        },
        "/metrics" => Response {
            status: "200 OK",
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: metrics.prometheus_body(),
        },
        "/status.json" => match metrics.status_body() {
            Ok(body) => Response {
                status: "200 OK",
                content_type: "application/json",
                body,
            },
            Err(e) => Response::text("500 Internal Server Error", &format!("{e}\n")),
        },
        _ => Response::text(
            "404 Not Found",
            "not found; try /, /metrics or /status.json\n",
        ),
    };
    (response, head_only)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_refusals() {
        let m = Metrics::new();
        let status = |head: &str| respond(head.as_bytes(), &m, HostGuard::AnyName).0.status;
        assert_eq!(status("GET / HTTP/1.1\r\nHost: x"), "200 OK");
        assert_eq!(status("GET /metrics HTTP/1.1"), "200 OK");
        assert_eq!(status("GET /status.json?x=1 HTTP/1.0"), "200 OK");
        assert_eq!(status("GET /nope HTTP/1.1"), "404 Not Found");
        assert_eq!(status("POST / HTTP/1.1"), "405 Method Not Allowed");
        assert_eq!(status("GET / SPDY/3"), "505 HTTP Version Not Supported");
        assert_eq!(status("garbage"), "400 Bad Request");
        let (r, head_only) = respond(b"HEAD /metrics HTTP/1.1", &m, HostGuard::AnyName);
        assert!(head_only && r.status == "200 OK");
    }

    #[test]
    fn a_loopback_server_answers_only_loopback_names() {
        let m = Metrics::new();
        let status = |guard: HostGuard, host: &str| {
            let head = format!("GET /status.json HTTP/1.1\r\nAccept: */*\r\n{host}");
            respond(head.as_bytes(), &m, guard).0.status
        };
        let loopback = HostGuard::for_listener("127.0.0.1:9100".parse().unwrap());
        assert_eq!(loopback, HostGuard::LoopbackNames);
        for host in [
            "Host: localhost:9100",
            "host: LOCALHOST",
            "Host: app.localhost.:9100",
            "Host: 127.0.0.1:9100",
            "Host: 127.0.0.2",
            "Host: [::1]:9100",
            "Host: [::1]",
            // No Host at all: not a browser.
            "",
        ] {
            assert_eq!(status(loopback, host), "200 OK", "{host:?}");
        }
        for host in [
            "Host: rebound.example:9100",
            "Host: localhost.example",
            "Host: evil-localhost",
            "Host: 10.0.0.5:9100",
            "Host: [::1",
            "Host: [::1]x",
            "Host: ",
        ] {
            assert_eq!(status(loopback, host), "403 Forbidden", "{host:?}");
        }
        let (r, head_only) = respond(b"HEAD / HTTP/1.1\r\nHost: evil", &m, loopback);
        assert!(head_only && r.status == "403 Forbidden");
        // Bound elsewhere, names are expected (scrape targets, proxies).
        let open = HostGuard::for_listener("0.0.0.0:9100".parse().unwrap());
        assert_eq!(status(open, "Host: trainer.lan:9100"), "200 OK");
        assert_eq!(
            HostGuard::for_listener("[::1]:0".parse().unwrap()),
            HostGuard::LoopbackNames
        );
    }

    #[test]
    fn the_head_ends_at_its_blank_line_wherever_the_reads_split_it() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let end = head.len() - 4;
        assert_eq!(find_head_end(head, 0), Some(end));
        // Searched in pieces, as reads deliver it, the end is still found.
        for from in 0..head.len() {
            assert_eq!(find_head_end(head, from.min(end)), Some(end), "from {from}");
        }
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\n", 0), Some(14));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nHost", 0), None);
        assert_eq!(find_head_end(b"", 0), None);
    }

    #[tokio::test]
    async fn serves_over_tcp_and_bounds_requests() {
        let addr = serve("127.0.0.1:0".parse().unwrap(), Metrics::new())
            .await
            .unwrap();
        let fetch = |req: Vec<u8>| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&req).await.unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            out
        };
        let page = fetch(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec()).await;
        assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
        let rebound = fetch(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()).await;
        assert!(rebound.starts_with("HTTP/1.1 403"), "{rebound}");
        assert!(page.contains("<svg") || page.contains("svg"));
        let big = fetch(vec![b'a'; MAX_REQUEST_BYTES]).await;
        assert!(big.starts_with("HTTP/1.1 431"), "{big}");
        // A second server on the same address is refused with the address named.
        let err = serve(addr, Metrics::new()).await.unwrap_err().to_string();
        assert!(err.contains(&addr.to_string()), "{err}");
    }
}
