//! The directory's REST API (`/v1`): parse, call [`Directory`], map each
//! operation's errors to a status in one place ([`Failure`]).
//!
//! | call | who | what |
//! |---|---|---|
//! | `PUT /v1/cloudlets/{name}` | the cloudlet | register or heartbeat |
//! | `DELETE /v1/cloudlets/{name}` | the cloudlet | deregister |
//! | `GET /v1/cloudlets?lat&lon&base&overlay&flavor&n` | devices | search |
//! | `GET /v1/cloudlets/{name}` | devices | one entry |
//! | `GET /v1/cloudlets/{name}/peers` | the cloudlet | the others, with peer tokens |
//! | `GET /v1/watch?since=` | devices | changes, server-sent events |
//! | `GET /v1/fleet` | devices, operators | every live cloudlet, leases, recent moves |
//! | `GET /v1/health` | anyone | store, size, revision |
//! | `GET /ui` | operators | the fleet view (a page built into the binary) |

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cloudlet_api::directory::{
    Candidate, DirectoryHealth, Excluded, Fleet, FleetEntry, FleetMove, HeldBase, Lease, PeerList,
    Registration, SearchAnswer, SearchQuery, WatchEvent, WatchKind, WatchQuery,
};
use cloudlet_api::{ApiError, BearerAuth};
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use utoipa::OpenApi;

use crate::service::{AuthError, DeregisterError, Directory, HeartbeatError, QueryError};

/// An error answer: a status and the body every error has.
pub struct Failure(StatusCode, ApiError);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

fn failure(status: StatusCode, kind: &str, error: String) -> Failure {
    Failure(
        status,
        ApiError {
            error,
            kind: kind.into(),
            memory_differs: None,
        },
    )
}

impl From<AuthError> for Failure {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing => failure(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()),
            AuthError::Forbidden(_) => failure(StatusCode::FORBIDDEN, "forbidden", e.to_string()),
        }
    }
}

impl From<HeartbeatError> for Failure {
    fn from(e: HeartbeatError) -> Self {
        match e {
            HeartbeatError::Auth(a) => a.into(),
            HeartbeatError::Invalid(_) => {
                failure(StatusCode::BAD_REQUEST, "invalid_request", e.to_string())
            }
            HeartbeatError::Store(_) => failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                e.to_string(),
            ),
        }
    }
}

impl From<DeregisterError> for Failure {
    fn from(e: DeregisterError) -> Self {
        match e {
            DeregisterError::Auth(a) => a.into(),
            DeregisterError::NotFound(_) => {
                failure(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            DeregisterError::Store(_) => failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                e.to_string(),
            ),
        }
    }
}

impl From<QueryError> for Failure {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::Auth(a) => a.into(),
            QueryError::Invalid(_) => {
                failure(StatusCode::BAD_REQUEST, "invalid_request", e.to_string())
            }
            QueryError::NotFound(_) => failure(StatusCode::NOT_FOUND, "not_found", e.to_string()),
        }
    }
}

type Shared = State<Arc<Directory>>;

fn bearer(h: &HeaderMap) -> Option<&str> {
    h.get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

pub fn router(dir: Arc<Directory>) -> Router {
    Router::new()
        .route("/v1/cloudlets", get(search))
        .route(
            "/v1/cloudlets/{name}",
            get(get_cloudlet).put(heartbeat).delete(deregister),
        )
        .route("/v1/cloudlets/{name}/peers", get(peers))
        .route("/v1/watch", get(watch))
        .route("/v1/health", get(health))
        .route("/v1/fleet", get(fleet))
        .route("/ui", get(crate::ui::index))
        .route("/ui/", get(crate::ui::index))
        .route("/ui/fleet.js", get(crate::ui::script))
        .route("/ui/common.js", get(crate::ui::common))
        .route("/ui/style.css", get(crate::ui::style))
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], openapi_json()) }),
        )
        .with_state(dir)
}

/// Register, or heartbeat: the same body each time.
#[utoipa::path(put, path = "/v1/cloudlets/{name}", tag = "cloudlets",
    params(("name" = String, Path)), request_body = Registration,
    responses((status = 200, body = Lease), (status = 400, body = ApiError),
        (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 503, body = ApiError)),
    security(("bearer" = [])))]
pub async fn heartbeat(
    State(dir): Shared,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Json<Registration>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Lease>, Failure> {
    let Json(reg) = body.map_err(|e| {
        failure(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("invalid registration: {}", e.body_text()),
        )
    })?;
    Ok(Json(dir.heartbeat(&name, bearer(&headers), reg).await?))
}

/// Deregister (a cloudlet shutting down).
#[utoipa::path(delete, path = "/v1/cloudlets/{name}", tag = "cloudlets",
    params(("name" = String, Path)),
    responses((status = 204), (status = 401, body = ApiError), (status = 403, body = ApiError),
        (status = 404, body = ApiError)),
    security(("bearer" = [])))]
pub async fn deregister(
    State(dir): Shared,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, Failure> {
    dir.deregister(&name, bearer(&headers)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The cloudlets that can take an app, best first, and why.
#[utoipa::path(get, path = "/v1/cloudlets", tag = "search", params(SearchQuery),
    responses((status = 200, body = SearchAnswer), (status = 400, body = ApiError),
        (status = 401, body = ApiError)))]
pub async fn search(
    State(dir): Shared,
    ConnectInfo(peer): ConnectInfo<cloudlet_trust::tls::PeerAddr>,
    headers: HeaderMap,
    q: Result<Query<SearchQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SearchAnswer>, Failure> {
    let Query(q) = q.map_err(|e| {
        failure(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("invalid query: {}", e.body_text()),
        )
    })?;
    Ok(Json(dir.search(
        bearer(&headers),
        &q,
        Some(peer.remote.ip()),
    )?))
}

/// Every live cloudlet (no peer tokens), how long its lease still runs,
/// and its latest handoffs out: the fleet view's data.
#[utoipa::path(get, path = "/v1/fleet", tag = "search",
    responses((status = 200, body = Fleet), (status = 401, body = ApiError), (status = 403, body = ApiError)))]
pub async fn fleet(State(dir): Shared, headers: HeaderMap) -> Result<Json<Fleet>, Failure> {
    Ok(Json(dir.fleet(bearer(&headers))?))
}

/// One registered cloudlet (no peer token).
#[utoipa::path(get, path = "/v1/cloudlets/{name}", tag = "search",
    params(("name" = String, Path)),
    responses((status = 200, body = Registration), (status = 404, body = ApiError)))]
pub async fn get_cloudlet(
    State(dir): Shared,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Registration>, Failure> {
    Ok(Json(dir.get(bearer(&headers), &name)?))
}

/// The other live cloudlets with their peer tokens, for cloudlet `name`.
#[utoipa::path(get, path = "/v1/cloudlets/{name}/peers", tag = "cloudlets",
    params(("name" = String, Path)),
    responses((status = 200, body = PeerList), (status = 401, body = ApiError),
        (status = 403, body = ApiError)),
    security(("bearer" = [])))]
pub async fn peers(
    State(dir): Shared,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<PeerList>, Failure> {
    Ok(Json(dir.peers(&name, bearer(&headers)).await?))
}

/// Changes as server-sent events (`data:` one [`WatchEvent`] as JSON): a
/// `snapshot` event first, then the backlog, then changes as they happen.
/// A watcher that fell behind gets a new snapshot.
#[utoipa::path(get, path = "/v1/watch", tag = "search", params(WatchQuery),
    responses((status = 200, description = "text/event-stream of WatchEvent", body = WatchEvent)))]
pub async fn watch(
    State(dir): Shared,
    headers: HeaderMap,
    Query(q): Query<WatchQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Failure> {
    dir.authorize_device(bearer(&headers))?;
    Ok(Sse::new(watch_stream(dir, q.since)).keep_alive(KeepAlive::default()))
}

fn event(ev: &WatchEvent) -> Event {
    Event::default().data(serde_json::to_string(ev).unwrap_or_default())
}

fn watch_stream(
    dir: Arc<Directory>,
    since: Option<u64>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let (backlog, revision, rx) = dir.store.index().subscribe(since);
    let head = WatchEvent {
        kind: WatchKind::Snapshot,
        name: String::new(),
        revision,
        entry: None,
    };
    let first: Vec<Result<Event, Infallible>> = std::iter::once(head)
        .chain(backlog)
        .map(|e| Ok(event(&e)))
        .collect();
    let live = BroadcastStream::new(rx)
        .take_while(|r| {
            futures::future::ready(!matches!(r, Err(BroadcastStreamRecvError::Lagged(_))))
        })
        .filter_map(move |r| {
            futures::future::ready(match r {
                Ok(ev) if ev.revision > revision => Some(Ok(event(&ev))),
                _ => None,
            })
        });
    // A lagging watcher's stream ends; it reconnects with `since` (the SSE
    // client's retry), and gets a snapshot if the log no longer reaches.
    futures::stream::iter(first).chain(live)
}

#[utoipa::path(get, path = "/v1/health", tag = "search",
    responses((status = 200, body = DirectoryHealth)))]
pub async fn health(State(dir): Shared) -> Json<DirectoryHealth> {
    Json(dir.health())
}

/// The OpenAPI 3 document of the directory.
#[derive(OpenApi)]
#[openapi(
    info(title = "cloudlet directory", description = "The cloud tier: cloudlets register with leases, devices find the best cloudlet for their app"),
    paths(heartbeat, deregister, search, get_cloudlet, peers, watch, fleet, health),
    components(schemas(Registration, Lease, SearchAnswer, Candidate, Excluded, HeldBase, PeerList,
        Fleet, FleetEntry, FleetMove,
        WatchEvent, WatchKind, DirectoryHealth, ApiError,
        cloudlet_api::Location, cloudlet_api::Resources, cloudlet_api::Flavor)),
    modifiers(&BearerAuth)
)]
pub struct DirectoryApiDoc;

pub fn openapi_json() -> String {
    DirectoryApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_default()
}
