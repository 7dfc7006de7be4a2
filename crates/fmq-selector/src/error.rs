//! Selector errors.
//!
//! A selector arrives in a SUBSCRIBE header, so every error is reported back
//! to the client in an ERROR frame. The messages therefore say *what* is wrong
//! and *where* (a 1-based character column), and quote the selector with
//! control characters escaped so the text can never break the header line it
//! ends up in. Long selectors are shortened in the message to keep ERROR
//! frames small.

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How much of the selector text an error message quotes.
const QUOTE_LIMIT: usize = 200;

/// Why a selector was rejected.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The selector is longer than [`MAX_SELECTOR_LEN`](crate::MAX_SELECTOR_LEN)
    /// characters. Checked before lexing so hostile input costs nothing.
    #[error("selector is {len} characters long; the limit is {max}")]
    TooLong {
        /// Length of the rejected selector, in characters.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The selector is not valid selector syntax, or combines operands of
    /// types that can never work together (e.g. `color > 'red'`).
    #[error("{message} at column {column} in selector: {selector}")]
    Syntax {
        /// What is wrong.
        message: String,
        /// 1-based character column where the problem starts.
        column: usize,
        /// The selector text, shortened and with control characters escaped.
        selector: String,
    },
    /// Parentheses, unary operators or sub-expressions nest deeper than
    /// [`MAX_DEPTH`](crate::MAX_DEPTH) levels. The limit keeps parsing and
    /// evaluation recursion bounded whatever a client sends.
    #[error("selector nests deeper than {max} levels at column {column} in selector: {selector}")]
    TooDeep {
        /// The limit.
        max: usize,
        /// 1-based character column where the limit was exceeded.
        column: usize,
        /// The selector text, shortened and with control characters escaped.
        selector: String,
    },
}

impl Error {
    /// The 1-based character column the error points at, if it has one.
    pub fn column(&self) -> Option<usize> {
        match self {
            Error::TooLong { .. } => None,
            Error::Syntax { column, .. } | Error::TooDeep { column, .. } => Some(*column),
        }
    }

    pub(crate) fn syntax(message: impl Into<String>, column: usize, text: &str) -> Error {
        Error::Syntax {
            message: message.into(),
            column,
            selector: quote(text),
        }
    }

    pub(crate) fn too_deep(max: usize, column: usize, text: &str) -> Error {
        Error::TooDeep {
            max,
            column,
            selector: quote(text),
        }
    }
}

/// The selector as quoted in error messages: at most [`QUOTE_LIMIT`]
/// characters, control characters escaped.
fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(QUOTE_LIMIT + 8));
    for (i, c) in text.chars().enumerate() {
        if i == QUOTE_LIMIT {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}
