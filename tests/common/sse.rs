//! A minimal reader of the server's event streams (server-sent events).

use reqwest::StatusCode;
use serde_json::Value;

use super::{http, Server, PATIENCE};

/// One server-sent event.
#[derive(Debug, Clone)]
pub struct Event {
    /// The `event:` name.
    pub name: String,
    /// The `id:` (stored events).
    pub id: Option<i64>,
    /// The JSON `data:`.
    pub data: Value,
}

/// A minimal SSE reader over a streaming response.
pub struct Stream {
    response: reqwest::Response,
    buffer: String,
    /// Heartbeat comments seen so far.
    pub heartbeats: usize,
}

impl Stream {
    /// Opens `path` on `server`, resuming after `last_event_id` when given.
    pub async fn open(server: &Server, path: &str, last_event_id: Option<i64>) -> Stream {
        let mut request = http().get(server.at(path));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Stream {
            response,
            buffer: String::new(),
            heartbeats: 0,
        }
    }

    /// The next event, or `None` when the server ended the stream; counts heartbeats.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Event {
                    name: "message".into(),
                    id: None,
                    data: Value::Null,
                };
                let mut data = String::new();
                for line in block.lines() {
                    if line.starts_with(':') {
                        if line.contains("heartbeat") {
                            self.heartbeats += 1;
                        }
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event.name = v.trim().into();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        event.id = Some(v.trim().parse().unwrap());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a heartbeat
                }
                event.data = serde_json::from_str(&data).unwrap();
                return Some(event);
            }
            let chunk = tokio::time::timeout(PATIENCE, self.response.chunk())
                .await
                .expect("the event stream stalled")
                .unwrap();
            self.buffer.push_str(
                std::str::from_utf8(&chunk?)
                    .unwrap()
                    .replace("\r\n", "\n")
                    .as_str(),
            );
        }
    }

    /// Reads until an event named `name`, returning everything read (that event last).
    pub async fn until(&mut self, name: &str) -> Vec<Event> {
        let mut seen = Vec::new();
        while let Some(event) = self.next().await {
            let done = event.name == name;
            seen.push(event);
            if done {
                return seen;
            }
        }
        panic!("the stream ended before a `{name}` event: {seen:?}");
    }

    /// Reads to the end of the stream.
    pub async fn rest(&mut self) -> Vec<Event> {
        let mut seen = Vec::new();
        while let Some(event) = self.next().await {
            seen.push(event);
        }
        seen
    }
}

/// The names of `events`.
pub fn names(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.name.as_str()).collect()
}

/// The ids of the stored events among `events`.
pub fn stored_ids(events: &[Event]) -> Vec<i64> {
    events.iter().filter_map(|e| e.id).collect()
}
