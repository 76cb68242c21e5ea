//! One client connection held open: `labapp conn URL` sends a GET, then
//! either waits with the connection idle or (`--every-ms`) keeps sending a
//! GET that often, until the server closes the connection or `--limit-ms`
//! passes. Prints JSON: the requests answered, and when the server closed
//! the connection (null when it did not).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

#[derive(Debug, clap::Args)]
pub struct ConnArgs {
    url: String,
    /// HTTP/2 with prior knowledge (h2c).
    #[arg(long)]
    h2: bool,
    /// Send a request this often (0: one request, then idle).
    #[arg(long, default_value_t = 0)]
    every_ms: u64,
    /// Give up waiting for the close after this long.
    #[arg(long, default_value_t = 10_000)]
    limit_ms: u64,
}

#[derive(serde::Serialize)]
struct Summary {
    ok: usize,
    failed: usize,
    closed_after_ms: Option<u64>,
    first_error: Option<String>,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

pub async fn run(a: &ConnArgs) -> Result<(), Box<dyn std::error::Error>> {
    let uri: hyper::Uri = a.url.parse()?;
    let host = uri.host().ok_or("no host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    let (closed_tx, mut closed) = tokio::sync::oneshot::channel::<()>();
    let mut sender = if a.h2 {
        let (s, c) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = c.await;
            let _ = closed_tx.send(());
        });
        Sender::H2(s)
    } else {
        let (s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = c.await;
            let _ = closed_tx.send(());
        });
        Sender::H1(s)
    };
    let started = Instant::now();
    let limit = Duration::from_millis(a.limit_ms);
    let mut s = Summary {
        ok: 0,
        failed: 0,
        closed_after_ms: None,
        first_error: None,
    };
    loop {
        let mut req = hyper::Request::get(uri.clone()).body(Empty::<Bytes>::new())?;
        let sent = match &mut sender {
            Sender::H1(c) => {
                *req.uri_mut() = uri
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/")
                    .parse()?;
                req.headers_mut().insert(http::header::HOST, host.parse()?);
                match c.ready().await {
                    Ok(()) => c.send_request(req).await,
                    Err(e) => Err(e),
                }
            }
            Sender::H2(c) => match c.ready().await {
                Ok(()) => c.send_request(req).await,
                Err(e) => Err(e),
            },
        };
        match sent {
            Ok(r) => match r.into_body().collect().await {
                Ok(_) => s.ok += 1,
                Err(e) => {
                    s.failed += 1;
                    s.first_error.get_or_insert(e.to_string());
                }
            },
            Err(e) => {
                s.failed += 1;
                s.first_error.get_or_insert(e.to_string());
            }
        }
        let wait = if a.every_ms == 0 {
            limit.saturating_sub(started.elapsed())
        } else {
            Duration::from_millis(a.every_ms)
        };
        tokio::select! {
            _ = &mut closed => {
                s.closed_after_ms = Some(started.elapsed().as_millis() as u64);
                break;
            }
            _ = tokio::time::sleep(wait) => {}
        }
        if started.elapsed() >= limit {
            break;
        }
    }
    println!("{}", serde_json::to_string(&s)?);
    Ok(())
}
