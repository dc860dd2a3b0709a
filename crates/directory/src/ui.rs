//! The fleet view at `/ui`: the directory's page, built into the binary
//! (`crates/directory/ui/`): every live cloudlet on a map by its location,
//! its lease, its free capacity, and which VM moved where. It reads
//! `GET /v1/fleet` like any client, with the credential it is given
//! (`/ui#token=...`) where the directory asks for one.

use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("../ui/index.html");
/// What both dashboards' scripts share.
const COMMON: &str = include_str!("../../cloudletd/ui/common.js");
const SCRIPT: &str = include_str!("../ui/fleet.js");
/// One stylesheet for both dashboards (the cloudlet's and this one).
const STYLE: &str = include_str!("../../cloudletd/ui/style.css");

pub(crate) async fn index() -> Response {
    (
        cloudlet_api::dashboard_headers("text/html; charset=utf-8"),
        INDEX,
    )
        .into_response()
}

pub(crate) async fn script() -> Response {
    (
        cloudlet_api::dashboard_headers("text/javascript; charset=utf-8"),
        SCRIPT,
    )
        .into_response()
}

pub(crate) async fn style() -> Response {
    (
        cloudlet_api::dashboard_headers("text/css; charset=utf-8"),
        STYLE,
    )
        .into_response()
}

pub(crate) async fn common() -> Response {
    (
        cloudlet_api::dashboard_headers("text/javascript; charset=utf-8"),
        COMMON,
    )
        .into_response()
}
