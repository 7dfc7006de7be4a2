//! JMS message selectors for FerroMQ.
//!
//! A STOMP client may put a `selector` header on SUBSCRIBE; the broker then
//! delivers only the messages whose headers satisfy it. The language is the
//! SQL-92 conditional-expression subset of the JMS specification (JMS 1.1/2.0
//! §3.8.1, "Message Selectors"), as ActiveMQ accepts it for STOMP:
//!
//! ```
//! use std::collections::HashMap;
//! use fmq_selector::{Selector, Value};
//!
//! let selector: Selector = "color IN ('red', 'blue') AND price * 2 > 10".parse()?;
//! let mut headers = HashMap::new();
//! headers.insert("color".to_owned(), Value::Str("red".into()));
//! headers.insert("price".to_owned(), Value::Str("7".into())); // STOMP: all strings
//! assert!(selector.matches(&headers));
//! # Ok::<(), fmq_selector::Error>(())
//! ```
//!
//! # Language
//!
//! * Literals: strings `'it''s'` (a doubled quote escapes a quote), exact
//!   numerics `42`, `42L`, `0x2A` (leading zeros are decimal, not octal),
//!   approximate numerics `1.5`, `7.`, `.5`, `1e3`, and `TRUE`/`FALSE`/`NULL`.
//!   An exact numeric too large for `i64` becomes approximate.
//! * Identifiers follow Java's rules (a letter, `_` or `$`, then also
//!   digits) and are case-sensitive. The keywords `NULL TRUE FALSE NOT AND OR
//!   BETWEEN LIKE IN IS ESCAPE` are case-insensitive and never identifiers.
//! * Operators, tightest first: unary `+ -`; `* / %`; `+ -`; comparisons
//!   `= <> < <= > >=`, `[NOT] BETWEEN a AND b`, `[NOT] IN ('a', ...)`,
//!   `[NOT] LIKE 'pattern' [ESCAPE 'c']` (`%` any run, `_` one character,
//!   everything else literal), `IS [NOT] NULL`; `NOT`; `AND`; `OR`.
//!   `%` (remainder) is an ActiveMQ extension. Comments are not supported.
//! * An empty (or all-whitespace) selector selects every message, as JMS
//!   defines for an empty selector string.
//!
//! # Evaluation
//!
//! Three-valued logic: a missing property is NULL, and comparisons,
//! arithmetic, `IN`, `LIKE` and `BETWEEN` involving NULL are UNKNOWN. `NOT
//! UNKNOWN` is UNKNOWN, `FALSE AND UNKNOWN` is FALSE, `TRUE OR UNKNOWN` is
//! TRUE. A message is selected only when the selector is TRUE.
//!
//! JMS type rules: numbers compare with numbers (an integer and a float
//! compare by exact value, so no rounding makes unequal numbers equal;
//! mixed arithmetic is done in floating point); strings and booleans support only `=` and
//! `<>`; comparing values of unrelated types is UNKNOWN; `IN` and `LIKE` need
//! a string and are UNKNOWN for any other value. Integer arithmetic never
//! wraps: on overflow it is redone in floating point. Integer division
//! truncates as in Java. Division or remainder by zero is UNKNOWN.
//!
//! The parser rejects what can be seen to be wrong without a message:
//! strings or booleans with `<`, `+` and friends, `x = NULL` (always
//! UNKNOWN — use `IS NULL`), non-string `IN` lists, and non-boolean selectors.
//!
//! # STOMP coercion
//!
//! Every STOMP header is a string, so `price > 5` would never match a
//! message sent with `price:7` under strict JMS typing. FerroMQ therefore
//! applies two coercions (ActiveMQ behaves much the same for properties it
//! converts from STOMP headers):
//!
//! * A [`Value::Str`] compared with, or used in arithmetic with, a number is
//!   read as an `i64` if it parses as one, else as an `f64` if it is written
//!   as a decimal number (`1.5`, `-2e3`; not `inf` or `NaN`). If it is not a
//!   number the comparison or arithmetic is UNKNOWN. Two strings still
//!   compare as strings: `'7' = '7.0'` is FALSE.
//! * A [`Value::Str`] equal to `true` or `false` in any case compares equal
//!   to the boolean `TRUE`/`FALSE`, and counts as that boolean where a
//!   boolean is needed (`NOT flag`, `flag AND x`, or a selector that is just
//!   `flag`).
//!
//! # Limits
//!
//! Selectors come from clients, so their cost is bounded: at most
//! [`MAX_SELECTOR_LEN`] characters, and parentheses, unary operators and
//! sub-expressions nested at most [`MAX_DEPTH`] deep. Neither parsing nor
//! evaluation can overflow the stack or panic.
#![warn(missing_docs)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod ast;
mod error;
mod eval;
mod lexer;
mod parser;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::BuildHasher;
use std::str::FromStr;

pub use error::{Error, Result};

/// Longest selector accepted, in characters.
pub const MAX_SELECTOR_LEN: usize = 4096;

/// Deepest nesting accepted: of parentheses, unary `+`/`-`/`NOT`, and of
/// the expression tree itself (an `AND`/`OR` chain counts as one level).
pub const MAX_DEPTH: usize = 64;

/// A property or header value, as a message carries it or a literal spells it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A string. Every STOMP header arrives as one; see the crate docs for
    /// how strings are coerced to numbers and booleans.
    Str(String),
    /// An exact numeric.
    Int(i64),
    /// An approximate numeric.
    Float(f64),
    /// A boolean.
    Bool(bool),
}

/// Where the selector reads message properties and header fields.
pub trait Properties {
    /// The value of property or header `name` (e.g. "color", "JMSPriority"),
    /// or None if absent (NULL).
    fn get(&self, name: &str) -> Option<Value>;
}

impl<S: BuildHasher> Properties for HashMap<String, Value, S> {
    fn get(&self, name: &str) -> Option<Value> {
        HashMap::get(self, name).cloned()
    }
}

impl Properties for BTreeMap<String, Value> {
    fn get(&self, name: &str) -> Option<Value> {
        BTreeMap::get(self, name).cloned()
    }
}

impl<P: Properties + ?Sized> Properties for &P {
    fn get(&self, name: &str) -> Option<Value> {
        (**self).get(name)
    }
}

/// A parsed selector, ready to test messages against.
#[derive(Debug, Clone)]
pub struct Selector {
    text: String,
    expr: Expr,
}

use ast::Expr;

impl Selector {
    /// Parses `text`.
    ///
    /// Errors say what is wrong and where, e.g. `unexpected token 'AND' at
    /// column 12 in selector: ...`.
    pub fn parse(text: &str) -> Result<Selector> {
        let len = text.chars().count();
        if len > MAX_SELECTOR_LEN {
            return Err(Error::TooLong {
                len,
                max: MAX_SELECTOR_LEN,
            });
        }
        let expr = if text.trim().is_empty() {
            Expr::Literal(Value::Bool(true))
        } else {
            parser::parse(text)?
        };
        Ok(Selector {
            text: text.to_owned(),
            expr,
        })
    }

    /// Whether a message with these properties is selected: TRUE selects,
    /// FALSE and UNKNOWN do not.
    pub fn matches(&self, props: &dyn Properties) -> bool {
        eval::eval_bool(&self.expr, props) == Some(true)
    }

    /// The selector text as given to [`Selector::parse`].
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parsed expression.
    pub fn expr(&self) -> &Expr {
        &self.expr
    }
}

impl Expr {
    /// Evaluates this expression for a message; `None` is NULL/UNKNOWN.
    ///
    /// Boolean sub-expressions yield [`Value::Bool`]. Expressions that
    /// [`Selector::parse`] would reject (say, `1 AND 'a'`) still evaluate,
    /// to UNKNOWN where the types do not fit.
    pub fn evaluate(&self, props: &dyn Properties) -> Option<Value> {
        eval::eval(self, props).map(std::borrow::Cow::into_owned)
    }

    /// Evaluates this expression as a selector would: `Some(true)` selects.
    /// A string `true`/`false` counts as a boolean (STOMP coercion).
    pub fn evaluate_bool(&self, props: &dyn Properties) -> Option<bool> {
        eval::eval_bool(self, props)
    }
}

impl FromStr for Selector {
    type Err = Error;

    fn from_str(s: &str) -> Result<Selector> {
        Selector::parse(s)
    }
}

impl fmt::Display for Selector {
    /// The selector text as given.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}
