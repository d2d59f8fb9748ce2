//! Bearer tokens of the platform's APIs (`CDP_API_TOKENS`: `principal:role:secret`,
//! comma-separated): parsed once, checked the same way by every API. A principal names an
//! operator or a system (it goes into audit rows); the secret is never printed.

use std::collections::HashMap;

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
}
