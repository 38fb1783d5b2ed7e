//! A Server-Sent Events client for the gateway's events stream, as the
//! tests read it: events parsed (name, id, JSON data), heartbeat comments
//! counted, every wait bounded by [`DEADLINE`].

use reqwest::{Client, StatusCode};
use serde_json::Value;

use crate::DEADLINE;

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Its `event:` name (`user`, `synced`, `end`, …).
    pub name: String,
    /// Its `id:`, the `U.C.P` cursor.
    pub id: String,
    /// Its `data:`, as JSON.
    pub data: Value,
}

/// An events stream being read. Bytes are kept whole until an event is
/// complete: an event's UTF-8 may span two chunks.
pub struct EventStream {
    response: reqwest::Response,
    buffer: Vec<u8>,
    /// Heartbeat comments read so far.
    pub heartbeats: usize,
}

impl EventStream {
    /// Opens the stream at `url` with `token`, resuming after `last_id` if
    /// given; checks that it opened as an event stream.
    pub async fn open(http: &Client, url: &str, token: &str, last_id: Option<&str>) -> EventStream {
        let mut request = http.get(url).bearer_auth(token);
        if let Some(id) = last_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|err| panic!("cannot open the events stream: {err}"));
        assert_eq!(response.status(), StatusCode::OK, "the events stream opens");
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(content_type.starts_with("text/event-stream"), "{content_type}");
        EventStream {
            response,
            buffer: Vec::new(),
            heartbeats: 0,
        }
    }

    /// The next event (heartbeats are counted, not returned), or `None`
    /// once the stream has ended.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let block = String::from_utf8(block).unwrap_or_else(|err| panic!("an event is not UTF-8: {err}"));
                let (mut name, mut id, mut data) = (String::new(), String::new(), String::new());
                for line in block.lines() {
                    if let Some(comment) = line.strip_prefix(':') {
                        if comment.trim() == "heartbeat" {
                            self.heartbeats += 1;
                        }
                    } else if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if name.is_empty() {
                    continue;
                }
                let data =
                    serde_json::from_str(&data).unwrap_or_else(|err| panic!("event data is not JSON ({err}): {data}"));
                return Some(Event { name, id, data });
            }
            let chunk = tokio::time::timeout(DEADLINE, self.response.chunk())
                .await
                .unwrap_or_else(|_| panic!("no event within {DEADLINE:?}"));
            match chunk {
                Ok(Some(chunk)) => self.buffer.extend_from_slice(&chunk),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The next event; the stream must not end.
    pub async fn event(&mut self) -> Event {
        self.next().await.unwrap_or_else(|| panic!("the events stream ended"))
    }

    /// Reads events until `done` holds for one; answers all read, in order.
    pub async fn until(&mut self, what: &str, mut done: impl FnMut(&Event) -> bool) -> Vec<Event> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within {DEADLINE:?}; saw {seen:#?}"
            );
            let event = self.event().await;
            let stop = done(&event);
            seen.push(event);
            if stop {
                return seen;
            }
        }
    }

    /// Reads until every source (users, contracts, photos) has sent
    /// `synced`; answers all read.
    pub async fn synced(&mut self) -> Vec<Event> {
        let mut sources = std::collections::BTreeSet::new();
        self.until("every source synced", |e| {
            if e.name == "synced" {
                sources.insert(e.data["source"].as_str().unwrap_or_default().to_owned());
            }
            sources.len() == 3
        })
        .await
    }
}
