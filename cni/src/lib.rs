//! The underway CNI plugin (spec 1.1): ADD, DEL, CHECK, VERSION, STATUS, GC.
//!
//! It stays thin: one request to ipamd over its unix socket (`underway-api`), then the datapath
//! (`underway-routes`), then the result. No cloud SDK, no multi-thread runtime. Everything it
//! prints on stdout is the spec's JSON; logs go to `logFile` or stderr.

pub mod config;
pub mod env;
pub mod error;
pub mod result;

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use underway_api::client::{ClientError, call};
use underway_api::{AddRequest, ApiError, AttachmentKey, ErrorKind, GcRequest, Request, Response};
use underway_routes::{
    PodSpec, Replace, RoutesError, VethSpec, check_pod, gc_host_veths, host_veth_name, make_veth, pod_veth_name,
    teardown_attachment,
};

use crate::config::NetConf;
use crate::env::{Command, Env};
use crate::error::{CniError, code};

/// What to print and the exit status.
pub struct Output {
    pub stdout: String,
    pub status: i32,
}

/// Runs one invocation. `get` reads the environment; `stdin` is the network config.
pub fn run(get: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Output {
    let fallback_version = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(|s| s.as_str()).map(str::to_string))
        .filter(|v| config::version_rank(v).is_some())
        .unwrap_or_else(|| "1.1.0".to_string());
    let fail = |e: CniError| Output { stdout: e.to_json(&fallback_version), status: 1 };
    let env = match env::parse(&get) {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    if env.command == Command::Version {
        return Output { stdout: result::version_result(&fallback_version).to_string(), status: 0 };
    }
    let conf = match config::parse(stdin, env.command) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    if let Err(e) = env::check_netns(&env) {
        return Output { stdout: e.to_json(&conf.cni_version), status: 1 };
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(CniError::new(code::IO, "cannot start the runtime", e.to_string())),
    };
    let log = Log { conf: &conf, container: &env.container_id };
    let res = match env.command {
        Command::Add => add(&rt, &env, &conf, &log),
        Command::Del => del(&rt, &env, &conf, &log).map(|_| String::new()),
        Command::Check => check(&rt, &env, &conf).map(|_| String::new()),
        Command::Status => status(&conf).map(|_| String::new()),
        Command::Gc => gc(&rt, &conf, &log).map(|_| String::new()),
        Command::Version => unreachable!("answered above"),
    };
    match res {
        Ok(stdout) => {
            let netns = if env.netns.is_empty() { "-" } else { env.netns.as_str() };
            let cmd = format!("{:?}", env.command).to_uppercase();
            log.write("info", &format!("{cmd} ok (netns {netns})"));
            Output { stdout, status: 0 }
        }
        Err(e) => {
            log.write("error", &e.to_string());
            Output { stdout: e.to_json(&conf.cni_version), status: 1 }
        }
    }
}

struct Log<'a> {
    conf: &'a NetConf,
    container: &'a str,
}

impl Log<'_> {
    fn write(&self, level: &str, msg: &str) {
        if level == "debug" && !self.conf.debug {
            return;
        }
        let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let line = format!("{t:.3} {level} underway[{}] container={} {msg}\n", std::process::id(), self.container);
        let written = self.conf.log_file.as_ref().is_some_and(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .and_then(|mut f| f.write_all(line.as_bytes()))
                .is_ok()
        });
        if !written {
            eprint!("{line}");
        }
    }
}

fn key(env: &Env, conf: &NetConf) -> AttachmentKey {
    AttachmentKey { network: conf.name.clone(), container_id: env.container_id.clone(), ifname: env.ifname.clone() }
}

fn rpc(conf: &NetConf, req: &Request) -> Result<Response, ClientError> {
    call(&conf.ipamd_socket, req, conf.ipamd_timeout)
}

fn unreachable_err(e: ClientError) -> CniError {
    CniError::new(code::TRY_AGAIN_LATER, "ipamd is not reachable; try again later", e.to_string())
}

fn api_err(what: &str, e: ApiError) -> CniError {
    let c = match e.kind {
        ErrorKind::VersionMismatch => code::INCOMPATIBLE_VERSION,
        ErrorKind::BadRequest => code::INVALID_CONFIG,
        ErrorKind::Internal => code::IO,
        ErrorKind::UnknownAttachment => code::UNKNOWN_CONTAINER,
        ErrorKind::NotReady
        | ErrorKind::PoolEmpty
        | ErrorKind::SubnetExhausted
        | ErrorKind::EniLimitReached
        | ErrorKind::Throttled
        | ErrorKind::RouteTableFull
        | ErrorKind::RouteConflict
        | ErrorKind::Other => code::TRY_AGAIN_LATER,
    };
    CniError::new(c, what, format!("{:?}: {}", e.kind, e.message))
}

fn unexpected(what: &str, r: Response) -> CniError {
    CniError::new(code::IO, what, format!("unexpected answer from ipamd: {r:?}"))
}

/// The host veth's name: the policy engines' per-pod name when the runtime passes the pod.
fn veth_name(env: &Env, conf: &NetConf) -> String {
    let (ns, pod) = (env.pod_namespace(), env.pod_name());
    let pod = ns.as_deref().zip(pod.as_deref());
    pod_veth_name(&conf.veth_prefix, pod, &env.container_id, &env.ifname)
}

/// The MTU of pod veths when neither the conflist nor ipamd says (ipamd's `eni.mtu` default).
const DEFAULT_MTU: u32 = 9001;

fn spec_for(env: &Env, conf: &NetConf, alloc: &underway_api::Allocation) -> PodSpec {
    PodSpec {
        network: conf.name.clone(),
        attachment: host_veth_name(&conf.veth_prefix, &env.container_id, &env.ifname),
        host_veth: veth_name(env, conf),
        ifname: env.ifname.clone(),
        address: alloc.address,
        gateway: alloc.gateway,
        mtu: conf.mtu.or(alloc.mtu).unwrap_or(DEFAULT_MTU),
        route_table: alloc.route_table,
    }
}

fn add(rt: &tokio::runtime::Runtime, env: &Env, conf: &NetConf, log: &Log) -> Result<String, CniError> {
    const WHAT: &str = "ipamd could not assign an address";
    let req = Request::Add(AddRequest {
        key: key(env, conf),
        netns: env.netns.clone(),
        pod_namespace: env.pod_namespace(),
        pod_name: env.pod_name(),
    });
    // ipamd answers while the veth pair is made (it needs no address): an ADD waits for the
    // longer of the two instead of both. The MTU is the conflist's, else ipamd's default; an
    // answer with another makes the pair follow it.
    let veth = VethSpec {
        network: conf.name.clone(),
        attachment: host_veth_name(&conf.veth_prefix, &env.container_id, &env.ifname),
        host_veth: veth_name(env, conf),
        ifname: env.ifname.clone(),
        mtu: conf.mtu.unwrap_or(DEFAULT_MTU),
    };
    // Only this attachment's own leftover is replaced before ipamd answers: a veth of the same
    // name that is an older sandbox's (names are per pod) goes only once this ADD has an address.
    let (answer, made) = std::thread::scope(|s| {
        let asked = s.spawn(|| rpc(conf, &req));
        let made = rt.block_on(make_veth(None, Path::new(&env.netns), &veth, Replace::OnlyOurs));
        (asked.join(), made)
    });
    let answer = answer.unwrap_or_else(|_| {
        Err(ClientError::Io {
            path: conf.ipamd_socket.display().to_string(),
            source: std::io::Error::other("panicked"),
        })
    });
    let alloc = match answer.map_err(unreachable_err).and_then(|r| match r {
        Response::Added(a) => Ok(a),
        Response::Error(e) => Err(api_err(WHAT, e)),
        other => Err(unexpected(WHAT, other)),
    }) {
        Ok(a) => a,
        Err(e) => {
            // No address: the pair goes (no half-made veth is left).
            match made {
                Ok(v) => {
                    if let Err(d) = rt.block_on(v.discard()) {
                        log.write("error", &format!("removing the veth {} after ipamd's refusal: {d}", veth.host_veth));
                    }
                }
                Err(m) => log.write("debug", &format!("the veth pair was not made either: {m}")),
            }
            return Err(e);
        }
    };
    let spec = spec_for(env, conf, &alloc);
    log.write("debug", &format!("ADD {} → {} table {:?}", spec.host_veth, alloc.address, alloc.route_table));
    let made = match made {
        Err(RoutesError::Occupied { .. }) => rt.block_on(make_veth(None, Path::new(&env.netns), &veth, Replace::Any)),
        other => other,
    };
    match made {
        Ok(v) => rt.block_on(v.finish(&spec)),
        Err(e) => Err(e),
    }
    .map(|links| {
        result::add_result(&conf.cni_version, &spec.host_veth, &env.ifname, &env.netns, &links, &alloc).to_string()
    })
    .map_err(|e| {
        // make_veth and finish removed what they made; the address goes back so nothing leaks.
        let released = rpc(conf, &Request::Del(key(env, conf)));
        log.write(
            "error",
            &format!("ADD datapath failed ({e}); address {} released: {}", alloc.address, released.is_ok()),
        );
        CniError::new(code::IO, "setting up the pod's network failed", e.to_string())
    })
}

fn del(rt: &tokio::runtime::Runtime, env: &Env, conf: &NetConf, log: &Log) -> Result<(), CniError> {
    let attachment = host_veth_name(&conf.veth_prefix, &env.container_id, &env.ifname);
    // The datapath goes first and needs nothing from ipamd: the host route names the address.
    // Only this attachment's veth: one of the same name may be a newer sandbox's of the same pod.
    let veth = rt
        .block_on(teardown_attachment(None, &conf.veth_prefix, &veth_name(env, conf), &attachment))
        .map_err(|e| CniError::new(code::IO, "removing the pod's network failed", e.to_string()))?;
    let veth = veth.unwrap_or_else(|| "no veth".into());
    match rpc(conf, &Request::Del(key(env, conf))) {
        Ok(Response::Released { found }) => {
            log.write("debug", &format!("DEL {veth}: released={found}"));
            Ok(())
        }
        Ok(Response::Error(e)) => Err(api_err("ipamd could not release the address", e)),
        Ok(other) => Err(unexpected("ipamd could not release the address", other)),
        // The runtime retries DEL on code 11, so the release is not lost.
        Err(e) => Err(unreachable_err(e)),
    }
}

fn check(rt: &tokio::runtime::Runtime, env: &Env, conf: &NetConf) -> Result<(), CniError> {
    const WHAT: &str = "CHECK failed";
    let alloc = match rpc(conf, &Request::Check(key(env, conf))).map_err(unreachable_err)? {
        Response::Checked(a) => a,
        Response::Error(e) => return Err(api_err(WHAT, e)),
        other => return Err(unexpected(WHAT, other)),
    };
    if let Some(prev) = &conf.prev_result {
        result::check_prev(prev, &env.ifname, &env.netns, &alloc)
            .map_err(|why| CniError::config("prevResult", format!("{WHAT}: {why}")))?;
    }
    let mut spec = spec_for(env, conf, &alloc);
    // The attachment's veth as it is named on the node (a pod made before veths were named per
    // pod keeps its old name); one whose alias names another attachment is not this pod's.
    let found = rt
        .block_on(underway_routes::attachment_veth(None, &conf.veth_prefix, &spec.host_veth, &spec.attachment))
        .map_err(|e| CniError::new(code::IO, WHAT, e.to_string()))?;
    match found {
        Some(name) => spec.host_veth = name,
        None => {
            return Err(CniError::new(
                code::IO,
                WHAT,
                format!("no host veth of this attachment (expected {}, alias {})", spec.host_veth, spec.attachment),
            ));
        }
    }
    rt.block_on(check_pod(None, Path::new(&env.netns), &spec)).map_err(|e| CniError::new(code::IO, WHAT, e.to_string()))
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    const WHAT: &str = "underway cannot add pods now";
    match rpc(conf, &Request::Status) {
        Ok(Response::Status(s)) if s.ready => Ok(()),
        Ok(Response::Status(s)) => Err(CniError::new(code::NOT_AVAILABLE, WHAT, s.reason)),
        Ok(Response::Error(e)) => Err(CniError::new(code::NOT_AVAILABLE, WHAT, e.message)),
        Ok(other) => Err(unexpected(WHAT, other)),
        Err(e) => Err(CniError::new(code::NOT_AVAILABLE, WHAT, e.to_string())),
    }
}

fn gc(rt: &tokio::runtime::Runtime, conf: &NetConf, log: &Log) -> Result<(), CniError> {
    const WHAT: &str = "GC failed";
    let valid: Vec<AttachmentKey> = conf
        .valid_attachments
        .iter()
        .map(|(c, i)| AttachmentKey { network: conf.name.clone(), container_id: c.clone(), ifname: i.clone() })
        .collect();
    let keep = valid.iter().map(|k| host_veth_name(&conf.veth_prefix, &k.container_id, &k.ifname)).collect();
    match rpc(conf, &Request::Gc(GcRequest { network: conf.name.clone(), valid })).map_err(unreachable_err)? {
        Response::Collected { released } => log.write("debug", &format!("GC released {released:?}")),
        Response::Error(e) => return Err(api_err(WHAT, e)),
        other => return Err(unexpected(WHAT, other)),
    }
    let removed = rt
        .block_on(gc_host_veths(None, &conf.veth_prefix, &conf.name, &keep))
        .map_err(|e| CniError::new(code::IO, WHAT, e.to_string()))?;
    log.write("debug", &format!("GC removed host veths {removed:?}"));
    Ok(())
}
