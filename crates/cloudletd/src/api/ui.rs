//! The operator's dashboard at `/ui`: a page, its script and its style,
//! built into the binary (`crates/cloudletd/ui/`), nothing to build or
//! install on the operator's machine. The page reads the API like any
//! client (`/v1/cloudlet`, `/v1/vms`, `/v1/handoffs`, `/v1/events`), with
//! the credential the operator gives it (`/ui#token=...`, or its form):
//! the page itself holds no data.

use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("../../ui/index.html");
/// What both dashboards' scripts share.
const COMMON: &str = include_str!("../../ui/common.js");
const SCRIPT: &str = include_str!("../../ui/app.js");
const STYLE: &str = include_str!("../../ui/style.css");

pub(super) async fn index() -> Response {
    (
        cloudlet_api::dashboard_headers("text/html; charset=utf-8"),
        INDEX,
    )
        .into_response()
}

pub(super) async fn script() -> Response {
    (
        cloudlet_api::dashboard_headers("text/javascript; charset=utf-8"),
        SCRIPT,
    )
        .into_response()
}

pub(super) async fn style() -> Response {
    (
        cloudlet_api::dashboard_headers("text/css; charset=utf-8"),
        STYLE,
    )
        .into_response()
}

pub(super) async fn common() -> Response {
    (
        cloudlet_api::dashboard_headers("text/javascript; charset=utf-8"),
        COMMON,
    )
        .into_response()
}
