//! `kubectl logs` through the lab's streaming port: the API server's
//! `pods/log` arrives as `GET /containerLogs/<ns>/<pod>/<container>`, and
//! the answer is the container's log file (`tailLines` honoured; `follow`
//! is not: the answer ends with what the file holds). And [`Rewind`], which
//! gives back a request head read to tell the two kinds of request apart.

use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The path of a `containerLogs` request: (namespace, pod, container, tail).
pub fn target(path: &str) -> Option<(String, String, String, Option<usize>)> {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let mut parts = path.trim_start_matches('/').split('/');
    if parts.next()? != "containerLogs" {
        return None;
    }
    let (ns, pod, container) = (parts.next()?, parts.next()?, parts.next()?);
    let tail = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "tailLines")
        .and_then(|(_, v)| v.parse().ok());
    Some((ns.into(), pod.into(), container.into(), tail))
}

/// Answers one `containerLogs` request from the lab's log files.
pub async fn answer<S: AsyncWrite + Unpin>(
    mut out: S,
    dir: &Path,
    path: &str,
) -> std::io::Result<()> {
    let (status, body) = match target(path) {
        Some((ns, pod, container, tail)) => {
            let file = dir
                .join("logs")
                .join(format!("pod-{ns}-{pod}-{container}.log"));
            match std::fs::read_to_string(&file) {
                Ok(text) => {
                    let lines: Vec<&str> = text.lines().collect();
                    let from = tail.map_or(0, |n| lines.len().saturating_sub(n));
                    let mut body = lines[from..].join("\n");
                    if !body.is_empty() {
                        body.push('\n');
                    }
                    ("200 OK", body)
                }
                Err(e) => (
                    "404 Not Found",
                    format!("no log for {ns}/{pod} container {container}: {e}\n"),
                ),
            }
        }
        None => (
            "404 Not Found",
            format!("{path}: not served by the lab's kubelet\n"),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    out.write_all(head.as_bytes()).await?;
    out.write_all(body.as_bytes()).await?;
    out.shutdown().await
}

/// A stream whose first bytes are given back from `prefix`.
pub struct Rewind<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Rewind {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.pos);
            let from = self.pos;
            buf.put_slice(&self.prefix[from..from + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_requests_name_the_container() {
        assert_eq!(
            target("/containerLogs/istio-system/ztunnel-x/node-agent?tailLines=5"),
            Some((
                "istio-system".into(),
                "ztunnel-x".into(),
                "node-agent".into(),
                Some(5)
            ))
        );
        assert_eq!(target("/portForward/a/b"), None);
    }
}
