//! `labapp raw` and `labapp h2-abuse`: requests made by hand, malformed or
//! hostile, and the first thing the server answers.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub async fn raw(
    addr: SocketAddr,
    head: &str,
    pad: usize,
    body_bytes: usize,
    byte_delay_ms: u64,
    timeout: Duration,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut head = head.replace("\\r", "\r").replace("\\n", "\n");
    if pad > 0 {
        // Before the blank line that ends the head.
        let at = head.rfind("\r\n\r\n").map(|i| i + 2).unwrap_or(head.len());
        head.insert_str(at, &format!("x-pad: {}\r\n", "a".repeat(pad)));
    }
    let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await??;
    let (mut r, mut w) = s.into_split();
    // Read while writing, as real clients do: a server may answer (and
    // close) before the request is all sent.
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(timeout, async {
            let mut buf = [0u8; 4096];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        out.extend_from_slice(&buf[..n]);
                        if out.windows(2).any(|w| w == b"\r\n") {
                            break;
                        }
                    }
                }
            }
        })
        .await;
        out
    });
    let work = async {
        if byte_delay_ms > 0 {
            for b in head.as_bytes() {
                w.write_all(std::slice::from_ref(b)).await?;
                tokio::time::sleep(Duration::from_millis(byte_delay_ms)).await;
            }
        } else {
            w.write_all(head.as_bytes()).await?;
        }
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = body_bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            w.write_all(&chunk[..n]).await?;
            left -= n;
        }
        Ok::<_, std::io::Error>(())
    };
    let wrote = tokio::select! {
        r = tokio::time::timeout(timeout, work) => r,
        // The answer came (or the server hung up): stop sending.
        _ = async { while !reader.is_finished() { tokio::time::sleep(Duration::from_millis(10)).await } } => Ok(Ok(())),
    };
    let out = reader.await.unwrap_or_default();
    let text = String::from_utf8_lossy(&out);
    match text.lines().next().filter(|l| !l.is_empty()) {
        Some(line) => println!("{line}"),
        None => println!(
            "closed ({})",
            match wrote {
                Ok(Ok(())) => "after the request was sent".to_string(),
                Ok(Err(e)) => format!("while sending: {e}"),
                Err(_) => "still sending at the timeout".to_string(),
            }
        ),
    }
    Ok(())
}

/// One HTTP/2 frame: 24-bit length, type, flags, stream id, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub async fn h2_abuse(addr: SocketAddr, mode: &str) -> Result<(), Box<dyn std::error::Error>> {
    let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await??;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[])); // SETTINGS
    // HEADERS, END_HEADERS: POST (static 3), http (6), / (4), :authority x.
    out.extend(h2_frame(0x1, 0x4, 1, &[0x83, 0x86, 0x84, 0x41, 0x01, b'x']));
    match mode {
        "window-overflow" => out.extend(h2_frame(0x8, 0, 0, &0x7fff_ffffu32.to_be_bytes())),
        "data-flood" => {
            let chunk = vec![0u8; 16_384];
            for _ in 0..256 {
                out.extend(h2_frame(0x0, 0, 1, &chunk));
            }
        }
        m => return Err(format!("unknown mode {m}").into()),
    }
    // Read while writing: the server may answer, stop reading and close
    // long before the flood is all sent.
    let (mut r, mut w) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut seen = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let mut chunk = [0u8; 16_384];
            loop {
                match r.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                while buf.len() >= 9 {
                    let len = (usize::from(buf[0]) << 16)
                        | (usize::from(buf[1]) << 8)
                        | usize::from(buf[2]);
                    if buf.len() < 9 + len {
                        break;
                    }
                    let (kind, payload) = (buf[3], buf[9..9 + len].to_vec());
                    buf.drain(..9 + len);
                    let code = |at: usize| {
                        payload
                            .get(at..at + 4)
                            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                            .unwrap_or(0)
                    };
                    match kind {
                        0x7 => seen.push(format!("GOAWAY {}", code(4))),
                        0x3 => seen.push(format!("RST_STREAM {}", code(0))),
                        0x1 => seen.push("HEADERS".to_string()),
                        _ => {}
                    }
                }
            }
        })
        .await;
        seen
    });
    let _ = tokio::time::timeout(Duration::from_secs(5), w.write_all(&out)).await;
    let seen = reader.await.unwrap_or_default();
    println!(
        "{}",
        if seen.is_empty() {
            "closed".to_string()
        } else {
            seen.join(", ")
        }
    );
    Ok(())
}
