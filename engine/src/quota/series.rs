//! What the metrics need to know about the limits: which node's series a
//! request's limit status belongs to, and that node's buckets read back.

use std::sync::Arc;

use super::{BucketStore, Nanos, QuotaModel, StoreError};
use crate::tenant::TenantPath;

impl QuotaModel {
    /// For a request to `tenant`: every limit name that applies, sorted by
    /// name (the order of `QuotaDecision::limits`), with the deepest node of
    /// its chain, the node whose limit it is.
    pub fn chain_heads(&self, tenant: &TenantPath) -> Vec<(Arc<str>, TenantPath)> {
        let Some(plan) = self.plan_for(tenant) else {
            return Vec::new();
        };
        plan.chains
            .iter()
            .filter_map(|c| {
                let head = c.of(&plan.nodes).first()?;
                Some((Arc::clone(&c.name), head.node.clone()))
            })
            .collect()
    }

    /// The status of every limit that applies to requests to `node`, read
    /// from the store at `now` without charging anything (its `remaining`
    /// per name).
    pub fn peek(
        &self,
        node: &TenantPath,
        now: Nanos,
        store: &dyn BucketStore,
    ) -> Result<super::QuotaDecision, StoreError> {
        self.admit(node, 0, now, store)
    }
}
