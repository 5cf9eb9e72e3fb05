//! Server-sent event streams of job progress: `GET /api/jobs/{id}/events` (one job; ends after
//! its final event) and `GET /api/stories/{id}/events` (every job of a story; stays open).
//!
//! Each stream is fed by a task that first replays stored events from the database (all of a
//! job's events, or those after `Last-Event-ID`), then follows the live hub. A live event that
//! was stored is never forwarded as is: it only prompts another read of the database after
//! the last id sent. Writers commit one at a time, so event ids grow in commit order and that
//! read always returns a gap-free continuation, whatever order the live messages arrive in.
//! Live-only `progress` ticks (no id) are forwarded directly.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};
use utoipa::IntoParams;

use super::{ApiPath, ApiQuery};
use crate::error::{ApiError, ApiResult, Problem};
use crate::store::job_events::{self, JobEvent, Scope};
use crate::store::{job_runs, stories};
use crate::AppState;

/// Stored events read from the database per query while catching up.
const PAGE: i64 = 200;
/// How often a job stream checks that its job still exists (its story may be deleted).
const EXISTENCE_CHECK: Duration = Duration::from_secs(5);

/// Query parameters of the event streams.
#[derive(Debug, Deserialize, IntoParams)]
pub struct EventParams {
    /// Resume after this event id; the same as the `Last-Event-ID` header (which wins), for
    /// clients that cannot set headers on their first connection.
    pub last_event_id: Option<String>,
}

fn resume_point(headers: &HeaderMap, params: &EventParams) -> ApiResult<Option<i64>> {
    let text = match headers.get("last-event-id") {
        Some(value) => Some(value.to_str().unwrap_or("?").trim().to_string()),
        None => params.last_event_id.clone(),
    };
    match text.as_deref() {
        None | Some("") => Ok(None),
        // Event ids are row ids: digits only, so "-1" and "+3", which `parse` would take, are
        // refused rather than read as "from the start".
        Some(text) => match text.parse::<i64>() {
            Ok(id) if text.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(id)),
            _ => Err(ApiError::bad_request(
                "invalid_last_event_id",
                format!(
                    "Last-Event-ID must be an event id this server sent (a non-negative \
                     integer); got {text:?}"
                ),
            )),
        },
    }
}

/// Events of one job. Replays its stored events (after `Last-Event-ID` if given), then follows
/// it live, and ends after `completed`, `failed` or `cancelled`.
#[utoipa::path(get, path = "/api/jobs/{id}/events", tag = "jobs",
    params(("id" = i64, Path), EventParams,
           ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")),
    responses((status = 200, description = "A `text/event-stream` of named events with ids: queued, started, progress, frame, completed, failed, cancelled; comments as heartbeats", content_type = "text/event-stream"),
              (status = 400, description = "Bad Last-Event-ID", body = Problem),
              (status = 404, description = "No such job", body = Problem)))]
pub async fn job_events(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(params): ApiQuery<EventParams>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let after = resume_point(&headers, &params)?.unwrap_or(0);
    job_runs::poll(&state.pool, id)
        .await?
        .ok_or_else(|| ApiError::not_found("job", id))?;
    Ok(stream(state, Scope::Job(id), after))
}

/// Events of every job of a story, for a page showing the story. Starts with events after
/// `Last-Event-ID` when given, else with the next new event; stays open.
#[utoipa::path(get, path = "/api/stories/{id}/events", tag = "jobs",
    params(("id" = i64, Path), EventParams,
           ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id")),
    responses((status = 200, description = "A `text/event-stream` of the story's job events (the same names and data as a job's stream)", content_type = "text/event-stream"),
              (status = 400, description = "Bad Last-Event-ID", body = Problem),
              (status = 404, description = "No such story", body = Problem)))]
pub async fn story_events(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiQuery(params): ApiQuery<EventParams>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let resume = resume_point(&headers, &params)?;
    stories::exists(&state.pool, id).await?;
    let after = match resume {
        Some(after) => after,
        None => job_events::newest_id(&mut *state.pool.acquire().await?).await?,
    };
    Ok(stream(state, Scope::Story(id), after))
}

fn stream(state: AppState, scope: Scope, after: i64) -> Response {
    let (sender, receiver) = mpsc::channel::<Event>(64);
    let heartbeat = state.settings.heartbeat;
    tokio::spawn(pump(state, scope, after, sender));
    let events = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|event| (Ok::<_, Infallible>(event), receiver))
    });
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(heartbeat).text("heartbeat"))
        .into_response();
    // Reverse proxies (nginx) would otherwise buffer the stream.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn sse_event(event: &JobEvent) -> Event {
    let out = Event::default()
        .event(event.kind)
        .data(event.data.to_string());
    match event.id {
        Some(id) => out.id(id.to_string()),
        None => out,
    }
}

/// Why a stream stops.
enum End {
    /// The job's final event was sent.
    Final,
    /// The client left, the job is gone, or the server stops.
    Gone,
}

/// Sends the stored events of `scope` after `last`, advancing it.
async fn catch_up(
    state: &AppState,
    scope: Scope,
    last: &mut i64,
    sender: &mpsc::Sender<Event>,
) -> Result<(), End> {
    loop {
        let mut conn = state.pool.acquire().await.map_err(|_| End::Gone)?;
        let events = job_events::after(&mut conn, scope, *last, PAGE)
            .await
            .map_err(|_| End::Gone)?;
        drop(conn);
        let full = events.len() as i64 == PAGE;
        for event in events {
            *last = event.id.unwrap_or(*last);
            sender
                .send(sse_event(&event))
                .await
                .map_err(|_| End::Gone)?;
            if matches!(scope, Scope::Job(_)) && event.is_final() {
                return Err(End::Final);
            }
        }
        if !full {
            return Ok(());
        }
    }
}

async fn job_gone_or_finished(state: &AppState, scope: Scope) -> bool {
    let Scope::Job(id) = scope else {
        return false;
    };
    match job_runs::poll(&state.pool, id).await {
        Ok(Some((status, _))) => matches!(status.as_str(), "succeeded" | "failed" | "cancelled"),
        _ => true,
    }
}

async fn pump(state: AppState, scope: Scope, mut last: i64, sender: mpsc::Sender<Event>) {
    let _ = follow(&state, scope, &mut last, &sender).await;
}

async fn follow(
    state: &AppState,
    scope: Scope,
    last: &mut i64,
    sender: &mpsc::Sender<Event>,
) -> Result<(), End> {
    // Subscribe before reading the database, so nothing published in between is missed.
    let mut live = state.hub.subscribe();
    let mut stop = state.stop.clone();
    // Read the status before the events: a finished job's final event was committed with its
    // status, so the catch-up below includes it (unless the client already had it).
    let finished = job_gone_or_finished(state, scope).await;
    catch_up(state, scope, last, sender).await?;
    if finished {
        return Ok(());
    }
    let mut check = tokio::time::interval(EXISTENCE_CHECK);
    check.tick().await;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = sender.closed() => return Ok(()),
            _ = check.tick() => {
                if job_gone_or_finished(state, scope).await {
                    // A job that finished meanwhile has its final event stored: send it.
                    catch_up(state, scope, last, sender).await?;
                    return Ok(());
                }
            }
            message = live.recv() => match message {
                Ok(event) if scope.contains(&event) => match event.id {
                    Some(id) if id <= *last => {}
                    Some(_) => catch_up(state, scope, last, sender).await?,
                    None => {
                        sender.send(sse_event(&event)).await.map_err(|_| End::Gone)?;
                        if matches!(scope, Scope::Job(_)) && event.is_final() {
                            return Ok(());
                        }
                    }
                },
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    catch_up(state, scope, last, sender).await?
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
        }
    }
}
