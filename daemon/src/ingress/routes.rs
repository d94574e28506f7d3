//! The route table: every path and method the HTTP API serves, in one place.
//!
//! A path matches a pattern segment by segment; `{name}` takes one whole segment. A path that
//! matches with another method is a 405 naming the allowed ones; no match is a 404. The
//! OpenAPI description (`openapi.json`) documents exactly these rows; a test keeps them equal.

use hyper::Method;

/// What a request is for, once routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Page,
    OpenApi,
    Health,
    Metrics,
    Status,
    Events,
    Cameras,
    Latest,
    LatestFrame,
    Functions,
    Invoke,
    Deploy,
    Pipelines,
    RunPipeline,
    DeadLetters,
    ReplayDeadLetters,
    DaprSubscribe,
    DaprEvent,
    DaprFleet,
    SeedImage,
    SeedHello,
}

use Endpoint::*;

impl Endpoint {
    /// What a browser fetches without headers (EventSource, `<img>`): these alone take the
    /// token as `?token=`.
    pub fn takes_query_token(self) -> bool {
        matches!(self, Events | Latest | LatestFrame)
    }
}

pub const ROUTES: &[(Method, &str, Endpoint)] = &[
    (Method::GET, "/", Page),
    (Method::GET, "/openapi.json", OpenApi),
    (Method::GET, "/healthz", Health),
    (Method::GET, "/metrics", Metrics),
    (Method::GET, "/v1/status", Status),
    (Method::GET, "/v1/events", Events),
    (Method::GET, "/v1/cameras", Cameras),
    (Method::GET, "/v1/cameras/{pipeline}/{camera}/latest", Latest),
    (Method::GET, "/v1/cameras/{pipeline}/{camera}/frame", LatestFrame),
    (Method::GET, "/v1/functions", Functions),
    (Method::POST, "/v1/functions/{name}", Invoke),
    (Method::POST, "/v1/functions/{name}/deploy", Deploy),
    (Method::GET, "/v1/pipelines", Pipelines),
    (Method::POST, "/v1/pipelines/{name}", RunPipeline),
    (Method::GET, "/v1/outbox/dead", DeadLetters),
    (Method::POST, "/v1/outbox/dead/replay", ReplayDeadLetters),
    (Method::GET, "/dapr/subscribe", DaprSubscribe),
    (Method::POST, "/v1/dapr/events/{pipeline}", DaprEvent),
    (Method::POST, "/v1/dapr/fleet", DaprFleet),
    (Method::POST, "/api/image", SeedImage),
    (Method::POST, "/api/hello", SeedHello),
];

pub enum Resolved<'p> {
    /// The endpoint and the path's `{…}` segments, in order.
    Found(Endpoint, Vec<&'p str>),
    /// The path exists, for these methods only.
    WrongMethod(Vec<Method>),
    NotFound,
}

pub fn resolve<'p>(method: &Method, path: &'p str) -> Resolved<'p> {
    let mut allowed = Vec::new();
    for (m, pattern, endpoint) in ROUTES {
        if let Some(params) = matches(pattern, path) {
            if m == method || (*m == Method::GET && method == Method::HEAD) {
                return Resolved::Found(*endpoint, params);
            }
            allowed.push(m.clone());
        }
    }
    if allowed.is_empty() { Resolved::NotFound } else { Resolved::WrongMethod(allowed) }
}

fn matches<'p>(pattern: &str, path: &'p str) -> Option<Vec<&'p str>> {
    let mut params = Vec::new();
    let mut segments = path.split('/');
    for want in pattern.split('/') {
        let got = segments.next()?;
        if want.starts_with('{') && want.ends_with('}') {
            if got.is_empty() {
                return None;
            }
            params.push(got);
        } else if want != got {
            return None;
        }
    }
    segments.next().is_none().then_some(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(method: Method, path: &str) -> Option<(Endpoint, Vec<&str>)> {
        match resolve(&method, path) {
            Resolved::Found(e, p) => Some((e, p)),
            _ => None,
        }
    }

    #[test]
    fn paths_match_whole_segments() {
        assert_eq!(found(Method::POST, "/v1/functions/grayscale"), Some((Invoke, vec!["grayscale"])));
        assert_eq!(found(Method::GET, "/v1/cameras/p/c/latest"), Some((Latest, vec!["p", "c"])));
        assert_eq!(found(Method::POST, "/v1/functions/"), None);
        assert_eq!(found(Method::POST, "/v1/functions/a/b"), None);
        assert_eq!(found(Method::GET, "/v1/cameras/p/latest"), None);
        assert_eq!(found(Method::HEAD, "/healthz"), Some((Health, vec![])));
    }

    #[test]
    fn a_known_path_with_another_method_names_the_allowed_ones() {
        assert!(matches!(resolve(&Method::DELETE, "/v1/functions/x"), Resolved::WrongMethod(m) if m == [Method::POST]));
        assert!(matches!(resolve(&Method::POST, "/healthz"), Resolved::WrongMethod(m) if m == [Method::GET]));
        assert!(matches!(resolve(&Method::GET, "/nowhere"), Resolved::NotFound));
    }

    /// Every route is in the OpenAPI description, and every documented operation is routed.
    #[test]
    fn the_openapi_description_documents_every_route() {
        let spec: serde_json::Value = serde_json::from_str(super::super::openapi::SPEC).expect("openapi.json parses");
        let mut documented = std::collections::BTreeSet::new();
        for (path, ops) in spec["paths"].as_object().expect("paths") {
            for method in ops.as_object().unwrap().keys().filter(|k| *k != "parameters") {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
        let routed: std::collections::BTreeSet<(String, String)> =
            ROUTES.iter().map(|(m, p, _)| (m.to_string(), p.to_string())).collect();
        assert_eq!(documented, routed);
    }
}
