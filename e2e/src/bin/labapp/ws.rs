//! WebSocket for the lab: the echo server's side (an HTTP/1.1 `Upgrade:
//! websocket` or an HTTP/2 extended CONNECT, RFC 8441, then every frame
//! echoed; a ping
//! answered with a pong; a close answered and the connection ended; with
//! `?close_after=N`, the server closes after echoing N data frames; a data
//! frame is read whole before it is echoed, as most echo servers do, up to
//! 64 MiB), and a
//! client for the HTTP/2 case, which no common client speaks:
//! `labapp ws URL --h2` sends a text frame, a binary frame, a ping and a
//! close and prints what came back.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455 4.2.2).
pub fn accept_key(key: &str) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{GUID}").as_bytes(),
    );
    base64(d.as_ref())
}

/// One frame's head.
struct Head {
    fin_opcode: u8,
    len: u64,
    mask: Option<[u8; 4]>,
}

async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Head>> {
    let mut b = [0u8; 2];
    match r.read_exact(&mut b).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = match b[1] & 0x7f {
        126 => u64::from(r.read_u16().await?),
        127 => r.read_u64().await?,
        n => u64::from(n),
    };
    let mask = if b[1] & 0x80 != 0 {
        let mut m = [0u8; 4];
        r.read_exact(&mut m).await?;
        Some(m)
    } else {
        None
    };
    Ok(Some(Head {
        fin_opcode: b[0],
        len,
        mask,
    }))
}

async fn write_head<W: AsyncWrite + Unpin>(
    w: &mut W,
    fin_opcode: u8,
    len: u64,
    mask: Option<[u8; 4]>,
) -> std::io::Result<()> {
    let m = if mask.is_some() { 0x80 } else { 0 };
    let mut h = vec![fin_opcode];
    if len < 126 {
        h.push(m | len as u8);
    } else if len <= u64::from(u16::MAX) {
        h.push(m | 126);
        h.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        h.push(m | 127);
        h.extend_from_slice(&len.to_be_bytes());
    }
    if let Some(k) = mask {
        h.extend_from_slice(&k);
    }
    w.write_all(&h).await
}

/// Copies a frame's payload from `r` to `w`, unmasking with `from` and
/// masking with `to` as it goes, 64 KiB at a time.
async fn copy_payload<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    len: u64,
    from: Option<[u8; 4]>,
    to: Option<[u8; 4]>,
    keep: Option<&mut Vec<u8>>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0u64;
    let mut kept = keep;
    while done < len {
        let n = ((len - done) as usize).min(buf.len());
        r.read_exact(&mut buf[..n]).await?;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            let at = (done as usize + i) % 4;
            if let Some(k) = from {
                *b ^= k[at];
            }
            if let Some(v) = kept.as_deref_mut() {
                v.push(*b);
            }
            if let Some(k) = to {
                *b ^= k[at];
            }
        }
        w.write_all(&buf[..n]).await?;
        done += n as u64;
    }
    Ok(())
}

const MAX_FRAME: u64 = 64 << 20;

/// Echoes frames until the client closes (or, after `close_after` data
/// frames, closes itself).
pub async fn echo<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    close_after: Option<u64>,
) -> std::io::Result<()> {
    let (mut r, mut w) = tokio::io::split(io);
    let mut data_frames = 0u64;
    while let Some(h) = read_head(&mut r).await? {
        match h.fin_opcode & 0x0f {
            0x8 => {
                // Close: answered with the same code, then done.
                write_head(&mut w, 0x88, h.len, None).await?;
                copy_payload(&mut r, &mut w, h.len, h.mask, None, None).await?;
                w.flush().await?;
                let _ = w.shutdown().await;
                return Ok(());
            }
            0x9 => {
                write_head(&mut w, 0x8a, h.len, None).await?;
                copy_payload(&mut r, &mut w, h.len, h.mask, None, None).await?;
            }
            0xa => {
                copy_payload(&mut r, &mut tokio::io::sink(), h.len, h.mask, None, None).await?;
            }
            _ => {
                if h.len > MAX_FRAME {
                    // 1009, message too big.
                    w.write_all(&[0x88, 2, 0x03, 0xf1]).await?;
                    let _ = w.shutdown().await;
                    return Ok(());
                }
                let mut whole = Vec::with_capacity(h.len as usize);
                let mut none = tokio::io::sink();
                copy_payload(&mut r, &mut none, h.len, h.mask, None, Some(&mut whole)).await?;
                // The head and the payload in one write: two small writes
                // would wait out the peer's delayed ACK (Nagle).
                let mut frame = Vec::with_capacity(whole.len() + 14);
                write_head(&mut frame, h.fin_opcode, h.len, None).await?;
                frame.extend_from_slice(&whole);
                w.write_all(&frame).await?;
                data_frames += 1;
                if close_after.is_some_and(|n| data_frames >= n) {
                    // 1000, normal closure.
                    w.write_all(&[0x88, 2, 0x03, 0xe8]).await?;
                    w.flush().await?;
                    // The client's close, then the end.
                    let _ = tokio::time::timeout(Duration::from_secs(5), read_head(&mut r)).await;
                    let _ = w.shutdown().await;
                    return Ok(());
                }
            }
        }
        w.flush().await?;
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct WsArgs {
    /// http://host[:port]/path
    url: String,
    /// RFC 8441: an extended CONNECT over HTTP/2 (h2c); else HTTP/1.1.
    #[arg(long)]
    h2: bool,
    /// The binary frame's size.
    #[arg(long, default_value_t = 10 * 1024 * 1024)]
    binary_bytes: u64,
    #[arg(long, default_value_t = 20_000)]
    timeout_ms: u64,
}

pub async fn client(a: &WsArgs) -> Result<(), Box<dyn std::error::Error>> {
    tokio::time::timeout(Duration::from_millis(a.timeout_ms), session(a)).await?
}

async fn open(a: &WsArgs) -> Result<hyper::upgrade::Upgraded, Box<dyn std::error::Error>> {
    let uri: hyper::Uri = a.url.parse()?;
    let host = uri.host().ok_or("no host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    if a.h2 {
        let (mut s, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let mut req = hyper::Request::connect(uri.clone())
            .header("sec-websocket-version", "13")
            .body(Empty::<Bytes>::new())?;
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        let mut resp = s.send_request(req).await?;
        println!("status {}", resp.status().as_u16());
        if !resp.status().is_success() {
            return Err(format!("refused: {}", resp.status()).into());
        }
        Ok(hyper::upgrade::on(&mut resp).await?)
    } else {
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn.with_upgrades());
        let key = base64(&fastrand::u128(..).to_be_bytes());
        let req = hyper::Request::get(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .header("host", uri.authority().map(|a| a.as_str()).unwrap_or(&host))
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", &key)
            .body(Empty::<Bytes>::new())?;
        let mut resp = s.send_request(req).await?;
        println!("status {}", resp.status().as_u16());
        let accept = resp
            .headers()
            .get("sec-websocket-accept")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if accept != accept_key(&key) {
            return Err(format!("bad sec-websocket-accept {accept:?}").into());
        }
        Ok(hyper::upgrade::on(&mut resp).await?)
    }
}

/// Sends one frame (masked, as a client must) and reads the one that comes
/// back: its opcode and length (and payload, when small).
async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    fin_opcode: u8,
    payload: &[u8],
    repeat: u64,
) -> Result<(u8, u64, Vec<u8>), Box<dyn std::error::Error>> {
    let len = payload.len() as u64 * repeat;
    let mask = fastrand::u32(..).to_be_bytes();
    let (mut r, mut w) = tokio::io::split(io);
    let send = async {
        write_head(&mut w, fin_opcode, len, Some(mask)).await?;
        let mut at = 0usize;
        let mut masked = vec![0u8; payload.len()];
        for _ in 0..repeat {
            for (i, b) in payload.iter().enumerate() {
                masked[i] = b ^ mask[(at + i) % 4];
            }
            at += payload.len();
            w.write_all(&masked).await?;
        }
        w.flush().await?;
        Ok::<_, std::io::Error>(())
    };
    let recv = async {
        let h = read_head(&mut r)
            .await?
            .ok_or_else(|| std::io::Error::other("closed"))?;
        let mut small = Vec::new();
        let keep = (h.len <= 1024).then_some(&mut small);
        copy_payload(&mut r, &mut tokio::io::sink(), h.len, h.mask, None, keep).await?;
        Ok::<_, std::io::Error>((h.fin_opcode & 0x0f, h.len, small))
    };
    let (sent, got) = tokio::join!(send, recv);
    sent?;
    Ok(got?)
}

async fn session(a: &WsArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut io = TokioIo::new(open(a).await?);
    let (op, _, p) = round_trip(&mut io, 0x81, b"hello", 1).await?;
    println!("text {op} {}", String::from_utf8_lossy(&p));
    let chunk = vec![7u8; 64 * 1024];
    let reps = a.binary_bytes.div_ceil(chunk.len() as u64).max(1);
    let (op, len, _) = round_trip(&mut io, 0x82, &chunk, reps).await?;
    println!("binary {op} {len}");
    let (op, _, p) = round_trip(&mut io, 0x89, b"are-you-there", 1).await?;
    println!("pong {op} {}", String::from_utf8_lossy(&p));
    let (op, _, p) = round_trip(&mut io, 0x88, &[0x03, 0xe8], 1).await?;
    println!("close {op} {:?}", p);
    Ok(())
}
