//! JSON pointers (RFC 6901) to the value a deserializer rejected, so every
//! "invalid input" error can say exactly where the problem is.

/// The pointer to the value `path` leads to (for an unknown field, the path
/// already ends at the field itself).
pub fn pointer_to(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut pointer = String::new();
    let mut push = |key: &str| {
        pointer.push('/');
        pointer.push_str(&key.replace('~', "~0").replace('/', "~1"));
    };
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => push(&index.to_string()),
            Segment::Map { key } => push(key),
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    pointer
}
