//! Bearer tokens of the platform's APIs (`CDP_API_TOKENS`: `principal:role:secret`,
//! comma-separated): parsed once, checked the same way by every API. A principal names an
//! operator or a system (it goes into audit rows); the secret is never printed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// A caller of an API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("CDP_API_TOKENS entry {0} is not principal:role:secret")]
pub struct TokenError(pub usize);

/// Bearer secret → principal.
#[derive(Clone, Default)]
pub struct ApiTokens(HashMap<String, Principal>);

impl std::fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiTokens(<{} secret>)", self.0.len())
    }
}

impl ApiTokens {
    /// Parses `principal:role:secret` entries; blank entries are skipped.
    pub fn parse(entries: &[String]) -> Result<Self, TokenError> {
        let mut out = HashMap::new();
        for (i, e) in entries
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.trim().is_empty())
        {
            let mut it = e.trim().splitn(3, ':');
            match (it.next(), it.next(), it.next()) {
                (Some(n), Some(r), Some(s)) if !n.is_empty() && !r.is_empty() && !s.is_empty() => {
                    out.insert(
                        s.to_owned(),
                        Principal {
                            name: n.to_owned(),
                            role: r.to_owned(),
                        },
                    );
                }
                _ => return Err(TokenError(i)),
            }
        }
        Ok(Self(out))
    }

    /// The caller of a request, who must hold `role`: 401 without a known bearer token, 403
    /// with another role.
    pub fn authorize(&self, headers: &HeaderMap, role: &str) -> Result<Principal, Box<Response>> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(p) = token.and_then(|t| self.0.get(t)) else {
            let mut r = error(StatusCode::UNAUTHORIZED, "a bearer token is required");
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return Err(Box::new(r));
        };
        if p.role != role {
            return Err(Box::new(error(
                StatusCode::FORBIDDEN,
                &format!("the {role} role is required"),
            )));
        }
        Ok(p.clone())
    }
}

/// Failed authentications per client address: an address that failed `limit` times within
/// one `window` is refused without its request being looked at until the window ends, so
/// guessing keys costs the guesser time and the service nothing. The address is the TCP
/// peer's: behind a proxy that hides it, every client shares one address (limit at the
/// proxy and set the limit to 0 here, which turns the throttle off).
pub struct FailureThrottle {
    limit: u32,
    window: Duration,
    /// Addresses tracked at most; beyond it, new addresses are not tracked until windows
    /// expire (memory stays bounded under a spray from many addresses).
    capacity: usize,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl std::fmt::Debug for FailureThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailureThrottle")
            .field("limit", &self.limit)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl FailureThrottle {
    /// Addresses tracked at most by [`FailureThrottle::new`].
    pub const CAPACITY: usize = 100_000;

    /// `limit` failures per `window` and address; a limit of 0 throttles nothing.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self::with_capacity(limit, window, Self::CAPACITY)
    }

    pub fn with_capacity(limit: u32, window: Duration, capacity: usize) -> Self {
        Self {
            limit,
            window,
            capacity,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// How long `addr` must wait before it is heard again; `None` when it may be heard now.
    pub fn refused(&self, addr: IpAddr, now: Instant) -> Option<Duration> {
        if self.limit == 0 {
            return None;
        }
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let (since, n) = failures.get(&addr)?;
        let left = self
            .window
            .checked_sub(now.saturating_duration_since(*since))?;
        (*n >= self.limit && !left.is_zero()).then_some(left)
    }

    /// Counts a failed authentication of `addr`.
    pub fn failed(&self, addr: IpAddr, now: Instant) {
        if self.limit == 0 {
            return;
        }
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let window = self.window;
        let expired = |since: Instant| now.saturating_duration_since(since) >= window;
        if !failures.contains_key(&addr) && failures.len() >= self.capacity {
            failures.retain(|_, (since, _)| !expired(*since));
            if failures.len() >= self.capacity {
                return;
            }
        }
        let entry = failures.entry(addr).or_insert((now, 0));
        if expired(entry.0) {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

/// A JSON error body: `{"error": reason}`.
pub fn error(status: StatusCode, reason: &str) -> Response {
    (status, Json(serde_json::json!({"error": reason}))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(secret: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {secret}"))
                .unwrap_or(HeaderValue::from_static("")),
        );
        h
    }

    #[test]
    fn roles_are_checked_and_secrets_hidden() {
        let t = ApiTokens::parse(&["dpo:compliance:s3cret".to_owned(), " ".to_owned()])
            .unwrap_or_default();
        assert_eq!(
            t.authorize(&bearer("s3cret"), "compliance")
                .ok()
                .map(|p| p.name),
            Some("dpo".to_owned())
        );
        let forbidden = t.authorize(&bearer("s3cret"), "read").err();
        assert_eq!(forbidden.map(|r| r.status()), Some(StatusCode::FORBIDDEN));
        let unknown = t.authorize(&bearer("nope"), "compliance").err();
        assert_eq!(unknown.map(|r| r.status()), Some(StatusCode::UNAUTHORIZED));
        assert!(!format!("{t:?}").contains("s3cret"));
        assert_eq!(
            ApiTokens::parse(&["a:b".to_owned()]).err(),
            Some(TokenError(0))
        );
    }

    #[test]
    fn an_address_that_keeps_failing_waits_out_the_window() {
        let t = FailureThrottle::new(3, Duration::from_secs(60));
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let t0 = Instant::now();
        for _ in 0..2 {
            t.failed(a, t0);
        }
        assert_eq!(t.refused(a, t0), None, "two failures are allowed");
        t.failed(a, t0);
        assert_eq!(
            t.refused(a, t0 + Duration::from_secs(20)),
            Some(Duration::from_secs(40))
        );
        assert_eq!(t.refused(b, t0), None, "other addresses are heard");
        assert_eq!(t.refused(a, t0 + Duration::from_secs(60)), None);
        t.failed(a, t0 + Duration::from_secs(61));
        assert_eq!(
            t.refused(a, t0 + Duration::from_secs(61)),
            None,
            "a new window counts from zero"
        );
        let off = FailureThrottle::new(0, Duration::from_secs(60));
        for _ in 0..10 {
            off.failed(a, t0);
        }
        assert_eq!(off.refused(a, t0), None);
    }

    #[test]
    fn memory_is_bounded_under_a_spray_of_addresses() {
        let t = FailureThrottle::with_capacity(1, Duration::from_secs(60), 2);
        let t0 = Instant::now();
        for i in 0..5u8 {
            t.failed(IpAddr::from([10, 0, 0, i]), t0);
        }
        assert!(t.refused(IpAddr::from([10, 0, 0, 1]), t0).is_some());
        assert_eq!(t.refused(IpAddr::from([10, 0, 0, 4]), t0), None);
        let later = t0 + Duration::from_secs(61);
        t.failed(IpAddr::from([10, 0, 0, 4]), later);
        assert!(
            t.refused(IpAddr::from([10, 0, 0, 4]), later).is_some(),
            "expired entries make room"
        );
    }
}
