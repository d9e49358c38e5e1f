//! The `switchyard` command: `run` the gateway, `validate` a routes file, print the `schema`.
//! Exit code 64 (EX_USAGE) on bad config.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchyard::telemetry::{self, LogFormat};
use switchyard::{app, config};

/// Exit codes, from sysexits(3): bad config (EX_USAGE), a config file that does not exist
/// (EX_NOINPUT), a backend that does not work as configured (`validate --live`,
/// EX_UNAVAILABLE), a failure of the gateway itself (EX_SOFTWARE), a port in use (EX_CONFIG:
/// another instance or service holds it).
const EXIT_BAD_CONFIG: u8 = 64;
const EXIT_NO_INPUT: u8 = 66;
const EXIT_UNAVAILABLE: u8 = 69;
const EXIT_INTERNAL: u8 = 70;
const EXIT_IN_USE: u8 = 78;

/// The exit for a config file that does not exist, with the message saying so.
fn missing(file: &Path) -> Option<ExitCode> {
    if file.exists() {
        return None;
    }
    eprintln!("error: {}: not found", file.display());
    Some(ExitCode::from(EXIT_NO_INPUT))
}

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "A protocol-bridging API gateway"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "pretty",
        env = "SWITCHYARD_LOG_FORMAT"
    )]
    log_format: LogFormat,
    /// The largest routes file read (`16MiB` by default; `64MiB`, `100000000`).
    #[arg(long, global = true, value_parser = parse_size, default_value = "16MiB", env = "SWITCHYARD_MAX_CONFIG_SIZE")]
    max_config_size: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve until SIGTERM/SIGINT, then drain in-flight requests.
    Run {
        /// The routes file.
        #[arg(long, short, env = "SWITCHYARD_CONFIG", default_value = "routes.yaml")]
        config: PathBuf,
        /// Do not watch the config's directory for changes (SIGHUP and POST /reload still work).
        #[arg(long)]
        no_watch: bool,
    },
    /// Check a routes file; print every problem with file:line:column.
    Validate {
        /// The routes file.
        file: PathBuf,
        /// Then try every backend against the real services, creating nothing: connections,
        /// exchanges and queues (passive declarations), MQTT subscriptions, gRPC methods, HTTP
        /// endpoints, the state store. Exit 69 when one fails.
        #[arg(long)]
        live: bool,
        /// How `--live` reports: a table, or a JSON array of findings.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Print the JSON Schema of routes.yaml.
    Schema,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Table,
    Json,
}

fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>().map(|b| b.as_u64())
}

fn validate(file: &Path, max_size: u64, live: Option<Format>) -> ExitCode {
    if let Some(code) = missing(file) {
        return code;
    }
    let name = file.display().to_string();
    let result = config::read_file(file, max_size)
        .and_then(|text| config::load_str(&name, &text, &config::process_env));
    match result {
        Ok(spec) => {
            let (routes, backends) = (spec.routes.len(), spec.backends.len());
            let checked = live.map(|_| spec.clone());
            // The pure checks passed; now build the table as a reload would (compiling protos,
            // resolving gRPC methods), without serving anything.
            let text = std::fs::read_to_string(file).unwrap_or_default();
            match build_check(file, spec) {
                Err(e) => {
                    // Placed like validation errors: each at the route or backend it is about.
                    let errors = e.placed(&name, &text);
                    for e in &errors.0 {
                        eprintln!("error: {e}");
                    }
                    eprintln!("{name}: {} problem(s) found", errors.0.len());
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
                // Generated routes that cannot be served: the others can, so a warning, at the
                // backend that would make them.
                Ok(unserved) => {
                    let loc = config::source::locate(&text);
                    for u in unserved {
                        let at = loc.key(&format!("backends.{}", u.backend));
                        eprintln!("warning: {name}:{}:{}: {u}", at.line, at.column);
                    }
                }
            }
            match (checked, live) {
                (Some(spec), Some(format)) => live_check(file, &spec, format),
                _ => {
                    println!("{name}: ok ({routes} routes, {backends} backends)");
                    ExitCode::SUCCESS
                }
            }
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            eprintln!("{name}: {} problem(s) found", errors.0.len());
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}

fn build_check(
    file: &Path,
    spec: config::ConfigSpec,
) -> Result<Vec<switchyard::backends::bridge::Unserved>, switchyard::router::BuildErrors> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| switchyard::router::BuildError::process(format!("cannot start: {e}")))?;
    let base = file.parent().unwrap_or(Path::new(".")).to_path_buf();
    rt.block_on(async move {
        let metrics = std::sync::Arc::new(switchyard::telemetry::metrics::Metrics::new());
        let mut cx = switchyard::backends::BuildContext::prepare(&spec.backends, &base).await;
        cx.dry = true;
        switchyard::router::RouteTable::build(
            spec,
            1,
            &switchyard::backends::BackendSet::default(),
            &metrics,
            &cx,
        )
        .map(|t| t.unserved)
    })
}

/// `validate --live`: every backend against the real services; the report on stdout.
fn live_check(file: &Path, spec: &config::ConfigSpec, format: Format) -> ExitCode {
    use switchyard::backends::live;
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the checks: {e}");
            return ExitCode::from(EXIT_INTERNAL);
        }
    };
    let base = file.parent().unwrap_or(Path::new(".")).to_path_buf();
    let findings = rt.block_on(live::check(spec, &base));
    match format {
        Format::Table => print!("{}", live::table(&findings)),
        Format::Json => match serde_json::to_string_pretty(&findings) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_INTERNAL);
            }
        },
    }
    // The checkers' clients may keep background tasks; they end with the runtime.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    if findings.iter().any(|f| f.result == live::Verdict::Fail) {
        ExitCode::from(EXIT_UNAVAILABLE)
    } else {
        ExitCode::SUCCESS
    }
}

async fn run(config: PathBuf, watch: bool, max_config_size: u64) -> anyhow::Result<ExitCode> {
    if let Some(code) = missing(&config) {
        return Ok(code);
    }
    let running = match app::start(app::Options {
        config,
        watch,
        sighup: true,
        max_config_size,
    })
    .await
    {
        Ok(r) => r,
        Err(app::StartError::Config(errors)) => {
            for e in errors {
                tracing::error!("{e}");
            }
            return Ok(ExitCode::from(EXIT_BAD_CONFIG));
        }
        Err(e @ app::StartError::Bind { .. }) => {
            tracing::error!(error = %e, "Another process holds the address; is a second instance running?");
            return Ok(ExitCode::from(EXIT_IN_USE));
        }
        Err(e) => return Err(e.into()),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // `server.drain_delay` first (a second signal cuts it short), then the drain itself.
    running
        .drain(async {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await;
    tracing::info!("Shutting down; draining in-flight requests.");
    running.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { file, live, format } => {
            Ok(validate(&file, cli.max_config_size, live.then_some(format)))
        }
        Command::Schema => {
            println!("{}", serde_json::to_string_pretty(&config::json_schema())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { config, no_watch } => {
            telemetry::init(cli.log_format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            match rt.block_on(run(config, !no_watch, cli.max_config_size)) {
                Ok(code) => Ok(code),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "The gateway failed.");
                    Ok(ExitCode::from(EXIT_INTERNAL))
                }
            }
        }
    }
}
