//! HTTP routes of the translator.

use std::sync::OnceLock;
use std::time::Duration;

use apphttp::{Handler, Request, Response};
use serde::Serialize;

use crate::dict::Dictionary;
use crate::translate::translate;

/// The dictionary once it is loaded, and how long loading took.
pub struct Loaded {
    pub dict: Dictionary,
    pub load_time: Duration,
}

/// Serves requests while the dictionary loads in the background; until it is set,
/// `/health` and `/translate` answer 503.
#[derive(Default)]
pub struct App {
    pub loaded: OnceLock<Loaded>,
}

impl Handler for App {
    fn handle(&self, req: &Request) -> Response {
        route(self, req)
    }
}

fn method_not_allowed(allow: &str) -> Response {
    Response::error(405, "Method not allowed").header("Allow", allow)
}

fn loading() -> Response {
    Response::error(503, "Dictionary is still loading").header("Retry-After", "1")
}

pub fn route(app: &App, req: &Request) -> Response {
    match req.path() {
        "/health" => match (req.method(), app.loaded.get()) {
            ("GET", Some(_)) => Response::text(200, "ok"),
            ("GET", None) => Response::text(503, "loading").header("Retry-After", "1"),
            _ => method_not_allowed("GET, HEAD"),
        },
        "/stats" => match req.method() {
            "GET" => stats(app),
            _ => method_not_allowed("GET, HEAD"),
        },
        "/translate" => {
            let text = match req.method() {
                "GET" => match req.query_param("text") {
                    Some(t) => t,
                    None => {
                        return Response::error(400, "Missing or undecodable query parameter text")
                    }
                },
                "POST" => match String::from_utf8(req.body.clone()) {
                    Ok(t) => t,
                    Err(_) => return Response::error(400, "Body is not UTF-8 text"),
                },
                _ => return method_not_allowed("GET, HEAD, POST"),
            };
            let Some(loaded) = app.loaded.get() else {
                return loading();
            };
            Response::json(200, &translate(&loaded.dict, &text))
        }
        _ => Response::error(404, "No such route"),
    }
}

/// `GET /stats`.
#[derive(Serialize)]
struct Stats {
    entries: usize,
    bytes: u64,
    load_ms: Option<u128>,
    loaded: bool,
    pid: u32,
}

fn stats(app: &App) -> Response {
    let loaded = app.loaded.get();
    Response::json(
        200,
        &Stats {
            entries: loaded.map_or(0, |l| l.dict.len()),
            bytes: loaded.map_or(0, |l| l.dict.bytes()),
            load_ms: loaded.map(|l| l.load_time.as_millis()),
            loaded: loaded.is_some(),
            pid: std::process::id(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use apphttp::request::read_request;
    use apphttp::Limits;

    fn call(app: &App, method: &str, target: &str, body: &[u8]) -> (u16, String) {
        let mut raw = format!(
            "{method} {target} HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        raw.extend_from_slice(body);
        let req = read_request(&mut &raw[..], &Limits::default()).unwrap();
        let r = route(app, &req);
        (
            r.status,
            String::from_utf8_lossy(r.body.as_slice()).into_owned(),
        )
    }

    fn loaded_app() -> App {
        let app = App::default();
        let text = "hello\tsalve\nworld\tmundus\n";
        let dict = Dictionary::read_from(text.as_bytes(), std::path::Path::new("t")).unwrap();
        let _ = app.loaded.set(Loaded {
            dict,
            load_time: Duration::from_millis(12),
        });
        app
    }

    #[test]
    fn unhealthy_until_loaded() {
        let app = App::default();
        assert_eq!(call(&app, "GET", "/health", b"").0, 503);
        assert_eq!(call(&app, "GET", "/translate?text=hello", b"").0, 503);
        assert_eq!(
            call(&app, "GET", "/stats", b"").1,
            format!(
                r#"{{"entries":0,"bytes":0,"load_ms":null,"loaded":false,"pid":{}}}"#,
                std::process::id()
            )
        );
        let app = loaded_app();
        assert_eq!(call(&app, "GET", "/health", b""), (200, "ok".into()));
        assert!(call(&app, "GET", "/stats", b"")
            .1
            .starts_with(r#"{"entries":2,"bytes":21,"load_ms":12,"loaded":true,"#));
    }

    #[test]
    fn translate_get_and_post() {
        let app = loaded_app();
        assert_eq!(
            call(&app, "GET", "/translate?text=Hello+world%21+xyz", b""),
            (
                200,
                r#"{"translation":"Salve mundus! xyz","unknown":["xyz"]}"#.into()
            )
        );
        assert_eq!(
            call(&app, "POST", "/translate", "hello \"world\"\n".as_bytes()),
            (
                200,
                r#"{"translation":"salve \"mundus\"\n","unknown":[]}"#.into()
            )
        );
    }

    #[test]
    fn bad_requests() {
        let app = loaded_app();
        assert_eq!(call(&app, "GET", "/translate", b"").0, 400);
        assert_eq!(call(&app, "GET", "/translate?text=%ff", b"").0, 400);
        assert_eq!(call(&app, "POST", "/translate", b"\xff\xfe").0, 400);
        assert_eq!(call(&app, "PUT", "/translate", b"x").0, 405);
        assert_eq!(call(&app, "GET", "/nope", b"").0, 404);
    }
}
