//! `underway-ipamd`: the node IPAM daemon. `run` serves; `check-config` validates a config and
//! prints the effective one; `status` asks a running ipamd over its socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use underway_ipamd::config::Config;

#[derive(Parser)]
#[command(name = "underway-ipamd", version, about = "underway's node IPAM daemon")]
struct Cli {
    /// TOML config file; UNDERWAY_* variables override it (`__` between levels).
    #[arg(long, short, global = true, env = "UNDERWAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
}

fn config(cli: &Cli) -> Result<Config, String> {
    let env: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k != "UNDERWAY_CONFIG").collect();
    Config::load(cli.config.as_deref(), &env).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UNDERWAY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,aws=warn,hyper=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Cmd::Crd = cli.cmd {
        print!("{}", underway_ipamd::k8s::crd_yaml());
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
        Cmd::Health => match underway_ipamd::http::health(&cfg) {
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
            match underway_ipamd::install::uninstall(&cfg.cni) {
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
            if cfg.mode != underway_ipamd::config::Mode::VpcRoute {
                return ExitCode::SUCCESS;
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
            match rt.block_on(underway_ipamd::daemon::remove_node_routes(&cfg)) {
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
            let scope = underway_ipamd::cluster_gc::Scope::of(&cfg);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
            let r = rt.block_on(async {
                let cloud = underway_cloud::aws::Ec2Cloud::connect(&cfg.cloud).await;
                underway_ipamd::cluster_gc::run(&cloud, &scope).await
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
                underway_ipamd::vpc_route::gc_routes(&cloud, &cfg.cluster, &tables, cluster).await
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
        Cmd::Run => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
            let rt = match rt {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("underway-ipamd: tokio: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let r = rt.block_on(underway_ipamd::daemon::run(cfg, async {
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
