//! The path a task is forwarded to, under `backend.url`'s path prefix.
//!
//! The client's path is normalised as RFC 3986 §5.2.4 (remove_dot_segments)
//! says, with three rules of its own so that the forwarded path can never
//! leave the prefix, whatever the backend (or a proxy in front of it) does
//! with it afterwards:
//! - a `..` that would climb above the root is refused, not clamped;
//! - empty segments (`//`) are collapsed, as nginx's `merge_slashes` does: a
//!   path such as `//evil.example/x` is never forwarded as a
//!   scheme-relative reference;
//! - a dot segment may be percent-encoded (`%2e`, `%2E`, mixed with `.`), and
//!   is a dot segment all the same; an encoded separator (`%2F`, `%5C`), a
//!   raw `\` and a dot segment with parameters (`..;x`, which Tomcat reads
//!   as `..`) are refused, since a backend that decodes or strips them
//!   would climb again.
//!
//! Other segments, their percent-encodings and the query are kept as sent.
//! Pure: [`normalize`] is called when the task's shape is checked (a refusal
//! reserves nothing) and again when it is forwarded; API 3.0 signatures are
//! verified over the path as the client sent it.

use std::borrow::Cow;

/// Why a path is refused (`400 InvalidParameter.InvalidPath`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidPath {
    /// A `..` segment goes above the root.
    AboveRoot,
    /// `%2F`, `%5C` or `\` inside a segment.
    EncodedSeparator,
    /// A dot segment with parameters (`..;x`, `.;x`).
    DotWithParameters,
}

impl InvalidPath {
    pub fn message(self) -> &'static str {
        match self {
            Self::AboveRoot => "the request path climbs above the root with `..`",
            Self::EncodedSeparator => {
                "the request path has an encoded separator (%2F, %5C) or a backslash"
            }
            Self::DotWithParameters => "the request path has a dot segment with parameters",
        }
    }
}

/// The normalised form of `path` (a request's path, without its query):
/// borrowed when it is already normal, which is the common case.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, InvalidPath> {
    if is_plain(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    let body = path.strip_prefix('/').unwrap_or(path);
    let mut segments = body.split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        let (name, params) = match segment.find(';') {
            Some(i) => (&segment[..i], true),
            None => (segment, false),
        };
        match dots(name) {
            Some(_) if params => return Err(InvalidPath::DotWithParameters),
            Some(1) => trailing_slash = last,
            Some(_) => {
                if kept.pop().is_none() {
                    return Err(InvalidPath::AboveRoot);
                }
                trailing_slash = last;
            }
            None if segment.is_empty() => trailing_slash = last,
            None => {
                if has_encoded_separator(segment) {
                    return Err(InvalidPath::EncodedSeparator);
                }
                kept.push(segment);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || kept.is_empty() {
        out.push('/');
    }
    if out == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(out))
    }
}

/// A path with nothing to normalise or check: it starts with `/`, has no
/// `%` or `\`, and no segment that is empty or starts with a dot.
fn is_plain(path: &[u8]) -> bool {
    if path.first() != Some(&b'/') {
        return false;
    }
    let mut after_slash = true;
    for &b in &path[1..] {
        match b {
            b'%' | b'\\' => return false,
            b'/' | b'.' if after_slash => return false,
            _ => {}
        }
        after_slash = b == b'/';
    }
    // A trailing `/` is fine; a path of `/` alone too.
    true
}

/// `Some(1)` for `.`, `Some(2)` for `..`, either possibly percent-encoded
/// (`%2e`, any case); `None` for any other segment.
fn dots(segment: &str) -> Option<u8> {
    let mut b = segment.as_bytes();
    let mut n = 0u8;
    while !b.is_empty() {
        if b[0] == b'.' {
            b = &b[1..];
        } else if b.len() >= 3 && b[0] == b'%' && b[1] == b'2' && b[2].eq_ignore_ascii_case(&b'e') {
            b = &b[3..];
        } else {
            return None;
        }
        n += 1;
        if n > 2 {
            return None;
        }
    }
    (n > 0).then_some(n)
}

fn has_encoded_separator(segment: &str) -> bool {
    let b = segment.as_bytes();
    b.contains(&b'\\')
        || b.windows(3).any(|w| {
            w[0] == b'%'
                && ((w[1] == b'2' && w[2].eq_ignore_ascii_case(&b'f'))
                    || (w[1] == b'5' && w[2].eq_ignore_ascii_case(&b'c')))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        use InvalidPath::*;
        let cases: &[(&str, Result<&str, InvalidPath>)] = &[
            // Already normal: borrowed as is.
            ("/", Ok("/")),
            ("/v1/style-transfer", Ok("/v1/style-transfer")),
            ("/a/b/", Ok("/a/b/")),
            ("/a.b/c..d/e.", Ok("/a.b/c..d/e.")),
            ("/%41/b%20c", Ok("/%41/b%20c")),
            ("/.well-known/x", Ok("/.well-known/x")),
            ("/...", Ok("/...")),
            ("/a;b=c/d", Ok("/a;b=c/d")),
            // RFC 3986 §5.2.4's own examples (rooted).
            ("/a/b/c/./../../g", Ok("/a/g")),
            ("/mid/content=5/../6", Ok("/mid/6")),
            // Dot segments.
            ("/a/./b", Ok("/a/b")),
            ("/a/../b", Ok("/b")),
            ("/a/b/..", Ok("/a/")),
            ("/a/b/.", Ok("/a/b/")),
            ("/a/..", Ok("/")),
            ("/.", Ok("/")),
            ("/./", Ok("/")),
            ("/a/b/../../c", Ok("/c")),
            // Percent-encoded dots, any case, mixed with plain ones.
            ("/a/%2e/b", Ok("/a/b")),
            ("/a/%2E%2e/b", Ok("/b")),
            ("/a/.%2E/b", Ok("/b")),
            ("/a/%2e./b", Ok("/b")),
            ("/a/%2e%2e%2e/b", Ok("/a/%2e%2e%2e/b")),
            // Empty segments collapse.
            ("//evil.example/x", Ok("/evil.example/x")),
            ("/a//b///c", Ok("/a/b/c")),
            ("/a/b//", Ok("/a/b/")),
            ("//", Ok("/")),
            // Climbing above the root.
            ("/..", Err(AboveRoot)),
            ("/../../etc/passwd", Err(AboveRoot)),
            ("/a/../../etc/passwd", Err(AboveRoot)),
            ("/%2e%2e/etc/passwd", Err(AboveRoot)),
            ("/%2E%2E/etc", Err(AboveRoot)),
            ("/.%2e/etc", Err(AboveRoot)),
            ("//../x", Err(AboveRoot)),
            ("/a/./../..", Err(AboveRoot)),
            // Separators a backend could decode or read as one.
            ("/a%2fb", Err(EncodedSeparator)),
            ("/%2e%2e%2fetc%2fpasswd", Err(EncodedSeparator)),
            ("/a%2F..%2F..%2Fb", Err(EncodedSeparator)),
            ("/a%5cb", Err(EncodedSeparator)),
            ("/a\\..\\b", Err(EncodedSeparator)),
            // Dot segments with parameters.
            ("/..;/etc", Err(DotWithParameters)),
            ("/a/.;x/b", Err(DotWithParameters)),
            ("/a/%2e%2e;x/b", Err(DotWithParameters)),
        ];
        for (input, expected) in cases {
            let got = normalize(input);
            assert_eq!(
                got.as_deref().map_err(|e| *e),
                *expected,
                "normalize({input:?})"
            );
            if let Ok(out) = &got {
                // Idempotent, and never a segment that could climb.
                assert_eq!(normalize(out).as_deref().ok(), Some(&**out), "{input:?}");
                assert!(out.starts_with('/') && !out.contains("//"), "{input:?}");
            }
        }
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/v1/style-transfer", "/a/b/", "/a.b", "/a%20b"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    proptest::proptest! {
        /// Whatever the path, a normalised one stays under the root: no
        /// dot segment (plain or encoded), no empty segment.
        #[test]
        fn never_a_dot_segment_after(path in "/[./a%2eEfF;]{0,24}") {
            if let Ok(out) = normalize(&path) {
                proptest::prop_assert!(out.starts_with('/'));
                for segment in out[1..].split('/') {
                    let name = segment.split(';').next().unwrap_or_default();
                    proptest::prop_assert!(dots(name).is_none(), "{} -> {}", path, out);
                }
                proptest::prop_assert!(!out.contains("//"));
            }
        }
    }
}
