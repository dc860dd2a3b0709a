//! The fleet view at `/ui`: the directory's page, built into the binary
//! (`crates/directory/ui/`): every live cloudlet on a map by its location,
//! its lease, its free capacity, and which VM moved where. It reads
//! `GET /v1/fleet` like any client, with the credential it is given
//! (`/ui#token=...`) where the directory asks for one.

use axum::http::header;
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("../ui/index.html");
const SCRIPT: &str = include_str!("../ui/fleet.js");
/// One stylesheet for both dashboards (the cloudlet's and this one).
const STYLE: &str = include_str!("../../cloudletd/ui/style.css");

const POLICY: &str =
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

pub(crate) async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

pub(crate) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

pub(crate) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}
