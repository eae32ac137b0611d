//! RFC 7662 token introspection. The caller authenticates with a JWT-SVID of this trust
//! domain as `client_assertion` (RFC 7523 section 2.2; `aud` = the issuer or this
//! endpoint). A token is active only when it verifies, is this issuer's, has not expired,
//! is on record and no revocation stands over it; anything else is `{"active": false}`
//! (section 2.2: the reason is not told).

use serde_json::{json, Value};

use super::form::Form;
use super::issue::{client_assertion, standing_over, verify_svid, FrontDoor};
use super::OAuthError;
use crate::clock::unix_seconds;
use crate::revocation::{RevocationHandle, SvidKind};
use crate::server::ServerState;

pub async fn introspect(
    state: &ServerState,
    door: &FrontDoor,
    form: &Form,
) -> Result<Value, OAuthError> {
    let audiences = vec![door.issuer.clone(), door.introspection_endpoint()];
    let Some(assertion) = client_assertion(form)? else {
        return Err(OAuthError::InvalidClient(format!(
            "introspection needs client authentication: a JWT-SVID whose aud names {} as client_assertion (client_assertion_type {})",
            door.issuer,
            super::CLIENT_ASSERTION_JWT_BEARER
        )));
    };
    verify_svid(state, assertion, &audiences, "client_assertion")
        .await
        .map_err(OAuthError::into_client_error)?;
    let token = form.required("token")?;
    let inactive = json!({"active": false});
    let now_t = state.clock.now();
    let Ok(claims) =
        crate::svid::jwt::validate_access_token(token, &door.issuer, &state.ca.bundle(), now_t)
    else {
        return Ok(inactive);
    };
    let Some(jti) = claims.get("jti").and_then(Value::as_str) else {
        return Ok(inactive);
    };
    if state.revocations.is_jwt_revoked(jti) {
        return Ok(inactive);
    }
    let Ok(handle) = RevocationHandle::parse("svid", jti) else {
        return Ok(inactive);
    };
    let record = state
        .store
        .list_issued_covered(std::slice::from_ref(&handle), unix_seconds(now_t))
        .await?
        .into_iter()
        .find(|s| s.kind == SvidKind::AccessToken && s.id == jti);
    let Some(record) = record else {
        return Ok(inactive);
    };
    if standing_over(state, &record).is_some() {
        return Ok(inactive);
    }
    let mut out = json!({"active": true, "token_type": "Bearer"});
    for k in [
        "scope",
        "client_id",
        "sub",
        "aud",
        "iss",
        "exp",
        "iat",
        "jti",
        "act",
    ] {
        if let Some(v) = claims.get(k) {
            out[k] = v.clone();
        }
    }
    Ok(out)
}
