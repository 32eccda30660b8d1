//! A blocking client: connect, send one request, read one answer, all within a deadline.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::{Request, Response, WireError, decode, encode};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// ipamd is not listening (not running, or the socket path is wrong).
    #[error("cannot reach ipamd at {path}: {source}")]
    Unreachable { path: String, source: std::io::Error },
    #[error("talking to ipamd at {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("ipamd at {path} answered nothing")]
    NoAnswer { path: String },
    #[error("ipamd at {path}: {source}")]
    Wire { path: String, source: WireError },
}

/// Sends `req` to the socket at `path` and waits up to `timeout` for the answer.
pub fn call(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let p = path.display().to_string();
    let stream = UnixStream::connect(path).map_err(|source| ClientError::Unreachable { path: p.clone(), source })?;
    let io = |source| ClientError::Io { path: p.clone(), source };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    (&stream).write_all(encode(req).as_bytes()).map_err(io)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).map_err(io)?;
    if line.trim().is_empty() {
        return Err(ClientError::NoAnswer { path: p });
    }
    decode(&line).map_err(|source| ClientError::Wire { path: p, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AttachmentKey, decode as dec};
    use std::os::unix::net::UnixListener;

    #[test]
    fn one_request_one_answer_over_a_real_socket() {
        let dir = std::env::temp_dir().join(format!("underway-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("ipamd.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            let req: Request = dec(&line).unwrap();
            let found = matches!(req, Request::Del(_));
            (&s).write_all(encode(&Response::Released { found }).as_bytes()).unwrap();
        });
        let key = AttachmentKey { network: "n".into(), container_id: "c".into(), ifname: "eth0".into() };
        let r = call(&sock, &Request::Del(key), Duration::from_secs(5)).unwrap();
        assert_eq!(r, Response::Released { found: true });
        server.join().unwrap();

        std::fs::remove_file(&sock).unwrap();
        let e = call(&sock, &Request::Status, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, ClientError::Unreachable { .. }), "{e}");
        assert!(e.to_string().contains("ipamd.sock"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
