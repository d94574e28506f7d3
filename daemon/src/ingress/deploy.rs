//! The fleet's face in the API: `POST /v1/functions/{name}/deploy`, a new version of a
//! function from a registry, what `edgefn deploy` sends (it answers once the version serves on
//! trial, or why it never will; its gate goes on in the background, [`crate::fleet::rollout`]),
//! and the version fields `/v1/functions` and the page show for a function from an image.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::http::{Api, Body, error, json_response, read_body};
use crate::fleet::rollout::Records;
use crate::fleet::{ImageRef, rollout};

/// What serves for `name` and how it got there: image, digest, state (`trial` or
/// `committed`), the version before a trial, the last rollout's outcome, and the digests
/// rolled back here. None for a function from a file.
pub(super) fn version(api: &Api, records: &Records, name: &str) -> Option<serde_json::Value> {
    if !api.runtime.is_versioned(name) {
        return None;
    }
    let r = records.get(name).cloned().unwrap_or_default();
    let serving = r.trial.as_ref().or(r.committed.as_ref());
    let configured = api.fleet.cfg.functions.get(name).and_then(|f| f.image.clone());
    // Never deployed: the configured image, as it resolved at start.
    let resolved = || {
        let blobs = crate::fleet::blobs::Blobs::open(&api.fleet.cfg.runtime.state_dir);
        configured.as_deref().and_then(|c| blobs.resolved(c)).map(|r| r.manifest)
    };
    Some(json!({
        "image": serving.map(|v| v.image.clone()).or(configured.clone()),
        "digest": serving.map(|v| v.digest.clone()).or_else(resolved),
        "state": if r.trial.is_some() { "trial" } else { "committed" },
        "previous": r.previous,
        "last_rollout": r.last,
        "rolled_back": r.rolled_back,
        "rollout": r.rollout.map(|o| o.id),
    }))
}

pub(super) async fn deploy(api: &Api, name: &str, req: Request<Incoming>) -> Response<Body> {
    let rt = &api.runtime;
    if rt.get(name).is_none() && !rt.failed().contains_key(name) {
        return error(StatusCode::NOT_FOUND, format!("no function {name}"), Some(name), "unknown_function");
    }
    if !rt.is_versioned(name) {
        let msg = format!("function {name} comes from a file, not an image: set [functions.{name}] image to deploy it");
        return error(StatusCode::CONFLICT, msg, Some(name), "not_from_an_image");
    }
    let (body, _held) = match read_body(req, api).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let image = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v) => match v.get("image").and_then(|i| i.as_str()) {
            Some(i) => i.to_string(),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "the body must be {\"image\": \"oci://...\"}".into(),
                    Some(name),
                    "bad_body",
                );
            }
        },
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("the body is not JSON: {e}"), Some(name), "bad_body"),
    };
    if let Err(e) = ImageRef::parse(&image) {
        return error(StatusCode::BAD_REQUEST, e, Some(name), "bad_body");
    }
    match rollout::deploy(&api.fleet, name, &image, rollout::Origin::Explicit).await {
        Ok(started) => json_response(StatusCode::OK, &json!(started)),
        Err(e) => {
            tracing::warn!(function = %name, image = %image, "deploy refused: {e:#}");
            error(StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}"), Some(name), "not_deployed")
        }
    }
}
