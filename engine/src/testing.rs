//! Bundles written inline for the engine's unit tests.

use crate::bundle::{Bundle, BundleTenant, SourceFile, FORMAT};
use crate::settings::Settings;
use crate::tenant::TenantPath;

/// A file of the policy folder.
pub(crate) fn file(name: &str, text: &str) -> SourceFile {
    SourceFile {
        file: name.into(),
        text: text.into(),
    }
}

/// One tenant: its `tenant.json` (if any) and its policy files.
pub(crate) fn tenant(
    path: &str,
    config: Option<SourceFile>,
    policies: Vec<SourceFile>,
) -> BundleTenant {
    BundleTenant {
        path: TenantPath::parse(path).expect("a valid tenant path"),
        config,
        policies,
    }
}

/// A bundle of `tenants` (parents first) with its version computed.
pub(crate) fn bundle(settings: Settings, tenants: Vec<BundleTenant>) -> Bundle {
    let mut b = Bundle {
        format: FORMAT,
        version: String::new(),
        settings,
        schema: None,
        tenants,
    };
    b.version = b.compute_version();
    b
}
