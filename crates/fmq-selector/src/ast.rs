//! The parsed form of a selector.
//!
//! The tree is public so that tools (and our property tests) can build,
//! inspect and print selectors. `AND`/`OR` chains are n-ary rather than
//! nested binary nodes: long `a = 1 OR a = 2 OR ...` lists are common in
//! real selectors, and a flat list keeps them from counting against
//! [`MAX_DEPTH`](crate::MAX_DEPTH).
//!
//! [`Display`](std::fmt::Display) prints an expression fully parenthesised,
//! so the output always parses back to a selector that evaluates the same,
//! whatever the precedence rules.

use std::fmt;

use crate::lexer::{is_ident_part, is_ident_start};
use crate::Value;

/// A selector expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A string, numeric or boolean literal.
    Literal(Value),
    /// The `NULL` literal.
    Null,
    /// A message property or header, looked up by name at evaluation time.
    Property(String),
    /// Unary `-` (`negate == true`) or `+`.
    Unary {
        /// `true` for `-`, `false` for `+`.
        negate: bool,
        /// The operand.
        expr: Box<Expr>,
    },
    /// Binary arithmetic.
    Arith(ArithOp, Box<Expr>, Box<Expr>),
    /// Binary comparison.
    Compare(CmpOp, Box<Expr>, Box<Expr>),
    /// Logical `NOT`.
    Not(Box<Expr>),
    /// Logical `AND` of two or more operands.
    And(Vec<Expr>),
    /// Logical `OR` of two or more operands.
    Or(Vec<Expr>),
    /// `expr [NOT] BETWEEN low AND high`.
    Between {
        /// The tested value.
        expr: Box<Expr>,
        /// Inclusive lower bound.
        low: Box<Expr>,
        /// Inclusive upper bound.
        high: Box<Expr>,
        /// `NOT BETWEEN`.
        negated: bool,
    },
    /// `expr [NOT] IN ('a', 'b', ...)`.
    In {
        /// The tested value.
        expr: Box<Expr>,
        /// The string literals of the list.
        list: Vec<String>,
        /// `NOT IN`.
        negated: bool,
    },
    /// `expr [NOT] LIKE 'pattern' [ESCAPE 'c']`.
    Like {
        /// The tested value.
        expr: Box<Expr>,
        /// The compiled pattern.
        pattern: LikePattern,
        /// `NOT LIKE`.
        negated: bool,
    },
    /// `expr IS [NOT] NULL`.
    IsNull {
        /// The tested value.
        expr: Box<Expr>,
        /// `IS NOT NULL`.
        negated: bool,
    },
}

/// Arithmetic operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArithOp {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/` (integer division when both operands are integers, as in Java)
    Div,
    /// `%` (remainder; not in the JMS grammar, accepted because
    /// existing selectors use it)
    Rem,
}

impl ArithOp {
    /// The operator as written in a selector.
    pub fn symbol(self) -> &'static str {
        match self {
            ArithOp::Add => "+",
            ArithOp::Sub => "-",
            ArithOp::Mul => "*",
            ArithOp::Div => "/",
            ArithOp::Rem => "%",
        }
    }
}

/// Comparison operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `=`
    Eq,
    /// `<>`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl CmpOp {
    /// The operator as written in a selector.
    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "<>",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }

    /// Whether this is `=` or `<>`, the only comparisons JMS defines for
    /// strings and booleans.
    pub fn is_equality(self) -> bool {
        matches!(self, CmpOp::Eq | CmpOp::Ne)
    }
}

/// One element of a compiled `LIKE` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PatElem {
    /// A character that must match exactly.
    Char(char),
    /// `_`: exactly one character.
    One,
    /// `%`: any run of characters, including none.
    Any,
}

/// A `LIKE` pattern, compiled once at parse time.
///
/// Patterns are matched by a small wildcard matcher of our own rather than by
/// translating them into regular expressions: every character other than `%`
/// and `_` is literal, so `'a.b%'` has no way to be misread as a regex, and
/// matching is `O(pattern × value)` with no pathological cases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LikePattern {
    source: String,
    escape: Option<char>,
    pub(crate) elems: Vec<PatElem>,
}

impl LikePattern {
    /// Compiles `pattern`. With an `escape` character, that character makes
    /// the following one literal (usually `%`, `_` or the escape itself).
    ///
    /// Fails when the pattern ends with an unfollowed escape character.
    pub fn new(pattern: &str, escape: Option<char>) -> Result<LikePattern, &'static str> {
        let mut elems: Vec<PatElem> = Vec::with_capacity(pattern.len());
        let mut chars = pattern.chars();
        while let Some(c) = chars.next() {
            let elem = if Some(c) == escape {
                match chars.next() {
                    Some(lit) => PatElem::Char(lit),
                    None => return Err("LIKE pattern ends with its escape character"),
                }
            } else {
                match c {
                    '%' => PatElem::Any,
                    '_' => PatElem::One,
                    c => PatElem::Char(c),
                }
            };
            // `%%` matches exactly what `%` matches; collapsing keeps the
            // matcher's backtracking short.
            if !(elem == PatElem::Any && elems.last() == Some(&PatElem::Any)) {
                elems.push(elem);
            }
        }
        Ok(LikePattern {
            source: pattern.to_owned(),
            escape,
            elems,
        })
    }

    /// The pattern as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The `ESCAPE` character, if any.
    pub fn escape(&self) -> Option<char> {
        self.escape
    }
}

/// Writes `s` as a selector string literal.
fn write_str_literal(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_str("'")?;
    f.write_str(&s.replace('\'', "''"))?;
    f.write_str("'")
}

/// Whether `name` would lex back as this identifier.
fn is_plain_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(is_ident_start) && chars.all(is_ident_part)
}

impl fmt::Display for Expr {
    /// Prints the expression fully parenthesised.
    ///
    /// Non-finite floats and property names that are not identifiers cannot
    /// be produced by the parser; they print as text that does not parse.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Literal(Value::Str(s)) => write_str_literal(f, s),
            Expr::Literal(Value::Int(v)) if *v < 0 => write!(f, "({v})"),
            Expr::Literal(Value::Int(v)) => write!(f, "{v}"),
            Expr::Literal(Value::Float(v)) if v.is_sign_negative() => write!(f, "({v:?})"),
            Expr::Literal(Value::Float(v)) => write!(f, "{v:?}"),
            Expr::Literal(Value::Bool(true)) => f.write_str("TRUE"),
            Expr::Literal(Value::Bool(false)) => f.write_str("FALSE"),
            Expr::Null => f.write_str("NULL"),
            Expr::Property(name) => {
                if is_plain_identifier(name) {
                    f.write_str(name)
                } else {
                    write!(f, "<invalid identifier {name:?}>")
                }
            }
            Expr::Unary { negate, expr } => {
                write!(f, "({}{expr})", if *negate { "-" } else { "+" })
            }
            Expr::Arith(op, l, r) => write!(f, "({l} {} {r})", op.symbol()),
            Expr::Compare(op, l, r) => write!(f, "({l} {} {r})", op.symbol()),
            Expr::Not(e) => write!(f, "(NOT {e})"),
            Expr::And(items) | Expr::Or(items) => {
                let sep = if matches!(self, Expr::And(_)) {
                    " AND "
                } else {
                    " OR "
                };
                f.write_str("(")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(sep)?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str(")")
            }
            Expr::Between {
                expr,
                low,
                high,
                negated,
            } => {
                let not = if *negated { "NOT " } else { "" };
                write!(f, "({expr} {not}BETWEEN {low} AND {high})")
            }
            Expr::In {
                expr,
                list,
                negated,
            } => {
                let not = if *negated { "NOT " } else { "" };
                write!(f, "({expr} {not}IN (")?;
                for (i, item) in list.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write_str_literal(f, item)?;
                }
                f.write_str("))")
            }
            Expr::Like {
                expr,
                pattern,
                negated,
            } => {
                let not = if *negated { "NOT " } else { "" };
                write!(f, "({expr} {not}LIKE ")?;
                write_str_literal(f, pattern.source())?;
                if let Some(c) = pattern.escape() {
                    f.write_str(" ESCAPE ")?;
                    write_str_literal(f, c.encode_utf8(&mut [0; 4]))?;
                }
                f.write_str(")")
            }
            Expr::IsNull { expr, negated } => {
                let not = if *negated { "NOT " } else { "" };
                write!(f, "({expr} IS {not}NULL)")
            }
        }
    }
}
