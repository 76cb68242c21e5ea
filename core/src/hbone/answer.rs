//! A CONNECT stream that carries the client's bytes before its answer.
//!
//! [`open_early`] sends the CONNECT and hands the stream back at once, so
//! the first bytes of a new connection leave with the request instead of
//! one tunnel round trip later, after the 200 (`docs/performance.md`,
//! scenario 5). The peer still decides before any byte reaches its app: it
//! buffers them under the stream's window while it checks policy and dials,
//! and drops them with the stream when it refuses. The receiving half waits
//! for the answer first; a refusal or a missing answer is the stream's
//! [`H2Stream::open_error`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::client::ResponseFuture;
use http::StatusCode;

use super::{BAGGAGE, ConnectHeaders, H2Stream, OpenError, connect_request};

/// The receiving half of a stream, before and after the peer's answer.
pub(super) enum Recv {
    /// The tunnel's bytes (the 200 has arrived, or this side answered).
    Open(RecvStream),
    /// CONNECT sent, its answer awaited until `deadline`.
    Answer(Box<Awaiting>),
    /// The answer was not a 200, or never came.
    Failed,
}

pub(super) struct Awaiting {
    response: ResponseFuture,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

/// The 200 (its `baggage`), or why there is none.
fn answer(
    a: &mut Awaiting,
    cx: &mut Context<'_>,
) -> Poll<Result<(RecvStream, Option<String>), OpenError>> {
    let resp = match Pin::new(&mut a.response).poll(cx) {
        Poll::Ready(r) => r?,
        Poll::Pending => {
            ready!(a.deadline.as_mut().poll(cx));
            return Poll::Ready(Err(OpenError::Timeout(a.timeout)));
        }
    };
    if resp.status() != StatusCode::OK {
        return Poll::Ready(Err(OpenError::Status(resp.status())));
    }
    let baggage = resp
        .headers()
        .get(BAGGAGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Poll::Ready(Ok((resp.into_body(), baggage)))
}

/// Ready once the tunnel is open; an error once it is known it never will
/// be (the reason is kept in `failed`).
pub(super) fn poll_open(
    recv: &mut Recv,
    failed: &mut Option<OpenError>,
    baggage: &mut Option<String>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    let a = match &mut *recv {
        Recv::Open(_) => return Poll::Ready(Ok(())),
        Recv::Failed => return Poll::Ready(Err(refused(failed.as_ref()))),
        Recv::Answer(a) => a,
    };
    match ready!(answer(a, cx)) {
        Ok((body, b)) => {
            *recv = Recv::Open(body);
            *baggage = b;
            Poll::Ready(Ok(()))
        }
        Err(e) => {
            *failed = Some(e);
            *recv = Recv::Failed;
            Poll::Ready(Err(refused(failed.as_ref())))
        }
    }
}

fn refused(e: Option<&OpenError>) -> io::Error {
    let msg = e.map(|e| e.to_string()).unwrap_or_default();
    io::Error::new(io::ErrorKind::ConnectionRefused, msg)
}

/// Sends a CONNECT for `target` and returns its stream without waiting for
/// the answer: bytes written now travel behind the request. Reading waits
/// for the 200, which must come within `timeout`.
pub async fn open_early(
    sender: &h2::client::SendRequest<Bytes>,
    target: SocketAddr,
    headers: &ConnectHeaders,
    timeout: Duration,
) -> Result<H2Stream, OpenError> {
    let deadline = Box::pin(tokio::time::sleep(timeout));
    let sender = tokio::time::timeout(timeout, sender.clone().ready())
        .await
        .map_err(|_| OpenError::Timeout(timeout))?;
    let (response, send) = sender?.send_request(connect_request(target, headers)?, false)?;
    Ok(H2Stream::with_recv(
        send,
        Recv::Answer(Box::new(Awaiting {
            response,
            deadline,
            timeout,
        })),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::H2Config;
    use crate::hbone::{Responder, StreamTasks, client_handshake, serve_connection};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::sync::CancellationToken;

    const WAIT: Duration = Duration::from_secs(10);

    /// A client over real h2 to a server whose handler runs `answer` for
    /// every CONNECT.
    async fn client<F, Fut>(answer: F) -> h2::client::SendRequest<Bytes>
    where
        F: Fn(Responder) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (a, b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            serve_connection(
                b,
                &H2Config::default(),
                10,
                WAIT,
                CancellationToken::new(),
                StreamTasks::Spawn,
                |_req, respond| answer(respond),
            )
            .await
        });
        let (send, _runner, driver) = client_handshake(a, &H2Config::default(), |_| {})
            .await
            .expect("handshake");
        tokio::spawn(driver);
        send
    }

    fn target() -> SocketAddr {
        "10.1.2.3:8080".parse().expect("addr")
    }

    /// Bytes written before the 200 reach the peer's tunnel once it
    /// answers, and the answer's baggage is read on the way.
    #[tokio::test]
    async fn bytes_sent_before_the_answer_arrive_and_the_echo_comes_back() {
        let send = client(|respond| async move {
            // Answer late: the client has written long before.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut t = respond
                .accept_with_baggage(Some("service.name=server"))
                .expect("200");
            let mut got = Vec::new();
            t.read_to_end(&mut got).await.expect("read");
            t.write_all(&got).await.expect("echo");
            t.shutdown().await.expect("end");
        })
        .await;
        let mut s = open_early(&send, target(), &ConnectHeaders::default(), WAIT)
            .await
            .expect("CONNECT sent");
        s.write_all(b"early bytes")
            .await
            .expect("write before the answer");
        s.shutdown().await.expect("half-close");
        let mut out = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut out))
            .await
            .expect("in time")
            .expect("read the echo");
        assert_eq!(out, b"early bytes");
        assert_eq!(s.peer_baggage(), Some("service.name=server"));
        assert!(s.open_error().is_none());
    }

    /// A refusal after the bytes went out is the stream's open error, and
    /// reading says the connection was refused.
    #[tokio::test]
    async fn a_refusal_after_early_bytes_is_the_streams_open_error() {
        let send = client(|respond| async move {
            respond.refuse(StatusCode::UNAUTHORIZED);
        })
        .await;
        let mut s = open_early(&send, target(), &ConnectHeaders::default(), WAIT)
            .await
            .expect("CONNECT sent");
        let _ = s.write_all(b"not for the app").await;
        let mut out = Vec::new();
        let err = tokio::time::timeout(WAIT, s.read_to_end(&mut out))
            .await
            .expect("in time")
            .expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert!(out.is_empty());
        assert!(
            matches!(s.open_error(), Some(OpenError::Status(st)) if *st == StatusCode::UNAUTHORIZED),
            "{:?}",
            s.open_error().map(|e| e.to_string())
        );
    }

    /// No answer within the timeout: the stream fails with a timeout, not
    /// forever.
    #[tokio::test]
    async fn a_missing_answer_times_out() {
        let send = client(|respond| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(respond);
        })
        .await;
        let mut s = open_early(
            &send,
            target(),
            &ConnectHeaders::default(),
            Duration::from_millis(100),
        )
        .await
        .expect("CONNECT sent");
        let mut buf = [0u8; 8];
        let err = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("in time")
            .expect_err("timed out");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert!(matches!(s.open_error(), Some(OpenError::Timeout(_))));
    }
}
