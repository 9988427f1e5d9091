//! The `tollgate` binary: `serve` (the gateway), `loadgen` (the load
//! generator), `simulate` (the backend double) and `migrate` (a single
//! node's SQLite data into PostgreSQL).
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tollgate::log_writer::Flusher;
use tracing_subscriber::EnvFilter;

use tollgate::app::{LogReload, Reloads};
use tollgate::config::{Config, LogConfig, LogFormat, SimulatorConfig};

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Concurrency-limiting task gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (data plane and admin listener).
    Serve {
        /// TOML config file; without one, the embedded defaults run the demo.
        #[arg(long, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Load-test a tollgate deployment (or any HTTP endpoint).
    Loadgen(tollgate::loadgen::LoadgenArgs),
    /// Run the style-transfer backend double.
    Simulate {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: std::net::SocketAddr,
        /// Mean answer latency.
        #[arg(long, default_value_t = 800)]
        latency_ms: u64,
        /// Latency is uniform in mean ± jitter.
        #[arg(long, default_value_t = 400)]
        jitter_ms: u64,
        /// Share of requests answered with a 500.
        #[arg(long, default_value_t = 0.0)]
        failure_rate: f64,
    },
    /// Copy a stopped single node's SQLite data into an empty PostgreSQL
    /// database (before running several replicas).
    Migrate(tollgate::store::migrate::MigrateArgs),
}

/// The target of the warning about a suspect `RUST_LOG`, let through by
/// the filter whatever `RUST_LOG` says.
const FILTER_WARNING: &str = "tollgate::log_filter";

/// Installs the subscriber; the returned function swaps its filter (a
/// config reload). With `RUST_LOG` set, that variable stands in for
/// `log.level` (at start and on reloads); `log.access` applies either way.
///
/// Lines are formatted on the thread that logs and gathered in a buffer
/// that a writer thread puts on stderr every few milliseconds
/// (`log_writer`): the access log's line per task costs no `write` and no
/// wake-up on the request path. Never lossy (a full buffer makes the
/// logger wait); what is buffered is written when the returned guard
/// drops, so keep it until the process ends.
fn init_logging(log: &LogConfig) -> (LogReload, Flusher) {
    let (writer, guard) =
        match tollgate::log_writer::buffered(Box::new(std::io::stderr()), "tollgate-log") {
            Ok(w) => w,
            Err(e) => {
                eprintln!("tollgate: cannot start the log writer thread: {e}");
                std::process::exit(1);
            }
        };
    let from_env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    // RUST_LOG is the operator's escape hatch: a value `log.level` would
    // refuse (a bare word such as `warnn`, read as a target name) is used
    // as given, with a warning that its own filter lets through.
    let rust_log_problem = from_env
        .as_deref()
        .and_then(|v| tollgate::config::check_log_level(v).err());
    let warning_passes = rust_log_problem.is_some();
    let filter_of = move |log: &LogConfig| {
        let level = from_env.clone().unwrap_or_else(|| log.level.clone());
        let filter = LogConfig {
            level,
            ..log.clone()
        }
        .filter();
        if warning_passes {
            format!("{filter},{FILTER_WARNING}=warn")
        } else {
            filter
        }
    };
    let parsed = EnvFilter::try_new(filter_of(log));
    let fell_back = parsed.is_err();
    let filter = parsed.unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    macro_rules! install {
        ($builder:expr) => {{
            let builder = $builder.with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |log: &LogConfig| {
                let filter =
                    EnvFilter::try_new(filter_of(log)).map_err(|e| format!("log.level: {e}"))?;
                handle.reload(filter).map_err(|e| format!("log.level: {e}"))
            })
        }};
    }
    let reload: LogReload = match log.format {
        LogFormat::Json => install!(builder.json()),
        LogFormat::Text => install!(builder),
    };
    if let Some(problem) = rust_log_problem {
        let instead = if fell_back {
            "; logging at info instead"
        } else {
            "; it stands in for log.level and is used as given"
        };
        tracing::warn!(target: FILTER_WARNING, "RUST_LOG: {problem}{instead}");
    }
    (reload, guard)
}

fn quiet_logging(level: &str) -> Flusher {
    let log = LogConfig {
        level: level.into(),
        access: false,
        ..LogConfig::default()
    };
    init_logging(&log).1
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if matches!(cli.command, Command::Serve { .. }) {
        // The data plane runs on its own threads (`server.workers`); this
        // runtime has the admin API and the background work.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        builder.worker_threads(cores.min(2));
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tollgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve { config } => {
            let config_path = config;
            let config = match Config::load(config_path.as_deref(), std::env::vars()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("tollgate: {e}");
                    return ExitCode::from(2);
                }
            };
            let (log, _log_writer) = init_logging(&config.log);
            let reloads = Reloads {
                path: config_path,
                log: Some(log),
            };
            let served = runtime.block_on(tollgate::app::serve(config, reloads));
            // Tasks still running past the grace period end with the
            // runtime: let their last lines reach the log writer, which
            // stops with `_log_writer` at the end of this arm.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "tollgate could not start");
                    eprintln!("tollgate: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Loadgen(args) => {
            let plan = match args.plan() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("tollgate loadgen: {e}");
                    return ExitCode::from(2);
                }
            };
            let show_progress = !args.json && std::io::stderr().is_terminal();
            let report = runtime.block_on(tollgate::loadgen::run(plan, show_progress));
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("tollgate loadgen: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", report.to_text());
            }
            if report.all_failed() {
                eprintln!("tollgate loadgen: no request got a 2xx answer");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Command::Migrate(args) => {
            let _log_writer = quiet_logging("warn");
            match runtime.block_on(tollgate::store::migrate::run(&args)) {
                Ok(summary) => {
                    print!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tollgate migrate: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Command::Simulate {
            listen,
            latency_ms,
            jitter_ms,
            failure_rate,
        } => {
            let _log_writer = quiet_logging("info");
            if jitter_ms > latency_ms || !(0.0..=1.0).contains(&failure_rate) {
                eprintln!(
                    "tollgate simulate: --jitter-ms must not exceed --latency-ms, and --failure-rate must be in 0..=1"
                );
                return ExitCode::from(2);
            }
            let config = SimulatorConfig {
                listen,
                latency_ms,
                latency_jitter_ms: jitter_ms,
                failure_rate,
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::bind(listen).await {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("tollgate simulate: cannot listen on {listen}: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                if let Ok(addr) = listener.local_addr() {
                    println!("tollgate-simulator: listening on http://{addr}");
                }
                let stop = CancellationToken::new();
                let sim = Arc::new(tollgate::simulator::Simulator::new(config));
                let server = tokio::spawn(tollgate::simulator::serve(sim, listener, stop.clone()));
                let _ = tokio::signal::ctrl_c().await;
                stop.cancel();
                let _ = server.await;
                ExitCode::SUCCESS
            })
        }
    }
}
