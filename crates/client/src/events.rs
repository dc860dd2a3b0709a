//! `GET /v1/events` read as it comes: server-sent events parsed into
//! [`CloudletEvent`]s (the kinds: `cloudlet_api::events`).

use cloudlet_api::events::CloudletEvent;

use crate::http::chain;
use crate::ClientError;

/// A cloudlet's event stream ([`crate::Client::events`]).
pub struct Events {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl Events {
    pub(crate) fn new(resp: reqwest::Response) -> Events {
        Events {
            resp,
            buf: Vec::new(),
        }
    }

    /// The next event (kinds this release does not know are skipped);
    /// `None` when the cloudlet ended the stream.
    pub async fn next(&mut self) -> Option<Result<CloudletEvent, ClientError>> {
        loop {
            while let Some(frame) = take_frame(&mut self.buf) {
                if let Some(ev) = parse_frame(&frame) {
                    return Some(ev);
                }
            }
            match self.resp.chunk().await {
                Ok(Some(b)) => self.buf.extend_from_slice(&b),
                Ok(None) => return None,
                Err(e) => return Some(Err(ClientError::Decode(chain(&e)))),
            }
        }
    }
}

/// One whole frame (up to its blank line) out of `buf`, if there is one.
fn take_frame(buf: &mut Vec<u8>) -> Option<String> {
    let end = (0..buf.len()).find_map(|i| {
        if buf[i..].starts_with(b"\n\n") {
            Some((i, 2))
        } else if buf[i..].starts_with(b"\r\n\r\n") {
            Some((i, 4))
        } else {
            None
        }
    })?;
    let frame: Vec<u8> = buf.drain(..end.0 + end.1).collect();
    Some(String::from_utf8_lossy(&frame[..end.0]).into_owned())
}

/// A frame's `event:` and `data:` lines (several data lines join with a
/// newline; `:` lines are comments, the keep-alives).
fn parse_frame(frame: &str) -> Option<Result<CloudletEvent, ClientError>> {
    let (mut name, mut data) = (None, Vec::new());
    for line in frame.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => name = Some(value),
            "data" => data.push(value),
            _ => {}
        }
    }
    if data.is_empty() {
        return None;
    }
    match CloudletEvent::parse(name, &data.join("\n")) {
        Ok(Some(ev)) => Some(Ok(ev)),
        Ok(None) => None,
        Err(e) => Some(Err(ClientError::Decode(format!("event {name:?}: {e}")))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_on_blank_lines_and_comments_are_skipped() {
        let mut buf = b": keep-alive\n\nevent: lagged\ndata: 3\n\nevent: lag".to_vec();
        let a = take_frame(&mut buf).unwrap();
        assert!(parse_frame(&a).is_none());
        let b = take_frame(&mut buf).unwrap();
        assert!(matches!(
            parse_frame(&b),
            Some(Ok(CloudletEvent::Lagged(3)))
        ));
        assert!(take_frame(&mut buf).is_none(), "a half frame waits");
        buf.extend_from_slice(b"ged\r\ndata:4\r\n\r\n");
        let c = take_frame(&mut buf).unwrap();
        assert!(matches!(
            parse_frame(&c),
            Some(Ok(CloudletEvent::Lagged(4)))
        ));
        let unknown = "event: later\ndata: {}";
        assert!(parse_frame(unknown).is_none());
        assert!(matches!(parse_frame("data: {"), Some(Err(_))));
    }
}
