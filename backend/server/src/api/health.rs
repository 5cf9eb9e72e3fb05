//! Liveness and readiness probes for orchestrators (Docker, Kubernetes).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::model::ModelInfo;
use crate::AppState;

/// Probe answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// "ok" or "unavailable".
    pub status: &'static str,
    /// What failed, when something did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The loaded model (readiness only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelInfo>,
    /// The job queue (readiness only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueInfo>,
}

/// How busy the generation queue is.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueInfo {
    /// Jobs waiting.
    pub queued: i64,
    /// Jobs being drawn.
    pub running: i64,
    /// Jobs that may wait before new ones get 429.
    pub capacity: usize,
    /// Whether a worker runs: this process's worker thread, or (a server without one) any
    /// worker process whose heartbeat is within the lease.
    pub worker_alive: bool,
    /// Workers running in every process sharing the database (heartbeat within the lease).
    pub workers: i64,
}

/// The process is alive and serving requests.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok",
        detail: None,
        model: None,
        queue: None,
    })
}

/// The process can do its work: the database answers, the model is loaded and its worker runs.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, body = Health), (status = 503, description = "Database unreachable or worker stopped", body = Health)))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let model = Some(state.worker.model.clone());
    let counts = async {
        let queue = crate::store::jobs::counts(&state.pool).await?;
        let workers = crate::store::workers::alive(&state.pool, state.settings.lease).await?;
        Ok::<_, crate::error::ApiError>((queue, workers))
    };
    let (status, detail, queue) = match counts.await {
        Ok(((queued, running), workers)) => {
            // A server that draws is ready when its worker runs; one that only serves the API
            // is ready as it is (its queue waits for workers, which `workers` counts).
            let alive = if state.worker.local {
                state.worker.is_alive()
            } else {
                workers > 0
            };
            let queue = Some(QueueInfo {
                queued,
                running,
                capacity: state.settings.queue_capacity,
                worker_alive: alive,
                workers,
            });
            if alive || !state.worker.local {
                (StatusCode::OK, None, queue)
            } else {
                let detail = "the generation worker stopped; see the server log".to_string();
                (StatusCode::SERVICE_UNAVAILABLE, Some(detail), queue)
            }
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some(format!("database: {}", e.detail)),
            None,
        ),
    };
    let health = Health {
        status: if status == StatusCode::OK {
            "ok"
        } else {
            "unavailable"
        },
        detail,
        model,
        queue,
    };
    (status, Json(health))
}
