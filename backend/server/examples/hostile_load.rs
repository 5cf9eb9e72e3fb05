//! Issue #18: `/healthz` under hostile load. Starts the server (`server::serve`, as
//! `storygpt-v serve` does, with the default configuration) on a temporary data directory and
//! a loopback port, runs the load of `tests/support/hostile.rs` against it, prints a table of
//! what each class of requests got and the `/healthz` latencies, and exits 1 when the probes'
//! p99 is not under the bound (or a probe was not answered 200).
//!
//! ```text
//! cargo run --release -p server --example hostile_load -- [--seconds 30] [--workers 2]
//!     [--bound-ms 100] [--addr HOST:PORT]
//! ```
//!
//! `--addr` loads a server that is already running (e.g. `storygpt-v serve`) instead; the
//! set-up then adds two characters and a story to its data.

#[path = "../tests/support/hostile.rs"]
mod hostile;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use server::config::Overrides;
use server::{FileConfig, ServeConfig};

fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::exit(2);
        }
    }
}

/// Whether the bound held.
fn run() -> anyhow::Result<bool> {
    let mut options = hostile::Options::default();
    let mut bound = Duration::from_millis(100);
    let mut addr = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--seconds" => options.duration = Duration::from_secs(value()?.parse()?),
            "--workers" => options.workers = value()?.parse()?,
            "--bound-ms" => bound = Duration::from_millis(value()?.parse()?),
            "--addr" => addr = Some(value()?),
            _ => anyhow::bail!(
                "unknown argument {flag}; use --seconds N, --workers N, --bound-ms N, --addr HOST:PORT"
            ),
        }
    }
    // Warnings only, as the CLI's default `info` logs no line per request either.
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .init();
    let data_dir = tempfile::tempdir()?;
    let addr = match addr {
        Some(addr) => addr,
        None => serve_in_process(data_dir.path())?,
    };
    eprintln!(
        "loading http://{addr} for {} s ({} clients per class, {} slow clients)",
        options.duration.as_secs(),
        options.workers,
        options.slow_clients
    );
    let report = hostile::run(&addr, &options)?;
    println!("{}", report.table());
    let under = match report.healthz_p99() {
        Some(p99) => {
            let under = p99 < bound;
            println!(
                "/healthz p99 {:.1} ms: {} the {} ms bound",
                p99.as_secs_f64() * 1000.0,
                if under { "under" } else { "NOT under" },
                bound.as_millis()
            );
            under
        }
        None => {
            println!("/healthz was not measured: no probe answered");
            false
        }
    };
    let answered = report.probes_all_ok();
    if !answered {
        println!("not every /healthz probe answered 200");
    }
    let held = under && answered;
    // The in-process server is still running (its files go with the directory): a directory
    // that cannot be removed is worth a word, not a failed measurement.
    let kept = data_dir.path().display().to_string();
    if let Err(err) = data_dir.close() {
        eprintln!("warning: cannot remove the data directory {kept}: {err}");
    }
    Ok(held)
}

/// Starts the server on its own runtime and thread, as `storygpt-v serve --bind 127.0.0.1:0
/// --data-dir DIR` would; returns its address once it listens.
fn serve_in_process(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let explicit = Overrides {
        bind: Some("127.0.0.1:0".into()),
        data_dir: Some(data_dir.to_path_buf()),
        ..Overrides::default()
    };
    let config = ServeConfig::resolve_with(explicit, FileConfig::default())?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| {
                let listening = tx.clone();
                runtime.block_on(server::serve(config, move |addr| {
                    let _ = listening.send(Ok(addr.to_string()));
                }))
            });
        if let Err(err) = result {
            let _ = tx.send(Err(err));
        }
    });
    rx.recv_timeout(support::START_PATIENCE)
        .map_err(|_| anyhow::anyhow!("the server did not start"))?
}
