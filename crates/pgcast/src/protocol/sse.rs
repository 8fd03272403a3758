//! Server-Sent Events (the WHATWG `text/event-stream` format): a one-way feed of one table's
//! changes. Each change is an unnamed event (a browser's `EventSource.onmessage`) whose `data`
//! is the change as the Supabase endpoint's `postgres_changes` carries it and whose `id` is its
//! place, `<epoch>:<position>`: a reconnecting `EventSource` sends it back as `Last-Event-ID`.
//! Server notices are named events (`ready`, `resync_required`, `error`).
//!
//! Framing only; what goes in the stream is the session's (`session::sse`).

use axum::extract::ws::Message;

use crate::log::Position;

/// The `id` of a change: where a client resuming after it starts.
pub fn event_id(epoch: &str, position: Position) -> String {
    format!("{epoch}:{position}")
}

/// Reads a `Last-Event-ID` back into `(epoch, position)`.
pub fn parse_event_id(id: &str) -> Result<(String, Position), String> {
    let shown = crate::text::clip(id, crate::text::NAME_CHARS);
    let (epoch, position) = id
        .rsplit_once(':')
        .ok_or_else(|| format!("invalid Last-Event-ID {shown}: expected <epoch>:<position>"))?;
    let position = position.parse::<Position>().map_err(|e| format!("invalid Last-Event-ID {shown}: {e}"))?;
    if epoch.is_empty() || epoch.len() > 64 || !epoch.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(format!("invalid Last-Event-ID {shown}: the epoch is not one pgcast issues"));
    }
    Ok((epoch.to_string(), position))
}

/// A change: `data` (one line of JSON, as `payload::change_data` writes it) with its `id`.
pub fn change(data: &str, position: Position, epoch: &str) -> Message {
    let mut text = String::with_capacity(data.len() + epoch.len() + 48);
    text.push_str("id: ");
    text.push_str(&event_id(epoch, position));
    text.push_str("\ndata: ");
    text.push_str(data);
    text.push_str("\n\n");
    Message::Text(text.into())
}

/// A named event with one line of JSON, and an `id` when it moves the client's place.
pub fn named(event: &str, json: &str, id: Option<&str>) -> Message {
    let mut text = String::with_capacity(json.len() + 64);
    if let Some(id) = id {
        text.push_str("id: ");
        text.push_str(id);
        text.push('\n');
    }
    text.push_str("event: ");
    // Event names are the server's own; a line break would end the field.
    text.extend(event.chars().filter(|c| !matches!(c, '\r' | '\n')));
    text.push_str("\ndata: ");
    text.push_str(json);
    text.push_str("\n\n");
    Message::Text(text.into())
}

/// The stream's first bytes: how long a browser waits before reconnecting.
pub fn retry(millis: u64) -> Message {
    Message::Text(format!("retry: {millis}\n\n").into())
}

/// A keep-alive comment (ignored by clients; keeps proxies from closing an idle stream).
pub const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_id_reads_back_and_a_bad_one_is_refused_by_name() {
        let position = Position { lsn: 0x1A2B3C4, index: 3 };
        let id = event_id("5f0c", position);
        assert_eq!(id, "5f0c:0000000001A2B3C4.00000003");
        assert_eq!(parse_event_id(&id), Ok(("5f0c".to_string(), position)));
        for bad in ["", "nocolon", "e:1", ":0000000001A2B3C4.00000003", "e f:0000000001A2B3C4.00000003"] {
            let error = parse_event_id(bad).unwrap_err();
            assert!(error.starts_with("invalid Last-Event-ID"), "{bad:?}: {error}");
        }
    }

    #[test]
    fn frames_are_text_event_stream() {
        let position = Position { lsn: 1, index: 0 };
        let Message::Text(text) = change("{\"a\":1}", position, "ep") else { panic!() };
        assert_eq!(text.as_str(), "id: ep:0000000000000001.00000000\ndata: {\"a\":1}\n\n");
        let Message::Text(text) = named("resync\nrequired", "{}", Some("x")) else { panic!() };
        assert_eq!(text.as_str(), "id: x\nevent: resyncrequired\ndata: {}\n\n");
    }
}
