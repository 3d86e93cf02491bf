//! The `herald` command: read the configuration, set up logging, run until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use herald::config::Config;

const USAGE: &str = "usage: herald [--config PATH]\n       herald passwd FILE USER [PASSWORD]\n\n\
Runs the Herald MQTT broker. PATH defaults to ./config.toml; SIGHUP (or POST /api/v1/reload)\n\
reloads the password file, ACL, JWT key, limits and TLS certificates; SIGTERM or SIGINT shuts\n\
down within [shutdown] grace_period.\n\
`herald passwd` adds or replaces USER in the Mosquitto-format password FILE (created if missing),\n\
with a PBKDF2-SHA512 hash; the password is read from the first line of standard input unless given.";

fn parse_args() -> Result<PathBuf, String> {
    let mut args = std::env::args().skip(1);
    let mut path = PathBuf::from("config.toml");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => path = args.next().ok_or("--config needs a path")?.into(),
            "--help" | "-h" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(path)
}

/// `herald passwd FILE USER [PASSWORD]`.
fn passwd(args: &[String]) -> ExitCode {
    let (file, user, password) = match args {
        [file, user] => {
            let mut line = String::new();
            if std::io::stdin().read_line(&mut line).is_err() || line.trim_end_matches(['\r', '\n']).is_empty() {
                eprintln!("herald passwd: no password on standard input");
                return ExitCode::from(2);
            }
            (file, user, line.trim_end_matches(['\r', '\n']).to_owned())
        }
        [file, user, password] => (file, user, password.clone()),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let iterations = herald::auth::password::DEFAULT_ITERATIONS;
    match herald::auth::password::set_password(file.as_ref(), user, password.as_bytes(), iterations) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald passwd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("passwd") {
        return passwd(&args[1..]);
    }
    let path = match parse_args() {
        Ok(p) => p,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("herald: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(path) {
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
