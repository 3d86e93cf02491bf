//! The `herald` command (clap): run the broker with a configuration until SIGINT or SIGTERM,
//! check a configuration file, or set a password in a password file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use herald::config::Config;

/// jemalloc rather than glibc's malloc: glibc gives each thread that allocates an arena of its
/// own and keeps what was freed there, so resident memory after subscription churn or a drained
/// backlog stayed near the highest any worker thread had reached, and rose with each round of
/// churn (bench/notes.md, issue 26; mimalloc was measured too).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its first allocation: a background thread gives memory freed and
/// unused for a second back to the system (the default 10 s decay happens only when the
/// process allocates again, so a broker gone quiet after a peak never gave it back).
/// `MALLOC_CONF` in the environment still overrides these.
#[unsafe(export_name = "malloc_conf")]
static MALLOC_CONF: JemallocConf =
    JemallocConf(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// A C string pointer jemalloc reads (`const char *malloc_conf`).
#[repr(transparent)]
struct JemallocConf(*const std::ffi::c_char);
// SAFETY: it points at a string literal, never written.
unsafe impl Sync for JemallocConf {}

/// The Herald MQTT broker. SIGHUP (or POST /api/v1/reload) reloads the password file, ACL, JWT
/// key, limits and TLS certificates; SIGTERM or SIGINT shuts down within [shutdown]
/// grace_period.
#[derive(Parser)]
#[command(name = "herald", version, about)]
struct Cli {
    /// The configuration file (docs/configuration.md).
    #[arg(short, long, default_value = "config.toml", value_name = "PATH")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Reads and validates a configuration file without starting the broker: exits 0 if it is
    /// valid, 1 with the offending key named otherwise.
    CheckConfig {
        #[arg(value_name = "PATH")]
        path: PathBuf,
    },
    /// Adds or replaces USER in the Mosquitto-format password FILE (created if missing), with a
    /// PBKDF2-SHA512 hash; the password is read from the first line of standard input unless
    /// given.
    Passwd { file: PathBuf, user: String, password: Option<String> },
}

/// `herald passwd FILE USER [PASSWORD]`.
fn passwd(file: PathBuf, user: String, password: Option<String>) -> ExitCode {
    let password = match password {
        Some(p) => p,
        None => {
            let mut line = String::new();
            if std::io::stdin().read_line(&mut line).is_err() || line.trim_end_matches(['\r', '\n']).is_empty() {
                eprintln!("herald passwd: no password on standard input");
                return ExitCode::from(2);
            }
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    let iterations = herald::auth::password::DEFAULT_ITERATIONS;
    match herald::auth::password::set_password(&file, &user, password.as_bytes(), iterations) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald passwd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `herald check-config PATH`.
fn check_config(path: PathBuf) -> ExitCode {
    match Config::load(&path) {
        Ok(_) => {
            println!("{}: valid", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("herald: {}: {e:#}", path.display());
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Passwd { file, user, password }) => return passwd(file, user, password),
        Some(Command::CheckConfig { path }) => return check_config(path),
        None => {}
    }
    match run(cli.config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e:#}");
            // A store write failure ends with its own status (74), so that a supervisor can tell it
            // from a bad configuration (docs/operations.md).
            let status = e.downcast_ref::<herald::server::ServerError>().map_or(1, |e| e.exit_status());
            ExitCode::from(status)
        }
    }
}

fn run(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    herald::logging::init(&config.log);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async move {
        let server = herald::server::open(config)?;
        let broker = server.broker().clone();
        let mut server = tokio::spawn(herald::server::run(server, None));
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?;
        loop {
            tokio::select! {
                res = &mut server => return Ok(res.context("broker task")??),
                _ = shutdown_signal() => break,
                _ = hangup.recv() => {
                    if let Err(e) = broker.reload_config_file() {
                        tracing::error!(error = %e, "reload failed; keeping the previous configuration");
                    }
                }
            }
        }
        broker.begin_shutdown();
        Ok(server.await.context("broker task")??)
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
