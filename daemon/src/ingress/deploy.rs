//! `POST /v1/functions/{name}/deploy`: a new version of a function from a registry, what
//! `edgefn deploy` sends. Answers once the version serves on trial (or why it never will);
//! its gate goes on in the background ([`crate::fleet::rollout`]).

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::http::{Api, Body, error, json_response, read_body};
use crate::fleet::{ImageRef, rollout};

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
