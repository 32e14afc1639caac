//! The request as the engine sees it: already mapped from HTTP (tenant,
//! principal, method, normalized path and context fields).

use crate::tenant::TenantPath;

/// Who is asking. `None` in [`Request::principal`] is an anonymous request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The principal id as given (any string; never formatted into Cedar text).
    pub id: String,
    /// The principal's home tenant.
    pub tenant: TenantPath,
}

/// One request to decide.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub tenant: TenantPath,
    pub principal: Option<Principal>,
    /// HTTP method in upper case.
    pub method: String,
    /// The Cedar action when it is not the method: `read` or `write` for a
    /// gRPC call when the bundle maps gRPC methods.
    pub action: Option<&'static str>,
    /// Normalized resource path (no query).
    pub path: String,
    pub host: Option<String>,
    pub source_ip: Option<String>,
    /// Request time, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// The `context_headers` present on the request, names lowercase.
    pub headers: Vec<(String, String)>,
    /// Values of the headers keyed limits count by (names lowercase); not
    /// part of the policy context.
    pub key_headers: Vec<(String, String)>,
    /// JWT claims (a JSON object) when the identity comes from a JWT.
    pub claims: Option<serde_json::Value>,
    /// Extra context fields merged over the built context (`tenantgate check --context`, policy tests).
    pub extra_context: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Request {
    /// The Cedar action's id: the gRPC mapping's group, else the method.
    pub fn action_name(&self) -> &str {
        self.action.unwrap_or(&self.method)
    }

    /// A request with no optional parts: anonymous, no host, no headers.
    pub fn new(tenant: TenantPath, method: impl Into<String>, path: impl Into<String>) -> Self {
        Request {
            tenant,
            principal: None,
            method: method.into(),
            action: None,
            path: path.into(),
            host: None,
            source_ip: None,
            time_ns: 0,
            headers: Vec::new(),
            key_headers: Vec::new(),
            claims: None,
            extra_context: None,
        }
    }

    /// Sets the principal; the home tenant defaults to the request tenant.
    pub fn with_principal(mut self, id: impl Into<String>, home: Option<TenantPath>) -> Self {
        let tenant = home.unwrap_or_else(|| self.tenant.clone());
        self.principal = Some(Principal {
            id: id.into(),
            tenant,
        });
        self
    }

    pub fn at(mut self, time_ns: u64) -> Self {
        self.time_ns = time_ns;
        self
    }
}

/// `context.time` fields of a Unix time: (`epoch_s`, `hour_utc`, `weekday`),
/// `weekday` as in ISO 8601: 1 is Monday, 7 is Sunday.
pub fn time_fields(time_ns: u64) -> (i64, i64, i64) {
    let secs = time_ns / 1_000_000_000;
    let days = secs / 86_400;
    let hour = (secs % 86_400) / 3_600;
    // 1970-01-01 was a Thursday (ISO weekday 4).
    let weekday = (days + 3) % 7 + 1;
    (
        i64::try_from(secs).unwrap_or(i64::MAX),
        hour as i64,
        weekday as i64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_fields_know_the_calendar() {
        // 2026-11-26T15:30:00Z is a Thursday.
        let t = 1_795_707_000u64 * 1_000_000_000;
        assert_eq!(time_fields(t), (1_795_707_000, 15, 4));
        assert_eq!(time_fields(0), (0, 0, 4));
        // 1970-01-04 was a Sunday.
        assert_eq!(time_fields(3 * 86_400 * 1_000_000_000).2, 7);
    }
}
