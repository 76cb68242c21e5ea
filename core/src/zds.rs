//! ZDS: the node agent hands captured pods to the ztunnel over a Unix
//! SOCK_SEQPACKET socket. One protobuf message per datagram; an AddWorkload
//! carries the pod's netns descriptor as SCM_RIGHTS ancillary data. Both
//! ends are here (the ztunnel's and the agent's), so they agree by
//! construction.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, OwnedFd};

use mesh_proto::istio::workload::zds::{
    Ack, Version, WorkloadRequest, WorkloadResponse, ZdsHello, workload_request, workload_response,
};
use prost::Message;
use tokio_seqpacket::UnixSeqpacket;

/// A ZDS connection.
pub type Socket = UnixSeqpacket;
use tokio_seqpacket::ancillary::{AncillaryMessageWriter, OwnedAncillaryMessage};

/// Largest ZDS datagram we accept.
const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("ZDS socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("ZDS peer closed the connection")]
    Closed,
    #[error("ZDS message does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("ZDS protocol: {0}")]
    Protocol(String),
    /// The ztunnel's answer is its drain notice ([`DRAINING`]).
    #[error("the ztunnel is draining")]
    Draining,
}

/// What a draining ztunnel answers (its notice, and any refusal of a pod
/// for its drain): the agent forgets it and fences its pods if none other
/// is connected, then closes the connection (its ack).
pub const DRAINING: &str = "draining: this ztunnel takes no new pod";

/// A request from the agent, with the netns descriptor of an Add.
#[derive(Debug)]
pub struct Received {
    pub request: workload_request::Payload,
    pub netns: Option<OwnedFd>,
}

async fn recv_raw(sock: &UnixSeqpacket) -> Result<(Vec<u8>, Vec<OwnedFd>), ZdsError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut anc = [0u8; 256];
    let (info, ancillary) = sock
        .recv_vectored_with_ancillary(&mut [IoSliceMut::new(&mut buf)], &mut anc)
        .await?;
    let n = info.bytes_read();
    if n == 0 {
        return Err(ZdsError::Closed);
    }
    if info.truncated() || ancillary.is_truncated() {
        return Err(ZdsError::Protocol(
            "message or ancillary data truncated".into(),
        ));
    }
    let mut fds = Vec::new();
    for m in ancillary.into_messages() {
        if let OwnedAncillaryMessage::FileDescriptors(f) = m {
            fds.extend(f);
        }
    }
    buf.truncate(n);
    Ok((buf, fds))
}

async fn send_raw(
    sock: &UnixSeqpacket,
    bytes: &[u8],
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<(), ZdsError> {
    match fd {
        None => {
            sock.send(bytes).await?;
        }
        Some(fd) => {
            let mut anc = [0u8; 64];
            let fds = [fd];
            let mut w = AncillaryMessageWriter::new(&mut anc);
            w.add_fds(&fds)
                .map_err(|e| ZdsError::Protocol(format!("cannot attach the netns fd: {e:?}")))?;
            sock.send_vectored_with_ancillary(&[IoSlice::new(bytes)], &mut w)
                .await?;
        }
    }
    Ok(())
}

/// ztunnel side: connect, say hello.
pub async fn connect(path: &std::path::Path) -> Result<UnixSeqpacket, ZdsError> {
    let sock = UnixSeqpacket::connect(path).await?;
    let hello = ZdsHello {
        version: Version::V1 as i32,
    };
    send_raw(&sock, &hello.encode_to_vec(), None).await?;
    Ok(sock)
}

/// ztunnel side: the next request from the agent.
pub async fn recv_request(sock: &UnixSeqpacket) -> Result<Received, ZdsError> {
    let (bytes, mut fds) = recv_raw(sock).await?;
    let req = WorkloadRequest::decode(bytes.as_slice())?;
    let request = req
        .payload
        .ok_or_else(|| ZdsError::Protocol("request with no payload".into()))?;
    let netns = match (&request, fds.len()) {
        (workload_request::Payload::Add(_), 1) => fds.pop(),
        (workload_request::Payload::Add(_), n) => {
            return Err(ZdsError::Protocol(format!(
                "AddWorkload with {n} descriptors, expected 1"
            )));
        }
        (_, 0) => None,
        (_, n) => return Err(ZdsError::Protocol(format!("unexpected {n} descriptors"))),
    };
    Ok(Received { request, netns })
}

/// ztunnel side: acknowledge the last request (an empty error is success).
pub async fn send_ack(sock: &UnixSeqpacket, error: Option<String>) -> Result<(), ZdsError> {
    let resp = WorkloadResponse {
        payload: Some(workload_response::Payload::Ack(Ack {
            error: error.unwrap_or_default(),
        })),
    };
    send_raw(sock, &resp.encode_to_vec(), None).await
}

/// Agent side: the ztunnel's hello.
pub async fn recv_hello(sock: &UnixSeqpacket) -> Result<ZdsHello, ZdsError> {
    let (bytes, _) = recv_raw(sock).await?;
    Ok(ZdsHello::decode(bytes.as_slice())?)
}

/// Agent side: whether the ztunnel hung up, looked at without waiting.
/// Between requests a ztunnel sends nothing, so anything readable then is
/// its end of the session (or a message out of turn, which ends it too).
pub fn hung_up(sock: &UnixSeqpacket) -> bool {
    let mut buf = [0u8; 1];
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    !sock.poll_peek(&mut cx, &mut buf).is_pending()
}

/// Agent side: send one request (with the pod's netns for an Add) and wait
/// for its ack; `Err` carries the ztunnel's error.
pub async fn request(
    sock: &UnixSeqpacket,
    payload: workload_request::Payload,
    netns: Option<&OwnedFd>,
) -> Result<(), ZdsError> {
    let req = WorkloadRequest {
        payload: Some(payload),
    };
    send_raw(sock, &req.encode_to_vec(), netns.map(|f| f.as_fd())).await?;
    let (bytes, _) = recv_raw(sock).await?;
    match WorkloadResponse::decode(bytes.as_slice())?.payload {
        Some(workload_response::Payload::Ack(a)) if a.error.is_empty() => Ok(()),
        Some(workload_response::Payload::Ack(a)) if a.error == DRAINING => Err(ZdsError::Draining),
        Some(workload_response::Payload::Ack(a)) => {
            Err(ZdsError::Protocol(format!("ztunnel refused: {}", a.error)))
        }
        None => Err(ZdsError::Protocol("response with no payload".into())),
    }
}
