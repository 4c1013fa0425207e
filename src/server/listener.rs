//! The accept loop: who is let in (connections in total and per client address), how long a
//! peer may take to send a request head, and the life of each HTTP connection, upgraded
//! WebSockets included.
//!
//! Served here rather than by `axum::serve`, which has neither limit: every accepted socket
//! first takes a slot ([`Admission`]); one over a limit is answered `503` with `Retry-After`
//! and closed. The slot travels in the connection's stream ([`HttpStream`]), so an upgraded
//! WebSocket keeps it until its socket closes.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{Request, Response, StatusCode, Version};
use axum::Router;
use futures_util::future::Either;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use tracing::{debug, warn};

use crate::admission::{Admission, Refusal};
use crate::transport::HttpStream;
use crate::warn_limit::WarnLimiter;

/// Refused sockets being answered at once; past it, a refused socket is closed unanswered
/// (the answer must not cost what the limit protects).
const REFUSALS_IN_FLIGHT: usize = 32;
/// How long a refused socket is kept to read what its client sent: closing with unread input
/// resets the connection, and the client may then never see the 503.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
const REFUSAL_LINGER_BYTES: usize = 64 * 1024;
/// Longest pause after a failed `accept` (out of descriptors: wait for some to close).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

const REFUSED_FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\
Connection: close\r\nContent-Type: text/plain\r\nContent-Length: 37\r\n\r\n\
the server is at its connection limit";
const REFUSED_CLIENT: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\
Connection: close\r\nContent-Type: text/plain\r\nContent-Length: 38\r\n\r\n\
too many connections from this address";

/// The limits of the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    /// Until a request head has arrived: from the connection's start, and between requests
    /// on a kept-alive connection.
    pub header_timeout: Duration,
    /// How long a response's write may stay blocked.
    pub write_timeout: Duration,
}

/// The client a connection counts against: its IPv4 address, or its IPv6 /64 (one host
/// usually holds a whole /64). IPv4-mapped IPv6 addresses count as IPv4.
pub fn client_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !u128::from(u64::MAX);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// The client a connection counts against (see [`client_of`]), in every request's
/// extensions.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub IpAddr);

/// Accepts connections until `shutdown`, then lets each finish its request (graceful).
/// Connection tasks are in `tracker`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ListenerLimits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let admission = Admission::new(limits.max_connections, limits.max_connections_per_client);
    let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let builder = Arc::new(builder);
    let warnings = WarnLimiter::default();
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = Duration::from_millis(10);
                accepted
            }
            // The peer gave up before it was accepted.
            Err(e) if is_connection_error(&e) => continue,
            // Typically EMFILE: the socket stays in the backlog; retrying at once would spin.
            Err(e) => {
                if warnings.allow() {
                    warn!(error = %e, pause = ?backoff, "accept failed");
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                continue;
            }
        };
        // Small frames must leave at once: with Nagle's algorithm on, a frame written while
        // the previous one is unacknowledged waits for the peer's delayed ACK (40 ms).
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "could not set TCP_NODELAY");
        }
        match admission.admit(client_of(peer.ip())) {
            Ok(slot) => {
                let connection = serve_connection(
                    HttpStream::new(stream, limits.write_timeout, slot),
                    peer,
                    app.clone(),
                    builder.clone(),
                    limits.header_timeout,
                    shutdown.child_token(),
                );
                tracker.spawn(connection);
            }
            Err(refusal) => {
                metrics::counter!("collab_connections_refused_total").increment(1);
                if warnings.allow() {
                    warn!(client = %client_of(peer.ip()), ?refusal, "connection refused");
                }
                if let Ok(permit) = refusals.clone().try_acquire_owned() {
                    tracker.spawn(async move {
                        refuse(stream, refusal).await;
                        drop(permit);
                    });
                }
            }
        }
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Answers 503 and closes, after reading (for a moment) what the client sent.
async fn refuse(mut stream: TcpStream, refusal: Refusal) {
    let answer = match refusal {
        Refusal::Full => REFUSED_FULL,
        Refusal::Client => REFUSED_CLIENT,
    };
    let exchange = async {
        stream.write_all(answer).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut read = 0;
        while read < REFUSAL_LINGER_BYTES {
            match stream.read(&mut sink).await? {
                0 => break,
                n => read += n,
            }
        }
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, exchange).await;
}

/// Serves one admitted connection: HTTP/1.1 with upgrades, until it closes, its first
/// request head is late, or the server stops (then after the request in progress, within
/// the head timeout).
async fn serve_connection(
    stream: HttpStream,
    peer: SocketAddr,
    app: Router,
    builder: Arc<Builder<TokioExecutor>>,
    header_timeout: Duration,
    close: CancellationToken,
) {
    let requested = Arc::new(AtomicBool::new(false));
    let client = ClientAddr(stream.client());
    let service = {
        let (requested, close) = (requested.clone(), close.clone());
        hyper::service::service_fn(move |mut request: Request<Incoming>| {
            requested.store(true, Ordering::Relaxed);
            // HTTP/2 (prior knowledge only: there is no TLS) would multiplex requests past
            // the per-connection limits and hyper's head timer; no client of this server
            // speaks it.
            if request.version() == Version::HTTP_2 {
                close.cancel();
                let mut refused = Response::new(axum::body::Body::from("HTTP/1.1 only"));
                *refused.status_mut() = StatusCode::HTTP_VERSION_NOT_SUPPORTED;
                return Either::Left(std::future::ready(Ok(refused)));
            }
            request.extensions_mut().insert(client);
            // A clone of the router shares its route table.
            Either::Right(app.clone().call(request))
        })
    };
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);
    // hyper's head timer starts only once it knows the protocol, after the first bytes:
    // this one covers a socket that sends nothing.
    let first_head = tokio::time::sleep(header_timeout);
    tokio::pin!(first_head);
    // Once asked to close, the connection has as long to finish as a head has to arrive (an
    // HTTP/2 peer that never acknowledges the shutdown would otherwise keep it).
    let closing_grace = tokio::time::sleep(header_timeout);
    tokio::pin!(closing_grace);
    let (mut awaiting_first, mut closing) = (true, false);
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    debug!(%peer, error = %e, "connection ended");
                }
                break;
            }
            () = &mut first_head, if awaiting_first => {
                awaiting_first = false;
                if !requested.load(Ordering::Relaxed) {
                    debug!(%peer, "no request head in time: closed");
                    break;
                }
            }
            () = close.cancelled(), if !closing => {
                closing = true;
                closing_grace
                    .as_mut()
                    .reset(tokio::time::Instant::now() + header_timeout);
                connection.as_mut().graceful_shutdown();
            }
            () = &mut closing_grace, if closing => {
                debug!(%peer, "connection not closed in time: dropped");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_ipv4_addresses_or_ipv6_prefixes() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(client_of(ip("10.0.0.7")), ip("10.0.0.7"));
        assert_eq!(client_of(ip("::ffff:10.0.0.7")), ip("10.0.0.7"));
        assert_eq!(client_of(ip("2001:db8:1:2:a:b:c:d")), ip("2001:db8:1:2::"));
        assert_eq!(
            client_of(ip("2001:db8:1:2::1")),
            client_of(ip("2001:db8:1:2:ffff::"))
        );
    }

    #[test]
    fn refusals_are_whole_http_answers() {
        for answer in [REFUSED_FULL, REFUSED_CLIENT] {
            let text = std::str::from_utf8(answer).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(length, body.len(), "{text}");
        }
    }
}
