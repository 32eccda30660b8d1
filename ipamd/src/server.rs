//! The RPC server: the wire API over a unix socket that only root can reach (socket 0600 in a
//! 0700 directory, both enforced at start; a directory others can write is refused). One request
//! and one answer per connection, read within a deadline; at most `MAX_CONNECTIONS` at once; the
//! peer's credentials checked (root or this process's user).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use underway_api::{ApiError, ErrorKind, Request, Response, WireError, decode, encode};

use crate::error::{IpamdError, Result};
use crate::service::Service;

/// Longest request line accepted (a GC with thousands of attachments fits well within).
const MAX_LINE: u64 = 4 << 20;

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;

/// How long a request may take to arrive; callers are root or ipamd's own user (the socket's
/// permissions already say so; the peer's credentials are checked in case they were loosened).
#[derive(Debug, Clone)]
pub struct Guard {
    /// A request line must arrive within this (a client that connects and says nothing is cut off).
    pub read_timeout: Duration,
}

impl Guard {
    fn allows(&self, uid: u32) -> bool {
        let own = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
        uid == 0 || Some(uid) == own
    }
}

/// Binds the socket (replacing a stale one left by a previous run).
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        crate::store::private_dir(dir).map_err(|reason| IpamdError::Config { field: "socket".into(), reason })?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(IpamdError::io(format!("remove stale socket {}", path.display()))(e));
        }
        _ => {}
    }
    let l = UnixListener::bind(path).map_err(IpamdError::io(format!("bind {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(IpamdError::io(format!("chmod {}", path.display())))?;
    Ok(l)
}

/// Serves connections until the task is dropped.
pub async fn serve(listener: UnixListener, service: Arc<Service>, guard: Guard) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let guard = Arc::new(guard);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        match listener.accept().await {
            Ok((stream, _)) => {
                let (svc, guard) = (service.clone(), guard.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Err(e) = connection(stream, &svc, &guard).await {
                        tracing::debug!("rpc connection: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("rpc accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(stream: UnixStream, service: &Service, guard: &Guard) -> std::io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (r, mut w) = stream.into_split();
    if !guard.allows(uid) {
        let resp = Response::Error(ApiError {
            kind: ErrorKind::BadRequest,
            message: format!("uid {uid} may not call ipamd (root or ipamd's own user)"),
        });
        w.write_all(encode(&resp).as_bytes()).await?;
        return w.shutdown().await;
    }
    let mut line = String::new();
    let mut reader = tokio::io::AsyncReadExt::take(BufReader::new(r), MAX_LINE);
    match tokio::time::timeout(guard.read_timeout, reader.read_line(&mut line)).await {
        Ok(read) => {
            read?;
        }
        Err(_) => {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no request within the read deadline"));
        }
    }
    // The client sends one line and then only waits: its end of the socket closing (EOF) means
    // it went away (killed, or its own deadline passed).
    let gone = async {
        let mut buf = [0u8; 64];
        loop {
            match tokio::io::AsyncReadExt::read(&mut reader, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let resp = match decode::<Request>(&line) {
        Ok(req) => {
            let (resp, created) = service.handle_from(req, gone).await;
            if let Some(key) = created {
                // An answer the client cannot get: give the new assignment back.
                let sent = async {
                    w.write_all(encode(&resp).as_bytes()).await?;
                    w.shutdown().await
                };
                if sent.await.is_err() {
                    service.undo_add(&key).await;
                }
                return Ok(());
            }
            resp
        }
        Err(WireError::Version { got }) => Response::Error(ApiError {
            kind: ErrorKind::VersionMismatch,
            message: format!("the CNI binary speaks API version {got}, ipamd {}", underway_api::API_VERSION),
        }),
        Err(e) => Response::Error(ApiError { kind: ErrorKind::BadRequest, message: e.to_string() }),
    };
    w.write_all(encode(&resp).as_bytes()).await?;
    w.shutdown().await
}
