//! Which web pages may talk to the daemon: the `Host` and `Origin` checks on every route.
//!
//! The API listens on loopback by default, with no token, so any program on the board can use
//! it. A web page the user opens must not: its script can POST to `127.0.0.1:8080` (a
//! cross-site request, which carries an `Origin` naming the page's site), and through DNS
//! rebinding it can even read the answers (its own domain name, resolved to 127.0.0.1, so the
//! request's `Host` names the attacker's domain). daprd and Prometheus check the same two
//! headers, for the same reasons.
//!
//! So `Host`, when sent, must be an IP address, `localhost`, the board's own host name (bare or `.local`),
//! or one of `server.allowed_hosts`; and a request with an `Origin` must come from the page of
//! the host it is sent to, or from an allowed host. Programs that send no `Origin` (curl,
//! daprd, Prometheus) pass the second check by not being web pages.

use hyper::Request;

/// Why a request was refused, for a 403 that says so.
pub fn refusal<B>(req: &Request<B>, allowed: &[String]) -> Option<String> {
    let host = req.headers().get(hyper::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    // No Host at all is not a browser (they always send one): HTTP/1.0 probes pass.
    if !host.is_empty() && !allowed_host(host_name(host), allowed) {
        return Some(format!(
            "Host `{host}` is not this board's: add it to server.allowed_hosts to reach the daemon by that name"
        ));
    }
    let origin = req.headers().get(hyper::header::ORIGIN)?;
    let origin = origin.to_str().unwrap_or("");
    let authority = origin.split_once("://").map_or("", |(_, rest)| rest);
    let same = !host.is_empty() && authority.eq_ignore_ascii_case(host);
    if same || allowed.iter().any(|a| a.eq_ignore_ascii_case(host_name(authority))) {
        return None;
    }
    Some(format!("a request from the web page at `{origin}` is not allowed: add its host to server.allowed_hosts"))
}

/// The host of a `Host` header or an origin's authority, without its port.
fn host_name(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { authority })
}

fn allowed_host(name: &str, allowed: &[String]) -> bool {
    if name.parse::<std::net::IpAddr>().is_ok() || name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(name)) {
        return true;
    }
    let own = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
    !own.is_empty()
        && (name.eq_ignore_ascii_case(&own)
            || name.strip_suffix(".local").is_some_and(|n| n.eq_ignore_ascii_case(&own)))
}

#[cfg(test)]
mod tests {
    use super::refusal;

    fn req(host: &str, origin: Option<&str>) -> hyper::Request<()> {
        let mut b = hyper::Request::builder().uri("/v1/functions/x");
        if !host.is_empty() {
            b = b.header("host", host);
        }
        if let Some(o) = origin {
            b = b.header("origin", o);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn rebinding_and_cross_site_requests_are_refused() {
        let none: Vec<String> = Vec::new();
        assert_eq!(refusal(&req("127.0.0.1:8080", None), &none), None);
        assert_eq!(refusal(&req("localhost:8080", Some("http://localhost:8080")), &none), None);
        assert_eq!(refusal(&req("[::1]:8080", None), &none), None);
        assert!(refusal(&req("attacker.example:8080", None), &none).unwrap().contains("allowed_hosts"));
        assert!(refusal(&req("127.0.0.1:8080", Some("http://attacker.example")), &none).is_some());
        assert!(refusal(&req("127.0.0.1:8080", Some("null")), &none).is_some());
        let allowed = vec!["cam-gw.example".to_string()];
        assert_eq!(refusal(&req("cam-gw.example:8080", None), &allowed), None);
        assert_eq!(refusal(&req("127.0.0.1:8080", Some("https://cam-gw.example")), &allowed), None);
    }
}
