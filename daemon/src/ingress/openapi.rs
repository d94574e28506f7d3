//! The OpenAPI 3 description of the HTTP API, served at `GET /openapi.json`. It documents the
//! rows of [`super::routes::ROUTES`] (a test keeps the two equal), and the test command checks
//! a running daemon against it with schemathesis.

use hyper::Response;
use hyper::header::{CONTENT_TYPE, HeaderValue};

use super::http::{Body, full};

pub const SPEC: &str = include_str!("openapi.json");

pub fn document() -> Response<Body> {
    let mut r = Response::new(full(SPEC));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
