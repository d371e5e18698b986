//! Kafka's rule for topic names, checked by the filter at config load and by the sidecar on
//! every request (its clients are not only the filter).

use std::fmt;

/// The longest legal topic name.
pub const MAX_LEN: usize = 249;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    Length,
    Dots,
    Character(char),
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicError::Length => write!(f, "a topic name has 1 to {MAX_LEN} characters"),
            TopicError::Dots => f.write_str("`.` and `..` are not topic names"),
            TopicError::Character(c) => {
                write!(f, "character {c:?} is not allowed (use a-z A-Z 0-9 . _ -)")
            }
        }
    }
}

impl std::error::Error for TopicError {}

/// 1 to 249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn validate(name: &str) -> Result<(), TopicError> {
    if name.is_empty() || name.len() > MAX_LEN {
        return Err(TopicError::Length);
    }
    if name == "." || name == ".." {
        return Err(TopicError::Dots);
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(TopicError::Character(c)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn topic_names() {
        for ok in ["orders", "a.b_c-D9", "...", &"x".repeat(249)] {
            assert_eq!(validate(ok), Ok(()), "{ok}");
        }
        for (bad, want) in [
            ("", TopicError::Length),
            (&"x".repeat(250), TopicError::Length),
            (".", TopicError::Dots),
            ("..", TopicError::Dots),
            ("a b", TopicError::Character(' ')),
            ("a/b", TopicError::Character('/')),
            ("é", TopicError::Character('é')),
        ] {
            assert_eq!(validate(bad), Err(want), "{bad}");
        }
        assert_eq!(
            TopicError::Character(' ').to_string(),
            "character ' ' is not allowed (use a-z A-Z 0-9 . _ -)"
        );
    }
}
