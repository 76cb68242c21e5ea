//! Load on long-lived streams, for the benchmark's L7 scenario: a gRPC
//! bidirectional stream and a WebSocket (tokio-tungstenite's client), each
//! sending one small message and waiting for its echo before the next
//! (per-message round trip, p50/p99, messages per second); and a gRPC
//! client-streaming call that sends as fast as flow control lets it
//! (messages per second). Prints a JSON summary.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::grpc::pb::Msg;
use super::grpc::pb::echo_client::EchoClient;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// One gRPC bidirectional stream, one message in flight.
    GrpcBidi,
    /// One gRPC client-streaming call, sent back to back.
    GrpcClientStream,
    /// One WebSocket, one text message in flight.
    Ws,
}

#[derive(Debug, clap::Args)]
pub struct StreamLoadArgs {
    /// http://host[:port] for gRPC, ws://host[:port]/path for WebSocket.
    url: String,
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long, default_value_t = 10_000)]
    messages: u32,
    /// Bytes of each message's text.
    #[arg(long, default_value_t = 64)]
    bytes: usize,
    /// For the whole run.
    #[arg(long, default_value_t = 120_000)]
    timeout_ms: u64,
}

#[derive(Debug, Default, serde::Serialize)]
struct Summary {
    messages: u32,
    /// Round trips (one per message; none for client streaming).
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    elapsed_ms: f64,
    messages_per_second: f64,
}

type BoxError = Box<dyn std::error::Error>;

pub async fn run(a: &StreamLoadArgs) -> Result<(), BoxError> {
    let text = "x".repeat(a.bytes);
    let started = Instant::now();
    let work = async {
        match a.mode {
            Mode::GrpcBidi => grpc_bidi(&a.url, a.messages, &text).await,
            Mode::GrpcClientStream => grpc_client_stream(&a.url, a.messages, &text).await,
            Mode::Ws => ws(&a.url, a.messages, &text).await,
        }
    };
    let rtts = tokio::time::timeout(Duration::from_millis(a.timeout_ms), work).await??;
    let elapsed = started.elapsed().as_secs_f64();
    let mut s = Summary {
        messages: a.messages,
        elapsed_ms: elapsed * 1000.0,
        messages_per_second: f64::from(a.messages) / elapsed,
        ..Summary::default()
    };
    if !rtts.is_empty() {
        let mut v = rtts;
        v.sort_by(|x, y| x.total_cmp(y));
        let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
        (s.p50_ms, s.p99_ms, s.max_ms) = (at(0.5), at(0.99), v[v.len() - 1]);
    }
    println!("{}", serde_json::to_string(&s)?);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn grpc_bidi(url: &str, messages: u32, text: &str) -> Result<Vec<f64>, BoxError> {
    let mut c = EchoClient::connect(url.to_string()).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
    let mut replies = c
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut rtts = Vec::with_capacity(messages as usize);
    for i in 0..messages {
        let t = Instant::now();
        let m = Msg {
            text: text.to_string(),
            count: i,
            ..Msg::default()
        };
        tx.send(m).await.map_err(|_| "the stream ended")?;
        let r = replies.message().await?.ok_or("the stream ended early")?;
        if r.count != i {
            return Err(format!("reply {} to message {i}", r.count).into());
        }
        rtts.push(ms(t.elapsed()));
    }
    drop(tx);
    while replies.message().await?.is_some() {}
    Ok(rtts)
}

async fn grpc_client_stream(url: &str, messages: u32, text: &str) -> Result<Vec<f64>, BoxError> {
    let mut c = EchoClient::connect(url.to_string()).await?;
    let text = text.to_string();
    let out = tokio_stream::iter(0..messages).map(move |i| Msg {
        text: text.clone(),
        count: i,
        ..Msg::default()
    });
    let r = c.client_stream(out).await?.into_inner();
    if r.count != messages {
        return Err(format!("the server counted {} of {messages}", r.count).into());
    }
    Ok(Vec::new())
}

async fn ws(url: &str, messages: u32, text: &str) -> Result<Vec<f64>, BoxError> {
    let (mut s, resp) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
    if resp.status() != 101 {
        return Err(format!("upgrade answered {}", resp.status()).into());
    }
    let mut rtts = Vec::with_capacity(messages as usize);
    for _ in 0..messages {
        let t = Instant::now();
        s.send(Message::text(text.to_string())).await?;
        loop {
            match s.next().await.ok_or("closed early")?? {
                Message::Text(t) if t.as_str() == text => break,
                Message::Ping(_) | Message::Pong(_) => continue,
                other => return Err(format!("unexpected {other:?}").into()),
            }
        }
        rtts.push(ms(t.elapsed()));
    }
    s.close(None).await?;
    Ok(rtts)
}
