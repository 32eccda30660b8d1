//! A small in-test ipamd: speaks the real wire API over a real unix socket, hands out
//! 10.99.0.10, .11, ... and records every request. Stops on drop.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use underway_api::*;

#[derive(Default)]
pub struct State {
    pub assigned: BTreeMap<AttachmentKey, Allocation>,
    pub requests: Vec<Request>,
    pub next: u8,
    pub not_ready: Option<String>,
    pub route_table: Option<u32>,
}

pub struct FakeIpamd {
    pub socket: PathBuf,
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeIpamd {
    pub fn start() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "underway-cni-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("ipamd.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        let state = Arc::new(Mutex::new(State { next: 10, ..State::default() }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let mut line = String::new();
                if BufReader::new(&conn).read_line(&mut line).is_err() {
                    continue;
                }
                let resp = match decode::<Request>(&line) {
                    Ok(req) => answer(&mut st.lock().unwrap(), req),
                    Err(e) => Response::Error(ApiError { kind: ErrorKind::BadRequest, message: e.to_string() }),
                };
                let _ = (&conn).write_all(encode(&resp).as_bytes());
            }
        });
        FakeIpamd { socket, state, stop, thread: Some(thread) }
    }

    pub fn assigned(&self) -> usize {
        self.state.lock().unwrap().assigned.len()
    }

    /// Stops answering: the socket is gone, as when ipamd is down.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::os::unix::net::UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for FakeIpamd {
    fn drop(&mut self) {
        self.stop();
        if let Some(d) = self.socket.parent() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn answer(st: &mut State, req: Request) -> Response {
    st.requests.push(req.clone());
    match req {
        Request::Add(a) => {
            if let Some(r) = &st.not_ready {
                return Response::Error(ApiError { kind: ErrorKind::NotReady, message: r.clone() });
            }
            if let Some(existing) = st.assigned.get(&a.key) {
                return Response::Added(existing.clone());
            }
            let alloc = Allocation {
                address: Ipv4Addr::new(10, 99, 0, st.next),
                prefix_len: 32,
                gateway: POD_GATEWAY,
                route_table: st.route_table,
                eni: None,
                mtu: Some(1500),
            };
            st.next += 1;
            st.assigned.insert(a.key, alloc.clone());
            Response::Added(alloc)
        }
        Request::Del(k) => Response::Released { found: st.assigned.remove(&k).is_some() },
        Request::Check(k) => match st.assigned.get(&k) {
            Some(a) => Response::Checked(a.clone()),
            None => Response::Error(ApiError { kind: ErrorKind::UnknownAttachment, message: format!("{k:?}") }),
        },
        Request::Status => Response::Status(StatusReply {
            ready: st.not_ready.is_none(),
            reason: st.not_ready.clone().unwrap_or_default(),
            free: 10,
            assigned: st.assigned.len() as u32,
        }),
        Request::Gc(g) => {
            let gone: Vec<AttachmentKey> =
                st.assigned.keys().filter(|k| k.network == g.network && !g.valid.contains(k)).cloned().collect();
            let released = gone.iter().filter_map(|k| st.assigned.remove(k)).map(|a| a.address).collect();
            Response::Collected { released }
        }
    }
}
