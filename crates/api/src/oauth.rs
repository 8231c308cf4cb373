//! `POST /v1/oauth/token`: the hosted service's REST exchange of client credentials for an access token (OAuth 2.0
//! client credentials, RFC 6749 §4.4), issuing the same tokens as `AuthService/GetToken`.
//!
//! The credentials come as JSON (`client_id`, `client_secret`, `grant_type`, optional `scope`), as a form
//! (`application/x-www-form-urlencoded`, what OAuth libraries send), or in HTTP Basic authentication. Errors are
//! OAuth's: `{"error": "invalid_client" | "invalid_request" | "unsupported_grant_type" | "invalid_scope", …}`.

use base64::Engine as _;
use compute_control::{AuthError, ControlError};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::json;
use tonic::body::Body;

use crate::front_door::Shared;
use crate::http_util::json;

/// The endpoint's path.
pub const PATH: &str = "/v1/oauth/token";

/// The most a token request's body may be.
const MAX_BODY: usize = 64 * 1024;

/// What a token request asks for.
#[derive(Debug, Default, PartialEq, Eq)]
struct TokenRequest {
    client_id: String,
    client_secret: String,
    grant_type: String,
    scope: Option<String>,
}

/// Serves one token request.
pub(crate) async fn serve(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::POST {
        return oauth_error(StatusCode::METHOD_NOT_ALLOWED, "invalid_request", "use POST");
    }
    let basic = basic_credentials(req.headers());
    let content_type =
        req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &format!("reading the body: {e}")),
    };
    let mut token_req = match parse(&content_type, &body) {
        Ok(r) => r,
        Err(m) => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &m),
    };
    if let Some((id, secret)) = basic {
        token_req.client_id = id;
        token_req.client_secret = secret;
    }
    if token_req.grant_type != "client_credentials" {
        let m = format!("grant_type {:?}: only \"client_credentials\" is supported", token_req.grant_type);
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", &m);
    }
    if token_req.client_id.is_empty() || token_req.client_secret.is_empty() {
        let m = "client_id and client_secret are required (in the body, or as HTTP Basic credentials)";
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", m);
    }
    let auth = shared.control.auth();
    match auth.get_token(&token_req.client_id, &token_req.client_secret, "", token_req.scope.as_deref()) {
        Ok(t) => {
            let mut resp = json(
                StatusCode::OK,
                &json!({
                    "access_token": t.access_token,
                    "token_type": "Bearer",
                    "expires_in": t.expires_in,
                    "expires_at": t.expires_at,
                    "environment_id": t.environment_id,
                    "primary_environment": t.primary_environment,
                }),
            );
            resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp.headers_mut().insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
            resp
        }
        Err(ControlError::Auth(e @ (AuthError::InvalidCredentials | AuthError::Revoked(_)))) => {
            let mut resp = oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", &e.to_string());
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"compute\""));
            resp
        }
        Err(ControlError::Auth(
            e @ (AuthError::InvalidScope(_) | AuthError::UnknownEnvironment(_) | AuthError::EnvironmentDenied { .. }),
        )) => oauth_error(StatusCode::BAD_REQUEST, "invalid_scope", &e.to_string()),
        Err(e) => {
            tracing::error!(error = %e, "issuing a token failed");
            oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the server could not issue a token")
        }
    }
}

/// Reads the body as JSON or as a form, by its content type.
fn parse(content_type: &str, body: &[u8]) -> Result<TokenRequest, String> {
    let field = |v: Option<&serde_json::Value>, name: &str| -> Result<Option<String>, String> {
        match v {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("{name} must be a string")),
        }
    };
    if content_type.starts_with("application/x-www-form-urlencoded") {
        let mut r = TokenRequest::default();
        for (k, v) in form_urlencoded::parse(body) {
            match k.as_ref() {
                "client_id" => r.client_id = v.into_owned(),
                "client_secret" => r.client_secret = v.into_owned(),
                "grant_type" => r.grant_type = v.into_owned(),
                "scope" => r.scope = Some(v.into_owned()).filter(|s| !s.is_empty()),
                _ => {}
            }
        }
        return Ok(r);
    }
    if !(content_type.is_empty() || content_type.starts_with("application/json")) {
        return Err(format!(
            "content-type {content_type:?}: send application/json or application/x-www-form-urlencoded"
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(if body.is_empty() { b"{}" } else { body })
        .map_err(|e| format!("the body is not JSON: {e}"))?;
    let obj = v.as_object().ok_or("the body must be a JSON object")?;
    Ok(TokenRequest {
        client_id: field(obj.get("client_id"), "client_id")?.unwrap_or_default(),
        client_secret: field(obj.get("client_secret"), "client_secret")?.unwrap_or_default(),
        grant_type: field(obj.get("grant_type"), "grant_type")?.unwrap_or_default(),
        scope: field(obj.get("scope"), "scope")?.filter(|s| !s.is_empty()),
    })
}

/// `Authorization: Basic base64(id:secret)`, when sent.
fn basic_credentials(headers: &http::HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response<Body> {
    let mut resp = json(status, &json!({ "error": error, "error_description": description }));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_request_is_read_from_json_or_a_form() {
        let json_req =
            parse("application/json", br#"{"client_id":"c","client_secret":"s","grant_type":"client_credentials"}"#)
                .unwrap();
        let form_req =
            parse("application/x-www-form-urlencoded", b"client_id=c&client_secret=s&grant_type=client_credentials")
                .unwrap();
        assert_eq!(json_req, form_req);
        assert_eq!(json_req.client_id, "c");
        let scoped = parse("application/x-www-form-urlencoded", b"grant_type=client_credentials&scope=env%3Aprod");
        assert_eq!(scoped.unwrap().scope.as_deref(), Some("env:prod"));
        assert!(parse("application/json", b"[1]").unwrap_err().contains("JSON object"));
        assert!(parse("application/json", br#"{"client_id": 5}"#).unwrap_err().contains("client_id"));
        assert!(parse("text/plain", b"x").unwrap_err().contains("content-type"));
    }

    #[test]
    fn basic_credentials_are_read_from_the_authorization_header() {
        let mut h = http::HeaderMap::new();
        let encoded = base64::engine::general_purpose::STANDARD.encode("id-1:se:cret");
        h.insert(header::AUTHORIZATION, format!("Basic {encoded}").parse().unwrap());
        assert_eq!(basic_credentials(&h), Some(("id-1".into(), "se:cret".into())));
        h.insert(header::AUTHORIZATION, "Bearer x".parse().unwrap());
        assert_eq!(basic_credentials(&h), None);
    }
}
