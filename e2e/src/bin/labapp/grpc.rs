//! The lab's gRPC echo (tonic, h2c): unary, server-streaming,
//! client-streaming and bidirectional calls, each reply naming the pod;
//! `SetFailNext` makes the next calls fail with a status (a trailers-only
//! answer), for retries.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use futures::Stream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

pub mod pb {
    tonic::include_proto!("labecho");
}

use pb::echo_server::{Echo, EchoServer};
use pb::{FailNext, Msg};

/// The most replies a ServerStream call asks for.
const MAX_REPLIES: u32 = 1_000_000;

#[derive(Default)]
struct Fail {
    n: AtomicU32,
    code: AtomicU32,
}

struct Service {
    pod: String,
    fail: Arc<Fail>,
}

impl Service {
    fn maybe_fail(&self) -> Result<(), Status> {
        if self
            .fail
            .n
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            let code = self.fail.code.load(Ordering::Acquire) as i32;
            return Err(Status::new(tonic::Code::from(code), "failing as asked"));
        }
        Ok(())
    }

    fn msg(&self, text: String, count: u32) -> Msg {
        Msg {
            text,
            pod: self.pod.clone(),
            count,
            delay_ms: 0,
        }
    }
}

type Replies = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for Service {
    async fn unary(&self, req: Request<Msg>) -> Result<Response<Msg>, Status> {
        self.maybe_fail()?;
        let m = req.into_inner();
        let delay = u64::from(m.delay_ms.min(60_000));
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        Ok(Response::new(self.msg(m.text, 1)))
    }

    type ServerStreamStream = Replies;

    async fn server_stream(&self, req: Request<Msg>) -> Result<Response<Replies>, Status> {
        self.maybe_fail()?;
        let m = req.into_inner();
        let (pod, text) = (self.pod.clone(), m.text);
        let n = m.count.min(MAX_REPLIES);
        let replies = tokio_stream::iter(0..n).map(move |i| {
            Ok(Msg {
                text: format!("{text} {i}"),
                pod: pod.clone(),
                count: i,
                delay_ms: 0,
            })
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn client_stream(&self, req: Request<Streaming<Msg>>) -> Result<Response<Msg>, Status> {
        self.maybe_fail()?;
        let mut s = req.into_inner();
        let mut n = 0u32;
        let mut last = String::new();
        while let Some(m) = s.next().await {
            last = m?.text;
            n += 1;
        }
        Ok(Response::new(self.msg(last, n)))
    }

    type BidiStream = Replies;

    async fn bidi(&self, req: Request<Streaming<Msg>>) -> Result<Response<Replies>, Status> {
        self.maybe_fail()?;
        let pod = self.pod.clone();
        let replies = req.into_inner().map(move |m| {
            m.map(|m| Msg {
                text: m.text,
                pod: pod.clone(),
                count: m.count,
                delay_ms: 0,
            })
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn set_fail_next(&self, req: Request<FailNext>) -> Result<Response<Msg>, Status> {
        let f = req.into_inner();
        self.fail.code.store(f.code, Ordering::Release);
        self.fail.n.store(f.n, Ordering::Release);
        Ok(Response::new(self.msg(format!("fail_next={}", f.n), 0)))
    }
}

pub async fn serve(port: u16) -> Result<(), Box<dyn std::error::Error>> {
    let svc = Service {
        pod: std::env::var("POD_NAME").unwrap_or_else(|_| "unknown".into()),
        fail: Arc::default(),
    };
    tonic::transport::Server::builder()
        .add_service(EchoServer::new(svc))
        .serve(SocketAddr::from(([0, 0, 0, 0], port)))
        .await?;
    Ok(())
}
