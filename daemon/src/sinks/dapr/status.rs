//! What a sidecar's refusal means for the results it refused, as daprd answers.
//!
//! One table, read top down, the first row that matches wins (as `runtime/error.rs::KINDS`
//! is the one table of a call's failures). A request over the body limit (413, or daprd's
//! "stream too large" read error) is not here: the sink splits it.

use hyper::StatusCode;

/// What a refusal tells about the results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meaning {
    /// The sidecar is up but its pub/sub is not (yet): components still loading, or a
    /// misnamed component. A config problem, not the results': kept and retried, loudly.
    NoPubsub,
    /// Our API token is missing or wrong: retried, with an error that says so, because
    /// dead-lettering on a config mistake would throw results away.
    NeedsToken,
    /// The sidecar sheds load: retried after a backoff, never counted against a result.
    Busy,
    /// A refusal no retry can fix: dead letters.
    Refused,
    /// Anything else (5xx, a route the sidecar lacks): retried.
    Passing,
}

/// (status, `errorCode` or any, meaning).
const REFUSALS: [(StatusCode, Option<&str>, Meaning); 6] = [
    (StatusCode::BAD_REQUEST, Some("ERR_PUBSUB_NOT_CONFIGURED"), Meaning::NoPubsub),
    (StatusCode::NOT_FOUND, Some("ERR_PUBSUB_NOT_FOUND"), Meaning::NoPubsub),
    (StatusCode::UNAUTHORIZED, None, Meaning::NeedsToken),
    (StatusCode::TOO_MANY_REQUESTS, None, Meaning::Busy),
    (StatusCode::BAD_REQUEST, None, Meaning::Refused),
    (StatusCode::FORBIDDEN, None, Meaning::Refused),
];

pub fn meaning(status: StatusCode, error_code: Option<&str>) -> Meaning {
    REFUSALS
        .iter()
        .find(|(s, code, _)| *s == status && code.is_none_or(|c| Some(c) == error_code))
        .map_or(Meaning::Passing, |(.., m)| *m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_matching_row_wins() {
        assert_eq!(meaning(StatusCode::BAD_REQUEST, Some("ERR_PUBSUB_NOT_CONFIGURED")), Meaning::NoPubsub);
        assert_eq!(meaning(StatusCode::BAD_REQUEST, Some("ERR_MALFORMED_REQUEST")), Meaning::Refused);
        assert_eq!(meaning(StatusCode::NOT_FOUND, Some("ERR_PUBSUB_NOT_FOUND")), Meaning::NoPubsub);
        assert_eq!(meaning(StatusCode::NOT_FOUND, None), Meaning::Passing);
        assert_eq!(meaning(StatusCode::FORBIDDEN, Some("ERR_PUBSUB_FORBIDDEN")), Meaning::Refused);
        assert_eq!(meaning(StatusCode::TOO_MANY_REQUESTS, None), Meaning::Busy);
        assert_eq!(meaning(StatusCode::INTERNAL_SERVER_ERROR, None), Meaning::Passing);
    }
}
