//! Password authentication with a JWT (DESIGN D9): the client sends its token as the cleartext
//! password; the claims are kept for the session's per-command checks (a `tenant` token reaches
//! only its tenant). One hook per connection.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use utils::auth::{audit, AuthError, Claims, JwtAuth, Outcome};

use crate::backend::{AuthDecision, AuthHook};
use crate::error::{SqlState, UserError};
use crate::startup::StartupParams;

pub struct JwtPasswordAuth {
    auth: Arc<JwtAuth>,
    service: &'static str,
    peer: Option<SocketAddr>,
    claims: Arc<Mutex<Option<Claims>>>,
}

impl JwtPasswordAuth {
    pub fn new(auth: Arc<JwtAuth>, service: &'static str, peer: Option<SocketAddr>) -> Self {
        JwtPasswordAuth { auth, service, peer, claims: Arc::new(Mutex::new(None)) }
    }

    /// Where the accepted token's claims land; hand it to the query handler.
    pub fn claims_slot(&self) -> Arc<Mutex<Option<Claims>>> {
        self.claims.clone()
    }
}

/// The libpq error for a refused token or command: 28P01 for who-are-you failures, 28000 when
/// the token is valid but does not reach the object.
pub fn auth_user_error(e: &AuthError) -> UserError {
    let code =
        if e.http_status() == 401 { SqlState::INVALID_PASSWORD } else { SqlState::INVALID_AUTHORIZATION_SPECIFICATION };
    UserError::new(code, format!("authentication failed: {e}"))
}

impl AuthHook for JwtPasswordAuth {
    fn on_startup(&self, _params: &StartupParams) -> impl Future<Output = AuthDecision> + Send {
        std::future::ready(AuthDecision::RequestCleartextPassword)
    }

    fn on_cleartext_password(
        &self,
        _params: &StartupParams,
        password: &str,
    ) -> impl Future<Output = AuthDecision> + Send {
        let decision = match self.auth.decode(password) {
            Ok(claims) => {
                *self.claims.lock().unwrap_or_else(|e| e.into_inner()) = Some(claims);
                AuthDecision::Accept
            }
            Err(e) => {
                audit(self.service, self.peer, None, "libpq login", "-", Outcome::Denied, e.reason());
                AuthDecision::Reject(auth_user_error(&e))
            }
        };
        std::future::ready(decision)
    }
}
