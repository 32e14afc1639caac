//! Request path normalization (docs/reference.md, "Path normalization").
//! Policies, the tenant taken from the path and the `Route` entity all see the
//! normalized path only.
//!
//! Rules, in order:
//! 1. The query (`?...`) and fragment (`#...`) are cut off.
//! 2. The path must start with `/` and hold no control characters, spaces or `\`.
//! 3. Percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`, hex digits
//!    in either case) are decoded, once. An encoded `/` (`%2F`, `%2f`) or `\`
//!    (`%5C`) is refused. Other escapes stay as they are, with upper-case hex,
//!    so `%252e` (a double-encoded `.`) stays data, never becomes `..`.
//! 4. Each segment loses its `;` parameters (`/a;v=1/b` is `/a/b`), as many
//!    servers do. A `.` or `..` segment that carries parameters (`..;x`) is
//!    refused: servers disagree on whether it climbs, so no single reading is
//!    safe.
//! 5. Empty segments and `.` are dropped; `..` removes the previous segment;
//!    a `..` with nothing left to remove climbs above the root and is refused.
//!
//! Also refused, because an upstream that decodes once more than we do would
//! see a different path from the one judged: an encoded control character
//! (`%00`-`%1F`, `%7F`), a double-encoded separator (`%252F`, `%255C`) and a
//! segment that is a double-encoded dot segment (`%252e%252e`, `.%252E`).

/// Why a path was refused (a 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with `/`")]
    NotAbsolute,
    #[error("the path contains an encoded `/` or `\\` ({0})")]
    EncodedSlash(String),
    #[error("the path contains a malformed percent escape")]
    BadEscape,
    #[error("the path contains a control character, space or `\\`")]
    BadCharacter,
    #[error("the path climbs above its root with `..`")]
    ClimbsAboveRoot,
    #[error("the path has a `.` or `..` segment with `;` parameters")]
    DotSegmentParameters,
    #[error("the path is longer than {0} bytes")]
    TooLong(usize),
    #[error("the path contains an encoded control character ({0})")]
    EncodedControl(String),
    #[error("the path contains a double-encoded `/`, `\\` or dot segment ({0})")]
    DoubleEncoded(String),
}

/// The longest path accepted.
pub const MAX_PATH_LEN: usize = 8192;

/// Normalizes a request path (see the module docs).
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    if raw.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong(MAX_PATH_LEN));
    }
    let end = raw.find(['?', '#']).unwrap_or(raw.len());
    let path = raw.get(..end).unwrap_or(raw);
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // One pass: refuse bad characters, and see whether the path is already
    // normal (no escapes, dots, parameters, empty segments or trailing `/`),
    // the common case, which needs no other work.
    let mut plain = true;
    let mut prev = 0u8;
    for b in path.bytes() {
        if b.is_ascii_control() || b == b' ' || b == b'\\' {
            return Err(PathError::BadCharacter);
        }
        plain &= !(matches!(b, b'%' | b';' | b'.') || (b == b'/' && prev == b'/'));
        prev = b;
    }
    if plain && (path.len() == 1 || prev != b'/') {
        return Ok(path.to_string());
    }
    normalize_slow(path)
}

/// [`normalize_path`] of a path that needs the full treatment.
fn normalize_slow(path: &str) -> Result<String, PathError> {
    let decoded = decode_unreserved(path)?;
    if let Some(i) = find_double_encoded_separator(&decoded) {
        return Err(PathError::DoubleEncoded(
            decoded.get(i..i + 5).unwrap_or("%25").to_string(),
        ));
    }
    let mut out: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        if is_double_encoded_dot_segment(segment) {
            return Err(PathError::DoubleEncoded(shorten_segment(segment)));
        }
        let (segment, params) = match segment.split_once(';') {
            Some((s, _)) => (s, true),
            None => (segment, false),
        };
        if params && (segment == "." || segment == "..") {
            return Err(PathError::DotSegmentParameters);
        }
        match segment {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::ClimbsAboveRoot);
                }
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for s in &out {
        result.push('/');
        result.push_str(s);
    }
    if result.is_empty() {
        result.push('/');
    }
    Ok(result)
}

/// Where `%25` encodes the start of an escaped `/` or `\\` (`%252F`, `%255c`).
fn find_double_encoded_separator(decoded: &str) -> Option<usize> {
    let b = decoded.as_bytes();
    (0..b.len()).find(|&i| {
        let at = |j: usize| b.get(i + j).copied().unwrap_or(0);
        at(0) == b'%'
            && at(1) == b'2'
            && at(2) == b'5'
            && matches!(
                (at(3), at(4).to_ascii_lowercase()),
                (b'2', b'f') | (b'5', b'c')
            )
    })
}

/// A segment that decodes to `.` or `..` only after a second decoding
/// (`%252e`, `.%252E`, `%252e%252e`).
fn is_double_encoded_dot_segment(segment: &str) -> bool {
    let segment = segment.split(';').next().unwrap_or(segment);
    if !segment.contains("%25") {
        return false;
    }
    let mut rest = segment;
    let mut dots = 0;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            rest = r;
        } else if rest.len() >= 5
            && rest
                .get(..5)
                .is_some_and(|p| p.eq_ignore_ascii_case("%252e"))
        {
            rest = rest.get(5..).unwrap_or_default();
        } else {
            return false;
        }
        dots += 1;
    }
    (1..=2).contains(&dots)
}

fn shorten_segment(s: &str) -> String {
    crate::tenant::shorten(s)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b != b'%' {
            // Copy the whole UTF-8 character.
            let ch_len = path
                .get(i..)
                .and_then(|s| s.chars().next())
                .map(char::len_utf8)
                .unwrap_or(1);
            out.push_str(path.get(i..i + ch_len).unwrap_or(""));
            i += ch_len;
            continue;
        }
        let (Some(h), Some(l)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEscape);
        };
        let c = h * 16 + l;
        if c < 0x20 || c == 0x7f {
            return Err(PathError::EncodedControl(
                path.get(i..i + 3).unwrap_or("").to_string(),
            ));
        }
        if c == b'/' || c == b'\\' {
            return Err(PathError::EncodedSlash(
                path.get(i..i + 3).unwrap_or("").to_string(),
            ));
        }
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(c));
        } else {
            out.push('%');
            out.push(char::from(
                b"0123456789ABCDEF"
                    .get(usize::from(h))
                    .copied()
                    .unwrap_or(b'0'),
            ));
            out.push(char::from(
                b"0123456789ABCDEF"
                    .get(usize::from(l))
                    .copied()
                    .unwrap_or(b'0'),
            ));
        }
        i += 3;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes() {
        for (raw, want) in [
            ("/", "/"),
            ("/orders/1", "/orders/1"),
            ("/orders/1?x=../..", "/orders/1"),
            ("//orders///1/", "/orders/1"),
            ("/a/./b/../c", "/a/c"),
            ("/a/%2e%2E/b", "/b"),
            ("/a/%2e/b", "/a/b"),
            ("/%61dmin", "/admin"),
            ("/a/x%252ey/b", "/a/x%252ey/b"),
            ("/a/%2525/b", "/a/%2525/b"),
            ("/a/%252e.x/b", "/a/%252e.x/b"),
            ("/a%20b", "/a%20b"),
            ("/a%c3%a9", "/a%C3%A9"),
            ("/admin;x=1/users", "/admin/users"),
            ("/a;/b", "/a/b"),
            ("/é", "/é"),
            ("/a/b#frag", "/a/b"),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn refuses() {
        assert_eq!(
            normalize_path("/a%2Fb"),
            Err(PathError::EncodedSlash("%2F".into()))
        );
        assert!(matches!(
            normalize_path("/a%2fb"),
            Err(PathError::EncodedSlash(_))
        ));
        assert!(matches!(
            normalize_path("/a%5cb"),
            Err(PathError::EncodedSlash(_))
        ));
        assert_eq!(normalize_path("/.."), Err(PathError::ClimbsAboveRoot));
        assert_eq!(
            normalize_path("/public/..;/admin"),
            Err(PathError::DotSegmentParameters)
        );
        assert_eq!(
            normalize_path("/a/.;x/b"),
            Err(PathError::DotSegmentParameters)
        );
        assert_eq!(
            normalize_path("/a/%2e%2e;/b"),
            Err(PathError::DotSegmentParameters)
        );
        assert_eq!(
            normalize_path("/a/../../b"),
            Err(PathError::ClimbsAboveRoot)
        );
        assert_eq!(normalize_path("/%2e%2e/x"), Err(PathError::ClimbsAboveRoot));
        assert_eq!(normalize_path("orders"), Err(PathError::NotAbsolute));
        assert_eq!(normalize_path("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize_path("/a%2"), Err(PathError::BadEscape));
        assert_eq!(normalize_path("/a\nb"), Err(PathError::BadCharacter));
        assert_eq!(normalize_path("/a\\..\\b"), Err(PathError::BadCharacter));
        // What an upstream decoding once more would read differently.
        for raw in [
            "/a/%252e%252e/b",
            "/a/%252E/b",
            "/a/.%252e/b",
            "/a/%252e%252E;x/b",
        ] {
            assert!(
                matches!(normalize_path(raw), Err(PathError::DoubleEncoded(_))),
                "{raw}"
            );
        }
        assert_eq!(
            normalize_path("/a%252fb"),
            Err(PathError::DoubleEncoded("%252f".into()))
        );
        assert!(matches!(
            normalize_path("/a%255Cb"),
            Err(PathError::DoubleEncoded(_))
        ));
        for raw in ["/a%00b", "/a%0a", "/a%1F", "/a%7f"] {
            assert!(
                matches!(normalize_path(raw), Err(PathError::EncodedControl(_))),
                "{raw}"
            );
        }
        assert!(matches!(
            normalize_path(&"/a".repeat(5000)),
            Err(PathError::TooLong(_))
        ));
    }

    proptest::proptest! {
        /// The fast path for already-normal paths gives what the full
        /// treatment gives, on paths made of the characters that matter.
        #[test]
        fn the_fast_path_agrees_with_the_full_treatment(
            p in proptest::string::string_regex("/[a-z./%;2eEfF]{0,24}").unwrap()
        ) {
            let fast = normalize_path(&p);
            let slow = normalize_slow(&p);
            proptest::prop_assert_eq!(fast, slow);
        }
    }
}
