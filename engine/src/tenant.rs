//! Tenant paths: `/`, `/acme`, `/acme/eu/team-a`, valid by construction.

use std::fmt;
use std::sync::Arc;

/// The deepest a tenant path may be (segments below the root).
pub const MAX_DEPTH: usize = 16;
/// The longest a segment may be.
pub const MAX_SEGMENT_LEN: usize = 63;

/// A tenant path. Every value of this type is valid (docs/reference.md, "Tenant paths"): it starts
/// with `/`, has at most [`MAX_DEPTH`] segments and each segment matches
/// `[a-z0-9][a-z0-9_-]{0,62}`. `/` is the root.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantPath(Arc<str>);

/// Why a string is not a tenant path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenantPathError {
    #[error("a tenant path must start with `/`, got `{0}`")]
    NotAbsolute(String),
    #[error("tenant path `{path}` has an empty segment")]
    EmptySegment { path: String },
    #[error("tenant path `{path}`: segment `{segment}` must match `[a-z0-9][a-z0-9_-]{{0,62}}`")]
    BadSegment { path: String, segment: String },
    #[error("tenant path `{path}` is deeper than {MAX_DEPTH} segments")]
    TooDeep { path: String },
}

/// Checks one segment against `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn is_valid_segment(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    match bytes.split_first() {
        None => false,
        Some((first, rest)) => {
            bytes.len() <= MAX_SEGMENT_LEN
                && (first.is_ascii_lowercase() || first.is_ascii_digit())
                && rest.iter().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-'
                })
        }
    }
}

/// Shortens user input before it is echoed in an error message.
pub(crate) fn shorten(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.escape_debug().to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", s.get(..end).unwrap_or_default().escape_debug())
}

/// A path looks up as its text (hash and equality are the text's), so a map
/// keyed by paths answers a `&str` without allocating a path.
impl std::borrow::Borrow<str> for TenantPath {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl TenantPath {
    /// The root tenant `/`.
    pub fn root() -> Self {
        TenantPath(Arc::from("/"))
    }

    /// Parses and validates a tenant path. A single trailing `/` is accepted
    /// (`/acme/` is `/acme`); anything else that is not canonical is refused.
    pub fn parse(s: &str) -> Result<Self, TenantPathError> {
        let Some(rest) = s.strip_prefix('/') else {
            return Err(TenantPathError::NotAbsolute(shorten(s)));
        };
        if rest.is_empty() {
            return Ok(Self::root());
        }
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() {
            return Err(TenantPathError::EmptySegment { path: shorten(s) });
        }
        let mut depth = 0;
        for segment in rest.split('/') {
            depth += 1;
            if depth > MAX_DEPTH {
                return Err(TenantPathError::TooDeep { path: shorten(s) });
            }
            if segment.is_empty() {
                return Err(TenantPathError::EmptySegment { path: shorten(s) });
            }
            if !is_valid_segment(segment) {
                return Err(TenantPathError::BadSegment {
                    path: shorten(s),
                    segment: shorten(segment),
                });
            }
        }
        // `s` itself when it has no trailing `/` (one allocation, no formatting).
        let canonical = s.strip_suffix('/').unwrap_or(s);
        Ok(TenantPath(Arc::from(canonical)))
    }

    /// The child of this tenant named `segment`.
    pub fn child(&self, segment: &str) -> Result<Self, TenantPathError> {
        if self.is_root() {
            Self::parse(&format!("/{segment}"))
        } else {
            Self::parse(&format!("{}/{segment}", self.0))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        &*self.0 == "/"
    }

    /// Number of segments below the root (`/` is 0, `/acme` is 1).
    pub fn depth(&self) -> usize {
        self.segments().count()
    }

    /// The segments, root first (`/acme/eu` gives `acme`, `eu`).
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|s| !s.is_empty())
    }

    /// The parent tenant; `None` for the root.
    pub fn parent(&self) -> Option<Self> {
        if self.is_root() {
            return None;
        }
        match self.0.rfind('/') {
            Some(0) => Some(Self::root()),
            Some(i) => self.0.get(..i).map(|p| TenantPath(Arc::from(p))),
            None => None,
        }
    }

    /// This tenant and then each ancestor up to the root, as paths (no
    /// allocation): `/acme/eu`, `/acme`, `/`.
    pub fn ancestors_or_self(&self) -> impl Iterator<Item = &str> {
        ancestors_or_self(self.as_str())
    }

    /// This tenant and all its ancestors, from the root down to `self`.
    pub fn lineage(&self) -> Vec<TenantPath> {
        let mut out = vec![self.clone()];
        let mut cur = self.clone();
        while let Some(p) = cur.parent() {
            out.push(p.clone());
            cur = p;
        }
        out.reverse();
        out
    }

    /// True if `self` is `other` or lies below it.
    pub fn is_within(&self, other: &TenantPath) -> bool {
        other.is_root()
            || self.0 == other.0
            || (self.0.starts_with(&*other.0)
                && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }
}

impl fmt::Display for TenantPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantPath({})", self.0)
    }
}

impl std::str::FromStr for TenantPath {
    type Err = TenantPathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for TenantPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TenantPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// [`TenantPath::ancestors_or_self`] of a path already known to be valid.
pub(crate) fn ancestors_or_self(path: &str) -> impl Iterator<Item = &str> {
    let mut next = Some(path);
    std::iter::from_fn(move || {
        let s = next?;
        next = match s.rfind('/') {
            _ if s == "/" => None,
            Some(0) => Some("/"),
            Some(i) => s.get(..i),
            None => None,
        };
        Some(s)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_paths() {
        for (input, want) in [
            ("/", "/"),
            ("/acme", "/acme"),
            ("/acme/", "/acme"),
            ("/acme/eu/team-a", "/acme/eu/team-a"),
            ("/a_b/0x", "/a_b/0x"),
        ] {
            assert_eq!(TenantPath::parse(input).unwrap().as_str(), want, "{input}");
        }
    }

    #[test]
    fn refuses_invalid_paths() {
        for input in [
            "",
            "acme",
            "//",
            "/acme//eu",
            "/Acme",
            "/ac me",
            "/-acme",
            "/_a",
            "/acme/é",
            "/a\"b",
            "/a\\b",
            "/acme/..",
            "/.",
        ] {
            assert!(
                TenantPath::parse(input).is_err(),
                "{input:?} should be refused"
            );
        }
        let long = format!("/{}", "a".repeat(64));
        assert!(TenantPath::parse(&long).is_err());
        let ok = format!("/{}", "a".repeat(63));
        assert!(TenantPath::parse(&ok).is_ok());
        let deep = "/a".repeat(17);
        assert!(matches!(
            TenantPath::parse(&deep),
            Err(TenantPathError::TooDeep { .. })
        ));
        assert!(TenantPath::parse(&"/a".repeat(16)).is_ok());
    }

    #[test]
    fn lineage_and_parent() {
        let t = TenantPath::parse("/acme/eu/team-a").unwrap();
        let names: Vec<_> = t.lineage().iter().map(|p| p.to_string()).collect();
        assert_eq!(names, ["/", "/acme", "/acme/eu", "/acme/eu/team-a"]);
        assert_eq!(t.depth(), 3);
        assert_eq!(TenantPath::root().parent(), None);
        assert_eq!(
            TenantPath::parse("/acme").unwrap().parent(),
            Some(TenantPath::root())
        );
    }

    #[test]
    fn within() {
        let a = TenantPath::parse("/acme").unwrap();
        let ae = TenantPath::parse("/acme/eu").unwrap();
        let acmex = TenantPath::parse("/acmex").unwrap();
        assert!(ae.is_within(&a));
        assert!(a.is_within(&a));
        assert!(!acmex.is_within(&a));
        assert!(!a.is_within(&ae));
        assert!(a.is_within(&TenantPath::root()));
    }

    #[test]
    fn ancestors_or_self_walk_up_to_the_root() {
        let t = TenantPath::parse("/acme/eu/team-a").unwrap();
        let got: Vec<&str> = t.ancestors_or_self().collect();
        assert_eq!(got, ["/acme/eu/team-a", "/acme/eu", "/acme", "/"]);
        let root = TenantPath::root();
        let root: Vec<&str> = root.ancestors_or_self().collect();
        assert_eq!(root, ["/"]);
    }
}
