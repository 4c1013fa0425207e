#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use optiverse_collab::auth::cli::{self, Command};
use optiverse_collab::config::Config;
use optiverse_collab::server::Server;
use tracing_subscriber::EnvFilter;

/// jemalloc with background threads returns what a burst freed to the system within seconds;
/// glibc's allocator kept it in its arenas (README, "Choices").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// `optiverse-collab` serves; `optiverse-collab token|revoke` manage access (README,
/// "Securing a server").
#[derive(Parser)]
#[command(
    name = "optiverse-collab",
    version,
    about = "Collaboration server for Optiverse scenes",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    server: Config,
    #[command(subcommand)]
    command: Option<Command>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.command {
        None => cli.server,
        Some(command) => return run_command(command),
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.workers > 0 {
        runtime.worker_threads(config.workers);
    }
    match runtime.enable_all().build() {
        Ok(runtime) => runtime.block_on(run(config)),
        Err(e) => {
            eprintln!("optiverse-collab: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_command(command: Command) -> ExitCode {
    let result = match command {
        Command::Token(args) => cli::token(&args),
        Command::Revoke(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|runtime| runtime.block_on(cli::revoke(&args))),
    };
    match result {
        Ok(text) => {
            println!("{}", text.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("optiverse-collab: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> ExitCode {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            EnvFilter::try_new(&config.log_level).unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    // Every connection is a descriptor: take what the hard limit allows (the soft limit is
    // often 1024). `--max-connections` is then clamped to it.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file descriptor limit"),
    }
    let store = match optiverse_collab::open_configured_store(&config).await {
        Ok(store) => store,
        Err(e) => {
            tracing::error!(error = %e, "cannot open the store");
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::start(config, store).await {
        Ok(server) => server,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    wait_for_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
