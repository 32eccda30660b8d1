//! The command line of `underway-ipamd`: the daemon (`run`), its checks (`check-config`, `status`,
//! `health`), the maintenance commands (`uninstall`, `gc-cluster`, `gc-routes`, `crd`) and the
//! operator's views over the introspection API (`pods`, `enis`, `routes`, `errors`, `pool`, each
//! with `-o table|json`). `main.rs` only parses and calls [`run`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::Config;

#[derive(Parser)]
#[command(name = "underway-ipamd", version, about = "underway's node IPAM daemon")]
pub struct Cli {
    /// TOML config file; UNDERWAY_* variables override it (`__` between levels).
    #[arg(long, short, global = true, env = "UNDERWAY_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the daemon until SIGTERM or SIGINT.
    Run,
    /// Validate the configuration and print the effective one.
    CheckConfig,
    /// Ask the running daemon for its status line; exits non-zero when it is not ready.
    Status,
    /// Liveness: exits non-zero when the daemon's reconciler is stalled or dead (its `/healthz`
    /// on `introspection_listen`), or the daemon does not answer. The DaemonSet's liveness probe.
    Health,
    /// Print the UnderwayPool CustomResourceDefinition (YAML), as committed in deploy/k8s/crd.yaml.
    Crd,
    /// Run the cluster-wide GC once (ENIs and VPC routes of nodes that are gone), as the
    /// Lease holder does every `kubernetes.gc.interval_ms`.
    GcCluster,
    /// Remove the CNI config ipamd installed (`cni.conf_dir`), e.g. when underway is removed; in
    /// VPC-route mode also this node's routes (a graceful stop keeps them).
    Uninstall,
    /// VPC-route mode: delete routes inside `vpc_route.cluster_cidr` whose target (instance or
    /// ENI) is gone, in the given tables (default: `vpc_route.route_tables`).
    GcRoutes {
        #[arg(long = "table")]
        tables: Vec<String>,
    },
    /// The pods holding an address: address, pod, container, interface, age (introspection API).
    Pods(View),
    /// The pool's ENIs (or VPC-route address block): device, route table, free/assigned/cooling.
    Enis(View),
    /// Each pod address with the ENI and route table its traffic uses, and whether its host veth
    /// routes it on the node.
    Routes(View),
    /// The recent errors ipamd recorded (why an address could not be given, EC2 refusals, …).
    Errors(View),
    /// The pool at a glance: ready or why not, what blocks growth, totals.
    Pool(View),
}

/// How an operator's view is printed.
#[derive(clap::Args, Clone, Copy)]
pub struct View {
    /// `table` (aligned columns) or `json` (the introspection API's answer as is).
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

fn config(cli: &Cli) -> Result<Config, String> {
    let env: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k != "UNDERWAY_CONFIG").collect();
    Config::load(cli.config.as_deref(), &env).map_err(|e| e.to_string())
}

/// Runs one command line.
pub fn run(cli: Cli) -> ExitCode {
    if let Cmd::Crd = cli.cmd {
        print!("{}", crate::k8s::crd_yaml());
        return ExitCode::SUCCESS;
    }
    let cfg = match config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("underway-ipamd: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.cmd {
        Cmd::CheckConfig => {
            println!("{}", serde_json::to_string_pretty(&cfg).expect("config serialises"));
            ExitCode::SUCCESS
        }
        Cmd::Status => {
            match underway_api::client::call(&cfg.socket, &underway_api::Request::Status, Duration::from_secs(5)) {
                Ok(r) => {
                    println!("{}", serde_json::to_string(&r).expect("serialises"));
                    // Scripts and readiness checks read the exit code: not ready is a failure.
                    match r {
                        underway_api::Response::Status(s) if s.ready => ExitCode::SUCCESS,
                        _ => ExitCode::FAILURE,
                    }
                }
                Err(e) => {
                    eprintln!("underway-ipamd: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Health => match crate::http::health(&cfg) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("underway-ipamd: unhealthy: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Uninstall => {
            match crate::install::uninstall(&cfg.cni) {
                Ok(Some(p)) => println!("removed {}", p.display()),
                Ok(None) => println!("no CNI config installed"),
                Err(e) => {
                    eprintln!("underway-ipamd: {e}");
                    return ExitCode::FAILURE;
                }
            }
            if cfg.egress.enabled {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
                let rule = rt.block_on(underway_routes::egress::remove_main_rule(None));
                match underway_routes::egress::remove(None).and(rule) {
                    Ok(()) => println!("removed the nftables table ip {}", underway_routes::egress::TABLE),
                    Err(e) => {
                        eprintln!("underway-ipamd: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            if cfg.mode != crate::config::Mode::VpcRoute {
                return ExitCode::SUCCESS;
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
            match rt.block_on(crate::daemon::remove_node_routes(&cfg)) {
                Ok(lines) => {
                    for l in &lines {
                        println!("{l}");
                    }
                    println!("{} routes of this node deleted", lines.len());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("underway-ipamd: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Crd => unreachable!("answered before the config is read"),
        Cmd::GcCluster => {
            let scope = crate::gc::Scope::of(&cfg);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
            let r = rt.block_on(async {
                let cloud = underway_cloud::aws::Ec2Cloud::connect(&cfg.cloud).await;
                crate::gc::run(&cloud, &scope).await
            });
            match r {
                Ok(d) => {
                    for l in d.lines() {
                        println!("{l}");
                    }
                    println!("{} ENIs and {} routes deleted", d.enis.len(), d.routes.len());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("underway-ipamd: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::GcRoutes { tables } => {
            let tables = if tables.is_empty() { cfg.vpc_route.route_tables.clone() } else { tables };
            let Some(cluster) = cfg.vpc_route.cluster_cidr else {
                eprintln!(
                    "underway-ipamd: config: vpc_route.cluster_cidr: required by gc-routes (only routes inside it are ever deleted)"
                );
                return ExitCode::from(2);
            };
            if tables.is_empty() {
                eprintln!("underway-ipamd: config: vpc_route.route_tables: none given (or pass --table rtb-…)");
                return ExitCode::from(2);
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
            let r = rt.block_on(async {
                let cloud = underway_cloud::aws::Ec2Cloud::connect(&cfg.cloud).await;
                crate::gc::gc_routes(&cloud, &cfg.cluster, &tables, cluster).await
            });
            match r {
                Ok(lines) => {
                    for l in &lines {
                        println!("{l}");
                    }
                    println!("{} stale routes deleted", lines.len());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("underway-ipamd: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Pods(v) => operator(&cfg, crate::operator::Kind::Pods, v),
        Cmd::Enis(v) => operator(&cfg, crate::operator::Kind::Enis, v),
        Cmd::Routes(v) => operator(&cfg, crate::operator::Kind::Routes, v),
        Cmd::Errors(v) => operator(&cfg, crate::operator::Kind::Errors, v),
        Cmd::Pool(v) => operator(&cfg, crate::operator::Kind::Pool, v),
        Cmd::Run => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
            let rt = match rt {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("underway-ipamd: tokio: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let r = rt.block_on(crate::daemon::run(cfg, async {
                use tokio::signal::unix::{SignalKind, signal};
                let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }));
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("underway-ipamd: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn operator(cfg: &Config, kind: crate::operator::Kind, v: View) -> ExitCode {
    match crate::operator::show(cfg, kind, v.output == Output::Json) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("underway-ipamd: {e}");
            ExitCode::FAILURE
        }
    }
}
