//! `underway-ipamd`: the node IPAM daemon and its operator's commands (`cli.rs`).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    underway_ipamd::memory::limit_arenas();
    let cli = underway_ipamd::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UNDERWAY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,aws=warn,hyper=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    underway_ipamd::cli::run(cli)
}
