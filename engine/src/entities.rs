//! The Cedar entity model (docs/reference.md, "The Cedar entity model"),
//! built from values, never by
//! formatting ids into Cedar text.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use cedar_policy::{Context, Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression};

use crate::request::{time_fields, Request};
use crate::tenant::TenantPath;

/// HTTP methods that belong to `Action::"read"`.
pub const READ_METHODS: [&str; 3] = ["GET", "HEAD", "OPTIONS"];
/// HTTP methods that belong to `Action::"write"`.
pub const WRITE_METHODS: [&str; 4] = ["POST", "PUT", "PATCH", "DELETE"];

/// True for the methods that have a Cedar action (upper case, as sent).
pub fn is_known_method(m: &str) -> bool {
    READ_METHODS.contains(&m) || WRITE_METHODS.contains(&m)
}

/// Entity type names, parsed once.
#[derive(Debug, Clone)]
pub(crate) struct Types {
    pub tenant: EntityTypeName,
    pub user: EntityTypeName,
    pub route: EntityTypeName,
    pub action: EntityTypeName,
}

impl Types {
    pub fn new() -> Result<Self, String> {
        let parse =
            |s: &str| EntityTypeName::from_str(s).map_err(|e| format!("entity type `{s}`: {e}"));
        Ok(Types {
            tenant: parse("Tenant")?,
            user: parse("User")?,
            route: parse("Route")?,
            action: parse("Action")?,
        })
    }

    pub fn tenant_uid(&self, path: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(self.tenant.clone(), EntityId::new(path))
    }

    pub fn user_uid(&self, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(self.user.clone(), EntityId::new(id))
    }

    pub fn route_uid(&self, path: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(self.route.clone(), EntityId::new(path))
    }

    pub fn action_uid(&self, name: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(self.action.clone(), EntityId::new(name))
    }

    /// Uids of a tenant and all its ancestors.
    pub fn lineage_uids(&self, path: &TenantPath) -> HashSet<EntityUid> {
        path.lineage()
            .iter()
            .map(|p| self.tenant_uid(p.as_str()))
            .collect()
    }

    /// The action entities: one per known method, in its group, and the two groups.
    pub fn action_entities(&self) -> Result<Vec<Entity>, String> {
        let mut out = Vec::new();
        for group in ["read", "write"] {
            out.push(Entity::new_no_attrs(self.action_uid(group), HashSet::new()));
        }
        for (group, methods) in [("read", &READ_METHODS[..]), ("write", &WRITE_METHODS[..])] {
            for m in methods {
                let parents = HashSet::from([self.action_uid(group)]);
                out.push(Entity::new_no_attrs(self.action_uid(m), parents));
            }
        }
        Ok(out)
    }

    /// A tenant entity: parents are all its ancestors; attributes `path`,
    /// `depth` and the declared ones.
    pub fn tenant_entity(
        &self,
        path: &TenantPath,
        declared: &[(String, RestrictedExpression)],
    ) -> Result<Entity, String> {
        let mut attrs: HashMap<String, RestrictedExpression> = HashMap::new();
        attrs.insert(
            "path".into(),
            RestrictedExpression::new_string(path.as_str().to_string()),
        );
        attrs.insert(
            "depth".into(),
            RestrictedExpression::new_long(path.depth() as i64),
        );
        for (k, v) in declared {
            attrs.insert(k.clone(), v.clone());
        }
        let mut parents = self.lineage_uids(path);
        parents.remove(&self.tenant_uid(path.as_str()));
        Entity::new(self.tenant_uid(path.as_str()), attrs, parents).map_err(|e| e.to_string())
    }

    /// `User::"id"`: parents are the home tenant and its ancestors; attribute
    /// `tenant` is the home tenant. An anonymous request is `User::""`, in no
    /// tenant, with `tenant` set to `Tenant::""`, which is in no tree.
    /// `parents` is the home tenant's lineage (empty for an anonymous request).
    pub fn user_entity(
        &self,
        principal: Option<&crate::request::Principal>,
        parents: HashSet<EntityUid>,
    ) -> Result<Entity, String> {
        let (uid, home) = match principal {
            Some(p) => (self.user_uid(&p.id), self.tenant_uid(p.tenant.as_str())),
            None => (self.user_uid(""), self.tenant_uid("")),
        };
        let attrs = HashMap::from([(
            "tenant".to_string(),
            RestrictedExpression::new_entity_uid(home),
        )]);
        Entity::new(uid, attrs, parents).map_err(|e| e.to_string())
    }

    /// `Route::"/path"`: parents are the request tenant and its ancestors.
    /// `parents` is the request tenant's lineage.
    pub fn route_entity(
        &self,
        tenant: &TenantPath,
        path: &str,
        parents: HashSet<EntityUid>,
    ) -> Result<Entity, String> {
        let attrs = HashMap::from([
            (
                "path".to_string(),
                RestrictedExpression::new_string(path.to_string()),
            ),
            (
                "tenant".to_string(),
                RestrictedExpression::new_entity_uid(self.tenant_uid(tenant.as_str())),
            ),
        ]);
        Entity::new(self.route_uid(path), attrs, parents).map_err(|e| e.to_string())
    }

    /// The request context: `method`, `path`, `time`, `headers`, and `host`,
    /// `source_ip` and `claims` when known.
    pub fn context(&self, req: &Request) -> Result<Context, String> {
        let (epoch_s, hour_utc, weekday) = time_fields(req.time_ns);
        let mut fields: Vec<(String, RestrictedExpression)> = vec![
            (
                "method".into(),
                RestrictedExpression::new_string(req.method.clone()),
            ),
            (
                "path".into(),
                RestrictedExpression::new_string(req.path.clone()),
            ),
            (
                "time".into(),
                RestrictedExpression::new_record([
                    (
                        "epoch_s".to_string(),
                        RestrictedExpression::new_long(epoch_s),
                    ),
                    (
                        "hour_utc".to_string(),
                        RestrictedExpression::new_long(hour_utc),
                    ),
                    (
                        "weekday".to_string(),
                        RestrictedExpression::new_long(weekday),
                    ),
                ])
                .map_err(|e| e.to_string())?,
            ),
            (
                "headers".into(),
                RestrictedExpression::new_record(
                    req.headers
                        .iter()
                        .map(|(k, v)| (k.clone(), RestrictedExpression::new_string(v.clone()))),
                )
                .map_err(|e| e.to_string())?,
            ),
        ];
        if let Some(host) = &req.host {
            fields.push((
                "host".into(),
                RestrictedExpression::new_string(host.clone()),
            ));
        }
        if let Some(ip) = &req.source_ip {
            fields.push(("source_ip".into(), ip_expr(ip)?));
        }
        if let Some(claims) = &req.claims {
            fields.push(("claims".into(), json_to_expr(claims, "claims")?));
        }
        if let Some(extra) = &req.extra_context {
            for (k, v) in extra {
                let expr = if k == "source_ip" {
                    match v.as_str() {
                        Some(s) => ip_expr(s)?,
                        None => {
                            return Err(
                                "context `source_ip` must be a string such as `10.0.0.1`".into()
                            )
                        }
                    }
                } else {
                    json_to_expr(v, k)?
                };
                fields.retain(|(name, _)| name != k);
                fields.push((k.clone(), expr));
            }
        }
        Context::from_pairs(fields).map_err(|e| e.to_string())
    }
}

fn ip_expr(s: &str) -> Result<RestrictedExpression, String> {
    if s.parse::<std::net::IpAddr>().is_err() {
        return Err(format!(
            "`{}` is not an IP address",
            crate::tenant::shorten(s)
        ));
    }
    Ok(RestrictedExpression::new_ip(s))
}

/// JSON to a Cedar value: strings, integers, booleans, arrays (sets) and
/// objects (records). Floats and nulls have no Cedar equivalent and are refused.
pub(crate) fn json_to_expr(
    v: &serde_json::Value,
    at: &str,
) -> Result<RestrictedExpression, String> {
    use serde_json::Value;
    Ok(match v {
        Value::String(s) => RestrictedExpression::new_string(s.clone()),
        Value::Bool(b) => RestrictedExpression::new_bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => RestrictedExpression::new_long(i),
            None => {
                return Err(format!(
                    "`{at}`: {n} is not a 64-bit integer (Cedar has no floats)"
                ))
            }
        },
        Value::Array(items) => RestrictedExpression::new_set(
            items
                .iter()
                .enumerate()
                .map(|(i, x)| json_to_expr(x, &format!("{at}[{i}]")))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Value::Object(map) => RestrictedExpression::new_record(
            map.iter()
                .map(|(k, x)| Ok((k.clone(), json_to_expr(x, &format!("{at}.{k}"))?)))
                .collect::<Result<Vec<_>, String>>()?,
        )
        .map_err(|e| format!("`{at}`: {e}"))?,
        Value::Null => {
            return Err(format!(
                "`{at}`: null has no Cedar equivalent; leave the key out"
            ))
        }
    })
}
