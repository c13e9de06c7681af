//! The admin API: HTTP+JSON on the address `[admin]` names, over the
//! handles of a worker's pipelines. `weir status|deploy|rollback|pause|
//! resume` are its client (`cli::admin`).
//!
//! | method and path | does |
//! |---|---|
//! | `GET /v1/status` | every pipeline's state, lanes, plugin versions and counters |
//! | `GET /v1/pipelines/{name}` | one pipeline's |
//! | `GET /v1/tenants` | each tenant's usage: plugin memory, CPU and plugin-thread time, records, faults, quarantined pipelines |
//! | `POST /v1/pipelines/{name}/plugins/{n}/deploy` | body: a `.wasm`; swaps it in at plugin `n` (from 1) |
//! | `... /deploy?canary=N[&max_failure_rate=R]` | the same, as a canary judged on its first N records |
//! | `... /deploy?shadow=true` | runs it in the shadow of the serving version instead |
//! | `POST /v1/pipelines/{name}/plugins/{n}/promote`, `.../discard` | ends the shadow: it serves, or it stops |
//! | `POST /v1/pipelines/{name}/plugins/{n}/rollback[?to=HASH]` | swaps a kept version back in |
//! | `POST /v1/pipelines/{name}/pause`, `.../resume` | stops or restarts reading; a resume lifts a quarantine |
//!
//! Every request carries `Authorization: Bearer TOKEN` when a token is set;
//! with none, the API only listens on a loopback address. Refusals come as
//! `{"error": "..."}` with the status that fits: 401 (token), 404 (no such
//! pipeline, plugin or version), 409 (not running, nothing to roll back to,
//! no shadow to promote), 413 (upload too large), 422 (a candidate refused,
//! with the loader's or the plugin's reason), 400 (a bad query).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use crate::tenant::usage::TenantUsage;

use crate::pipeline::{
    CanaryRule, ControlError, PipelineHandle, PipelineStatus, ShadowReport, Wasm,
};

/// The environment variable holding the admin token, when the file has none.
pub const TOKEN_VAR: &str = "WEIR_ADMIN_TOKEN";

/// The worker's tenants and the plugin threads that charge them, for
/// `/v1/tenants`.
pub struct Tenants {
    /// The tenants of the pipeline file.
    pub configs: Vec<crate::tenant::TenantConfig>,
    /// The engine's plugin threads.
    pub scheduler: crate::engine::Scheduler,
}

/// Why the admin API cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The address is not `host:port`, or cannot be bound.
    #[error("admin API on `{address}`: {reason}")]
    Listen {
        /// The address asked for.
        address: String,
        /// Why not.
        reason: String,
    },
    /// Anyone who can reach the address could swap plugins.
    #[error(
        "admin API on `{address}`: a non-loopback address needs a token (`token` in `[admin]` \
         or {TOKEN_VAR}); without one, bind it to 127.0.0.1"
    )]
    NoToken {
        /// The address asked for.
        address: String,
    },
}

/// What the admin API serves.
pub struct AdminSettings {
    /// `host:port` to listen on.
    pub address: String,
    /// The bearer token, if any.
    pub token: Option<String>,
    /// Largest upload, in bytes.
    pub max_upload: usize,
}

struct AdminState {
    pipelines: Vec<PipelineHandle>,
    tenants: Tenants,
    by_name: HashMap<String, usize>,
    token: Option<String>,
    max_upload: usize,
}

/// A bound admin API, ready to serve.
pub struct AdminServer {
    listener: tokio::net::TcpListener,
    router: Router,
}

impl AdminServer {
    /// Binds `settings.address` for `pipelines`; refuses a non-loopback
    /// address without a token.
    pub async fn bind(
        settings: AdminSettings,
        pipelines: Vec<PipelineHandle>,
        tenants: Tenants,
    ) -> Result<Self, AdminError> {
        let address = settings.address;
        let listen_error = |reason: String| AdminError::Listen {
            address: address.clone(),
            reason,
        };
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .map_err(|err| listen_error(err.to_string()))?;
        let bound = listener
            .local_addr()
            .map_err(|err| listen_error(err.to_string()))?;
        if settings.token.is_none() && !bound.ip().is_loopback() {
            return Err(AdminError::NoToken { address });
        }
        let state = Arc::new(AdminState {
            by_name: (pipelines.iter().enumerate())
                .map(|(index, handle)| (handle.name().to_owned(), index))
                .collect(),
            pipelines,
            tenants,
            token: settings.token,
            max_upload: settings.max_upload,
        });
        let router = Router::new()
            .route("/v1/status", get(status))
            .route("/v1/tenants", get(tenant_usage))
            .route("/v1/pipelines/{name}", get(pipeline_status))
            .route("/v1/pipelines/{name}/plugins/{plugin}/deploy", post(deploy))
            .route(
                "/v1/pipelines/{name}/plugins/{plugin}/promote",
                post(promote),
            )
            .route(
                "/v1/pipelines/{name}/plugins/{plugin}/discard",
                post(discard),
            )
            .route(
                "/v1/pipelines/{name}/plugins/{plugin}/rollback",
                post(rollback),
            )
            .route("/v1/pipelines/{name}/pause", post(pause))
            .route("/v1/pipelines/{name}/resume", post(resume))
            .fallback(|| async {
                refuse(
                    StatusCode::NOT_FOUND,
                    "no such admin API path; see GET /v1/status",
                )
            })
            .layer(DefaultBodyLimit::disable())
            .layer(middleware::from_fn_with_state(state.clone(), authorize))
            .with_state(state);
        tracing::info!(address = %bound, "Admin API listening.");
        Ok(AdminServer { listener, router })
    }

    /// The address it listens on (the port chosen, if `:0` was asked).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until the task is dropped or aborted.
    pub async fn serve(self) {
        if let Err(err) = axum::serve(self.listener, self.router).await {
            tracing::error!(%err, "Admin API stopped.");
        }
    }
}

/// A refusal: `{"error": message}` with `status`.
fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    Refusal(status, message.into()).into_response()
}

/// A refusal not yet made a response.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.1 });
        (self.0, axum::Json(body)).into_response()
    }
}

async fn authorize(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = &state.token else {
        return next.run(request).await;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match given {
        None => refuse(
            StatusCode::UNAUTHORIZED,
            "missing `Authorization: Bearer TOKEN` (the worker's admin token)",
        ),
        Some(given) if !same(given.as_bytes(), token.as_bytes()) => {
            refuse(StatusCode::UNAUTHORIZED, "wrong admin token")
        }
        Some(_) => next.run(request).await,
    }
}

/// Compares in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |diff, (x, y)| diff | (x ^ y)) == 0
}

impl AdminState {
    fn pipeline(&self, name: &str) -> Result<&PipelineHandle, Refusal> {
        self.by_name
            .get(name)
            .map(|&index| &self.pipelines[index])
            .ok_or_else(|| {
                let known: Vec<&str> = self.pipelines.iter().map(PipelineHandle::name).collect();
                Refusal(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no pipeline `{name}` (this worker runs: {})",
                        known.join(", ")
                    ),
                )
            })
    }
}

fn control_refusal(err: &ControlError) -> Response {
    let status = match err {
        ControlError::NoSuchPlugin { .. } | ControlError::UnknownVersion { .. } => {
            StatusCode::NOT_FOUND
        }
        ControlError::Refused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        ControlError::NoPrevious { .. }
        | ControlError::Ambiguous { .. }
        | ControlError::NoShadow { .. }
        | ControlError::NotRunning { .. } => StatusCode::CONFLICT,
    };
    refuse(status, err.to_string())
}

fn answer<T: serde::Serialize>(result: Result<T, ControlError>) -> Response {
    match result {
        Ok(report) => axum::Json(report).into_response(),
        Err(err) => control_refusal(&err),
    }
}

async fn status(State(state): State<Arc<AdminState>>) -> axum::Json<Vec<PipelineStatus>> {
    axum::Json(state.pipelines.iter().map(PipelineHandle::status).collect())
}

async fn tenant_usage(State(state): State<Arc<AdminState>>) -> axum::Json<Vec<TenantUsage>> {
    let pipelines: Vec<_> = state.pipelines.iter().map(PipelineHandle::status).collect();
    let Tenants { configs, scheduler } = &state.tenants;
    axum::Json(crate::tenant::usage::usage(configs, &pipelines, scheduler))
}

async fn pipeline_status(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Response {
    match state.pipeline(&name) {
        Ok(handle) => axum::Json(handle.status()).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

/// How a deploy serves its upload.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployQuery {
    #[serde(default)]
    shadow: bool,
    canary: Option<u64>,
    max_failure_rate: Option<f64>,
}

impl DeployQuery {
    fn canary(&self) -> Result<Option<CanaryRule>, Refusal> {
        let bad = |message: String| Refusal(StatusCode::BAD_REQUEST, message);
        match (self.shadow, self.canary, self.max_failure_rate) {
            (true, Some(_), _) => Err(bad("a deploy is a shadow or a canary, not both".into())),
            (_, None, Some(_)) => Err(bad("`max_failure_rate` needs `canary`".into())),
            (_, None, None) => Ok(None),
            (_, Some(records), rate) => CanaryRule::new(
                records,
                rate.unwrap_or(CanaryRule::DEFAULT_MAX_FAILURE_RATE),
            )
            .map(Some)
            .map_err(bad),
        }
    }
}

async fn deploy(
    State(state): State<Arc<AdminState>>,
    Path((name, plugin)): Path<(String, usize)>,
    query: Result<Query<DeployQuery>, axum::extract::rejection::QueryRejection>,
    request: Request,
) -> Response {
    let too_large = || {
        refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the upload is larger than `max_upload_mb` of `[admin]` ({} MiB)",
                state.max_upload >> 20
            ),
        )
    };
    // Refused before a byte of it is read when it says how long it is.
    let declared = (request.headers().get(header::CONTENT_LENGTH))
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > state.max_upload as u64) {
        return too_large();
    }
    // Read before any other refusal: a client still sending its upload
    // would otherwise see a broken pipe instead of the answer.
    let body = match axum::body::to_bytes(request.into_body(), state.max_upload).await {
        Ok(body) => body,
        Err(_) => return too_large(),
    };
    let handle = match state.pipeline(&name) {
        Ok(handle) => handle,
        Err(refusal) => return refusal.into_response(),
    };
    let query = match query {
        Ok(Query(query)) => query,
        Err(err) => return refuse(StatusCode::BAD_REQUEST, err.body_text()),
    };
    let canary = match query.canary() {
        Ok(canary) => canary,
        Err(refusal) => return refusal.into_response(),
    };
    if body.is_empty() {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the request body must be the `.wasm` to deploy",
        );
    }
    let wasm = Wasm::Upload(body.to_vec());
    match (query.shadow, canary) {
        (true, _) => answer(handle.shadow(plugin, wasm).await),
        (false, Some(rule)) => answer(handle.deploy_canary(plugin, wasm, rule).await),
        (false, None) => answer(handle.deploy(plugin, wasm).await),
    }
}

async fn promote(
    State(state): State<Arc<AdminState>>,
    Path((name, plugin)): Path<(String, usize)>,
) -> Response {
    match state.pipeline(&name) {
        Ok(handle) => answer(handle.promote(plugin).await),
        Err(refusal) => refusal.into_response(),
    }
}

async fn discard(
    State(state): State<Arc<AdminState>>,
    Path((name, plugin)): Path<(String, usize)>,
) -> Response {
    match state.pipeline(&name) {
        Ok(handle) => answer::<ShadowReport>(handle.discard(plugin).await),
        Err(refusal) => refusal.into_response(),
    }
}

#[derive(Deserialize)]
struct RollbackQuery {
    to: Option<String>,
}

async fn rollback(
    State(state): State<Arc<AdminState>>,
    Path((name, plugin)): Path<(String, usize)>,
    Query(query): Query<RollbackQuery>,
) -> Response {
    match state.pipeline(&name) {
        Ok(handle) => answer(handle.rollback(plugin, query.to).await),
        Err(refusal) => refusal.into_response(),
    }
}

async fn pause(State(state): State<Arc<AdminState>>, Path(name): Path<String>) -> Response {
    set_paused(&state, &name, true).await
}

async fn resume(State(state): State<Arc<AdminState>>, Path(name): Path<String>) -> Response {
    set_paused(&state, &name, false).await
}

async fn set_paused(state: &AdminState, name: &str, paused: bool) -> Response {
    let handle = match state.pipeline(name) {
        Ok(handle) => handle,
        Err(refusal) => return refusal.into_response(),
    };
    match handle.pause(paused).await {
        Ok(()) => axum::Json(handle.status()).into_response(),
        Err(err) => control_refusal(&err),
    }
}
