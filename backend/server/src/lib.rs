//! The storygpt-v web service: REST API, HTML pages and the SQLite store.
//!
//! `serve` locks the data directory, opens the database, puts interrupted jobs right, loads
//! the model bundle on the worker thread, builds the router and runs until SIGINT or SIGTERM.
//! Handlers stay thin: they parse, call a `store` function and map the result.

pub mod api;
pub mod auth;
pub mod config;
pub mod db;
pub mod error;
pub mod export;
pub mod images;
pub mod import;
pub mod live;
pub mod lock;
pub mod mentions;
pub mod model;
pub mod pages;
pub mod rename;
pub mod starter_cast;
pub mod store;
pub mod surface;
pub mod validate;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::routing::get;
use axum::Router;
use sqlx::AnyPool;
use tokio::net::TcpListener;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;

pub use config::{FileConfig, ServeConfig};

/// Shared state every handler gets.
#[derive(Clone)]
pub struct AppState {
    /// Connection pool to the database (SQLite or PostgreSQL).
    pub pool: AnyPool,
    /// Live fan-out of job events to SSE streams.
    pub hub: live::Hub,
    /// The generation worker (and the model it loaded).
    pub worker: Arc<worker::WorkerHandle>,
    /// The characters the loaded bundle was trained on (empty when it lists none).
    pub cast: Arc<starter_cast::StarterCast>,
    /// Queue and stream settings.
    pub settings: Arc<JobSettings>,
    /// Turns true when the server starts shutting down; long-lived streams end then.
    pub stop: tokio::sync::watch::Receiver<bool>,
    /// The `Host` names requests may be addressed to.
    pub allowed_hosts: Arc<surface::AllowedHosts>,
    /// Whether requests must sign in.
    pub auth: auth::AuthMode,
}

/// Settings of the job queue and its event streams.
#[derive(Debug, Clone)]
pub struct JobSettings {
    /// How long a claimed job's lease lasts without a heartbeat (also: how recent a worker's
    /// heartbeat must be for it to count as running).
    pub lease: Duration,
    /// How many jobs may wait before new ones get 429.
    pub queue_capacity: usize,
    /// Interval between heartbeat comments on a quiet SSE stream.
    pub heartbeat: Duration,
    /// Seconds a client is told to wait (Retry-After) when the queue is full.
    pub retry_after_secs: u64,
    /// Per-user limits on queued jobs and stored bytes.
    pub quotas: auth::Quotas,
}

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    let request_id = header::HeaderName::from_static("x-request-id");
    Router::new()
        .nest("/api", api::router())
        .merge(pages::router())
        .route("/healthz", get(api::health::healthz))
        .route("/readyz", get(api::health::readyz))
        .route("/openapi.json", get(api::openapi::document))
        .route("/docs", get(api::openapi::page))
        // After routing, before the handler: another user's story, character or job is 404.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::owns_path,
        ))
        .fallback(|| async {
            crate::pages::error_page(StatusCode::NOT_FOUND, "there is no page at this address")
        })
        // Who the request acts for (and the cross-site check), before routing.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        // Inside the tracing and request-id layers, so refusals and rewritten errors are
        // logged and carry an x-request-id like any answer.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            surface::guard,
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::HeaderName::from_static("x-frame-options"),
            HeaderValue::from_static("DENY"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::REFERRER_POLICY,
            HeaderValue::from_static("same-origin"),
        ))
        // Scripts and styles only from the service's own files: no inline script can run, so
        // markup that slipped through escaping cannot act. Images also as data: URLs (the live
        // previews) and blobs (the portrait preview before upload).
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'self'; script-src 'self'; style-src 'self'; \
                 img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; \
                 base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
            ),
        ))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                let id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                tracing::info_span!("http", method = %req.method(), uri = %req.uri(), request_id = %id)
            }),
        )
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(state)
}

/// Runs the service until SIGINT/SIGTERM, then drains in-flight requests and closes the
/// database cleanly. `on_listen` gets the bound address (useful with port 0).
pub async fn serve(
    config: ServeConfig,
    on_listen: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    // Before anything touches the directory's state: a second server on it (on any port)
    // must stop here, not requeue the live server's running job or start a second worker.
    // Held until this function returns, after the worker has stopped and the pool closed.
    let lock = lock::DataDirLock::acquire(&config.data_dir)?;
    tracing::info!(lock = %lock.path().display(), pid = std::process::id(), "data directory locked");
    let pool = match &config.database {
        Some(url) => db::open_url(url).await?,
        None => db::open_limited(&config.database_path(), config.database_page_limit).await?,
    };
    tracing::info!(database = %config.database_shown(), "database ready");
    // Jobs a crash left `running` are requeued (or failed, or cancelled) before any worker
    // could claim them. The SQLite store has no other user (the lock above), so every running
    // job was this server's; a PostgreSQL database may have other servers and workers, whose
    // running jobs hold live leases: only those whose lease ran out are put back.
    // Its errors are `ApiError`s, whose text ("500 Internal Server Error ...") means nothing
    // on a command line: say what is wrong with the database instead.
    let recovery = match &config.database {
        Some(_) => store::job_runs::requeue_expired(&pool, config.max_attempts).await,
        None => store::job_runs::recover(&pool, config.max_attempts).await,
    }
    .map_err(|e| db::StorageFault::startup_api_error(&config.database_shown(), e))?;
    if !recovery.is_empty() {
        tracing::warn!(
            requeued = ?recovery.requeued, failed = ?recovery.failed, cancelled = ?recovery.cancelled,
            "recovered jobs interrupted by the last stop"
        );
    }
    let bundle = {
        let (configured, data_dir) = (config.bundle.clone(), config.data_dir.clone());
        tokio::task::spawn_blocking(move || model::resolve_bundle(configured.as_deref(), &data_dir))
            .await??
    };
    // Read before the worker takes the bundle path; it decodes a few portraits, off the runtime.
    let cast = {
        let bundle = bundle.clone();
        tokio::task::spawn_blocking(move || starter_cast::StarterCast::load(&bundle)).await?
    };
    // With PostgreSQL, events and "a job was queued" also reach (and come from) the other
    // processes sharing the database.
    let hub = match &config.database {
        Some(_) => live::Hub::relayed(pool.clone()),
        None => live::Hub::new(),
    };
    let worker = if config.workers == 0 {
        let model = {
            let (bundle, device) = (bundle.clone(), config.device.clone());
            tokio::task::spawn_blocking(move || worker::describe(&bundle, &device)).await??
        };
        let tokenizer = worker::load_tokenizer(&bundle)?;
        tracing::info!(name = %model.name, "no worker in this process: other processes draw the jobs");
        Arc::new(worker::WorkerHandle::without_worker(
            model,
            tokenizer,
            hub.clone(),
        ))
    } else {
        worker::start(
            pool.clone(),
            hub.clone(),
            bundle,
            worker::WorkerSettings {
                device: config.device.clone(),
                capture_attention: config.capture_attention,
                preview_every: config.preview_every,
                lease: config.lease,
                max_attempts: config.max_attempts,
            },
        )
        .await?
    };
    if let Some(url) = &config.database {
        let woken = worker.clone();
        live::listen(url, hub.clone(), move || woken.wake_here())
            .await
            .with_context(|| format!("cannot listen for events on {}", config.database_shown()))?;
    }
    let listener = TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("cannot listen on {}", config.bind))?;
    let addr = listener.local_addr()?;
    // Signal handlers are installed before anyone can learn the address, so a SIGTERM sent
    // right after start-up still shuts down cleanly.
    let shutdown = shutdown_signal()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    {
        let worker = worker.clone();
        tokio::spawn(async move {
            shutdown.await;
            // The running job goes back to the queue at its next step while requests drain.
            worker.request_stop();
            let _ = stop_tx.send(true);
        });
    }
    tracing::info!(%addr, allowed_hosts = ?config.allowed_hosts, "listening");
    on_listen(addr);
    let state = AppState {
        pool: pool.clone(),
        hub,
        worker: worker.clone(),
        cast: Arc::new(cast),
        settings: Arc::new(JobSettings {
            lease: config.lease,
            queue_capacity: config.queue_capacity,
            heartbeat: config.sse_heartbeat,
            retry_after_secs: 10,
            quotas: config.quotas,
        }),
        stop: stop_rx.clone(),
        allowed_hosts: Arc::new(config.allowed_hosts.clone()),
        auth: config.auth,
    };
    run_http(
        listener,
        app(state),
        stop_rx,
        config.header_read_timeout,
        config.shutdown_grace,
    )
    .await;
    tracing::info!("shutting down: stopping the worker");
    worker.stop(Duration::from_secs(30)).await;
    tracing::info!("closing the database");
    tokio::time::timeout(Duration::from_secs(10), pool.close())
        .await
        .ok();
    drop(lock);
    Ok(())
}

/// Settings of a `storygpt-v worker` process.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The shared PostgreSQL database.
    pub database: String,
    /// Model bundle directory; `None`: the default (see `model::resolve_bundle`).
    pub bundle: Option<std::path::PathBuf>,
    /// Where a random bundle is made when there is none.
    pub data_dir: std::path::PathBuf,
    /// How the worker runs.
    pub settings: worker::WorkerSettings,
}

/// Runs a worker without the HTTP server until SIGINT/SIGTERM: it claims jobs from the
/// shared PostgreSQL queue, draws them and stores frames and events there; the events reach
/// the API processes' streams through `NOTIFY`. A stop puts its running job back in the
/// queue (not counted as an attempt); a crash leaves it to the lease. `on_ready` gets the
/// worker's id once it took part in the queue.
pub async fn run_worker(config: WorkerConfig, on_ready: impl FnOnce(&str)) -> anyhow::Result<()> {
    use anyhow::Context;
    if db::Backend::of_url(&config.database) != Some(db::Backend::Postgres) {
        anyhow::bail!(
            "storygpt-v worker needs --database postgres://...: workers in separate processes \
             share the queue through PostgreSQL (with the SQLite store, `serve` draws the jobs \
             itself)"
        );
    }
    let shown = db::redact(&config.database);
    let pool = db::open_url(&config.database).await?;
    tracing::info!(database = %shown, "database ready");
    let bundle = {
        let (configured, data_dir) = (config.bundle.clone(), config.data_dir.clone());
        tokio::task::spawn_blocking(move || model::resolve_bundle(configured.as_deref(), &data_dir))
            .await??
    };
    let hub = live::Hub::relayed(pool.clone());
    let worker = worker::start(pool.clone(), hub.clone(), bundle, config.settings).await?;
    {
        let woken = worker.clone();
        live::listen(&config.database, hub, move || woken.wake_here())
            .await
            .with_context(|| format!("cannot listen for new jobs on {shown}"))?;
    }
    let shutdown = shutdown_signal()?;
    on_ready(&worker.id().unwrap_or_default());
    tokio::select! {
        _ = shutdown => tracing::info!("stopping the worker"),
        _ = async {
            while worker.is_alive() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        } => tracing::error!("the worker thread stopped"),
    }
    worker.stop(Duration::from_secs(30)).await;
    tokio::time::timeout(Duration::from_secs(10), pool.close())
        .await
        .ok();
    Ok(())
}

/// Serves HTTP/1.1 connections until `stop` turns true, then drains them for at most `grace`.
///
/// Like `axum::serve`, but each connection has a header read timeout (hyper's, which needs a
/// timer that `axum::serve` does not set): a client that opens a connection and sends no
/// request, or sends its head too slowly, is disconnected after `header_timeout` instead of
/// holding a socket and a task forever. On shutdown the listener closes, idle keep-alive
/// connections close at once, connections with a request in flight finish it, and whatever
/// is still open after `grace` (a half-sent request, a client that reads nothing) is dropped,
/// so SIGTERM ends the process within a few seconds whatever the clients do.
async fn run_http(
    listener: TcpListener,
    app: Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
    header_timeout: Duration,
    grace: Duration,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    // Dropped when shutdown starts: every connection then begins its graceful shutdown.
    let (draining_tx, draining_rx) = tokio::sync::watch::channel(());
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, remote) = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            // Reap finished connections so the set does not grow with every one ever served.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Per-connection failures (reset before accept) are harmless; anything
                    // else (out of file descriptors) is retried after a pause, as axum does.
                    if !matches!(
                        err.kind(),
                        std::io::ErrorKind::ConnectionRefused
                            | std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                    ) {
                        tracing::error!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    continue;
                }
            },
        };
        // The client's address, for login throttling (`auth::client_address`).
        let service = TowerToHyperService::new(tower::ServiceExt::map_request(
            app.clone(),
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(remote));
                request
            },
        ));
        let mut draining = draining_rx.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = draining.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(err) = result {
                tracing::debug!(%remote, error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    drop(draining_tx);
    let open = connections.len();
    if open > 0 {
        tracing::info!(open, "waiting for open connections");
    }
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            grace_ms = grace.as_millis() as u64,
            "connections still open after the shutdown grace period; closing them"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}

fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    #[cfg(unix)]
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("Ctrl-C received");
        }
    })
}
