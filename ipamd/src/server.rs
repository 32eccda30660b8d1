//! The RPC server: the wire API over a unix socket that only root can reach (socket 0600 in a
//! 0700 directory). One request and one answer per connection.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use underway_api::{ApiError, ErrorKind, Request, Response, WireError, decode, encode};

use crate::error::{IpamdError, Result};
use crate::service::Service;

/// Longest request line accepted (a GC with thousands of attachments fits well within).
const MAX_LINE: u64 = 4 << 20;

/// Binds the socket (replacing a stale one left by a previous run).
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(IpamdError::io(format!("create socket directory {}", dir.display())))?;
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
pub async fn serve(listener: UnixListener, service: Arc<Service>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let svc = service.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, &svc).await {
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

async fn connection(stream: UnixStream, service: &Service) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    tokio::io::AsyncReadExt::take(BufReader::new(r), MAX_LINE).read_line(&mut line).await?;
    let resp = match decode::<Request>(&line) {
        Ok(req) => service.handle(req).await,
        Err(WireError::Version { got }) => Response::Error(ApiError {
            kind: ErrorKind::VersionMismatch,
            message: format!("the CNI binary speaks API version {got}, ipamd {}", underway_api::API_VERSION),
        }),
        Err(e) => Response::Error(ApiError { kind: ErrorKind::BadRequest, message: e.to_string() }),
    };
    w.write_all(encode(&resp).as_bytes()).await?;
    w.shutdown().await
}
