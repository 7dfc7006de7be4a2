//! Evaluation of a parsed selector against one message.
//!
//! Values follow SQL's three-valued logic: a sub-expression is a value or
//! *UNKNOWN*, represented as `None` (a missing property, `NULL`, a type
//! mismatch, division by zero and arithmetic on non-numbers are all
//! UNKNOWN). Only a final TRUE selects a message.
//!
//! Nothing here panics: integer arithmetic is checked and falls back to
//! floating point on overflow, and division or remainder by zero is UNKNOWN.

use std::borrow::Cow;
use std::cmp::Ordering;

use crate::ast::{ArithOp, CmpOp, Expr, LikePattern, PatElem};
use crate::{Properties, Value};

/// A number after coercion.
#[derive(Debug, Clone, Copy)]
enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }

    fn into_value(self) -> Option<Value> {
        match self {
            Num::Int(i) => Some(Value::Int(i)),
            // NaN (e.g. inf - inf) has no place in three-valued logic.
            Num::Float(f) if f.is_nan() => None,
            Num::Float(f) => Some(Value::Float(f)),
        }
    }
}

/// STOMP coercion of a string to a number: an `i64` if it parses as one,
/// else an `f64` if it is written as a decimal number. Spellings such as
/// `inf` or `NaN`, which Rust's float parser would accept, are not numbers in
/// a selector.
fn str_to_num(s: &str) -> Option<Num> {
    if let Ok(i) = s.parse::<i64>() {
        return Some(Num::Int(i));
    }
    let numeric_chars = s
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'));
    if !numeric_chars || !s.chars().any(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite())
        .map(Num::Float)
}

/// STOMP coercion of a string to a boolean: `true`/`false`, any case.
fn str_to_bool(s: &str) -> Option<bool> {
    if s.eq_ignore_ascii_case("true") {
        Some(true)
    } else if s.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

fn to_num(v: &Value) -> Option<Num> {
    match v {
        Value::Int(i) => Some(Num::Int(*i)),
        Value::Float(f) => Some(Num::Float(*f)),
        Value::Str(s) => str_to_num(s),
        Value::Bool(_) => None,
    }
}

/// A value in a boolean context (operand of NOT/AND/OR, or the whole
/// selector).
pub(crate) fn to_bool(v: Option<&Value>) -> Option<bool> {
    match v? {
        Value::Bool(b) => Some(*b),
        Value::Str(s) => str_to_bool(s),
        Value::Int(_) | Value::Float(_) => None,
    }
}

/// Evaluates `expr`; `None` is NULL/UNKNOWN.
pub(crate) fn eval<'e>(expr: &'e Expr, props: &dyn Properties) -> Option<Cow<'e, Value>> {
    match expr {
        Expr::Literal(v) => Some(Cow::Borrowed(v)),
        Expr::Null => None,
        Expr::Property(name) => props.get(name).map(Cow::Owned),
        Expr::Unary { negate, expr } => {
            let n = to_num(eval(expr, props)?.as_ref())?;
            let result = match (negate, n) {
                (false, n) => n,
                (true, Num::Int(i)) => i.checked_neg().map_or(Num::Float(-(i as f64)), Num::Int),
                (true, Num::Float(f)) => Num::Float(-f),
            };
            result.into_value().map(Cow::Owned)
        }
        Expr::Arith(op, l, r) => {
            let l = to_num(eval(l, props)?.as_ref())?;
            let r = to_num(eval(r, props)?.as_ref())?;
            arith(*op, l, r)?.into_value().map(Cow::Owned)
        }
        _ => eval_bool(expr, props).map(|b| Cow::Owned(Value::Bool(b))),
    }
}

/// Evaluates `expr` in a boolean context.
pub(crate) fn eval_bool(expr: &Expr, props: &dyn Properties) -> Option<bool> {
    match expr {
        Expr::Not(e) => eval_bool(e, props).map(|b| !b),
        Expr::And(items) => {
            let mut unknown = false;
            for item in items {
                match eval_bool(item, props) {
                    Some(false) => return Some(false),
                    Some(true) => {}
                    None => unknown = true,
                }
            }
            if unknown {
                None
            } else {
                Some(true)
            }
        }
        Expr::Or(items) => {
            let mut unknown = false;
            for item in items {
                match eval_bool(item, props) {
                    Some(true) => return Some(true),
                    Some(false) => {}
                    None => unknown = true,
                }
            }
            if unknown {
                None
            } else {
                Some(false)
            }
        }
        Expr::Compare(op, l, r) => {
            let l = eval(l, props)?;
            let r = eval(r, props)?;
            compare(*op, &l, &r)
        }
        Expr::Between {
            expr,
            low,
            high,
            negated,
        } => {
            // Evaluated as `low <= expr AND expr <= high` in three-valued
            // logic, so one known-false bound decides even if the other
            // bound is NULL.
            let v = eval(expr, props);
            let low = eval(low, props);
            let high = eval(high, props);
            let ge = match (&v, &low) {
                (Some(v), Some(low)) => compare(CmpOp::Ge, v, low),
                _ => None,
            };
            let le = match (&v, &high) {
                (Some(v), Some(high)) => compare(CmpOp::Le, v, high),
                _ => None,
            };
            let within = match (ge, le) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            };
            within.map(|b| b != *negated)
        }
        Expr::In {
            expr,
            list,
            negated,
        } => match eval(expr, props)?.as_ref() {
            Value::Str(s) => Some(list.iter().any(|item| item == s) != *negated),
            _ => None,
        },
        Expr::Like {
            expr,
            pattern,
            negated,
        } => match eval(expr, props)?.as_ref() {
            Value::Str(s) => Some(like(pattern, s) != *negated),
            _ => None,
        },
        Expr::IsNull { expr, negated } => Some(eval(expr, props).is_none() != *negated),
        Expr::Literal(_)
        | Expr::Null
        | Expr::Property(_)
        | Expr::Unary { .. }
        | Expr::Arith(..) => to_bool(eval(expr, props).as_deref()),
    }
}

fn arith(op: ArithOp, l: Num, r: Num) -> Option<Num> {
    if let (Num::Int(a), Num::Int(b)) = (l, r) {
        let exact = match op {
            ArithOp::Add => a.checked_add(b),
            ArithOp::Sub => a.checked_sub(b),
            ArithOp::Mul => a.checked_mul(b),
            ArithOp::Div | ArithOp::Rem if b == 0 => return None,
            ArithOp::Div => a.checked_div(b),
            ArithOp::Rem => a.checked_rem(b),
        };
        if let Some(v) = exact {
            return Some(Num::Int(v));
        }
        // Overflow: fall through to floating point rather than wrap.
    }
    let (a, b) = (l.as_f64(), r.as_f64());
    let v = match op {
        ArithOp::Add => a + b,
        ArithOp::Sub => a - b,
        ArithOp::Mul => a * b,
        ArithOp::Div | ArithOp::Rem if b == 0.0 => return None,
        ArithOp::Div => a / b,
        ArithOp::Rem => a % b,
    };
    Some(Num::Float(v))
}

fn ordering_matches(op: CmpOp, ord: Ordering) -> bool {
    match op {
        CmpOp::Eq => ord == Ordering::Equal,
        CmpOp::Ne => ord != Ordering::Equal,
        CmpOp::Lt => ord == Ordering::Less,
        CmpOp::Le => ord != Ordering::Greater,
        CmpOp::Gt => ord == Ordering::Greater,
        CmpOp::Ge => ord != Ordering::Less,
    }
}

fn compare_nums(op: CmpOp, l: Num, r: Num) -> Option<bool> {
    let ord = match (l, r) {
        (Num::Int(a), Num::Int(b)) => a.cmp(&b),
        (Num::Int(a), Num::Float(b)) => cmp_int_float(a, b)?,
        (Num::Float(a), Num::Int(b)) => cmp_int_float(b, a)?.reverse(),
        // NaN compares as UNKNOWN.
        (Num::Float(a), Num::Float(b)) => a.partial_cmp(&b)?,
    };
    Some(ordering_matches(op, ord))
}

/// Compares an integer with a float exactly. Plain widening to `f64` would
/// round large integers, making `i64::MAX` equal to `9223372036854775808.0`
/// (which is what overflowing `i64::MAX + 1` produces).
fn cmp_int_float(i: i64, f: f64) -> Option<Ordering> {
    /// 2^63, the first float above every i64.
    const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
    if f.is_nan() {
        return None;
    }
    if f >= TWO_POW_63 {
        return Some(Ordering::Less);
    }
    if f < -TWO_POW_63 {
        return Some(Ordering::Greater);
    }
    // In range, so the truncated value converts to i64 exactly.
    let whole = f.trunc();
    match i.cmp(&(whole as i64)) {
        Ordering::Equal => 0.0_f64.partial_cmp(&(f - whole)),
        unequal => Some(unequal),
    }
}

fn equality(op: CmpOp, equal: bool) -> Option<bool> {
    match op {
        CmpOp::Eq => Some(equal),
        CmpOp::Ne => Some(!equal),
        // Strings and booleans have no order in JMS.
        _ => None,
    }
}

/// Compares two non-NULL values under the JMS type rules plus FerroMQ's
/// STOMP coercions.
fn compare(op: CmpOp, l: &Value, r: &Value) -> Option<bool> {
    use Value::{Bool, Float, Int, Str};
    match (l, r) {
        (Int(_) | Float(_), Int(_) | Float(_)) => compare_nums(op, to_num(l)?, to_num(r)?),
        // STOMP coercion: a string against a number is read as a number.
        (Str(_), Int(_) | Float(_)) | (Int(_) | Float(_), Str(_)) => {
            compare_nums(op, to_num(l)?, to_num(r)?)
        }
        (Str(a), Str(b)) => equality(op, a == b),
        (Bool(a), Bool(b)) => equality(op, a == b),
        // STOMP coercion: "true"/"false" against a boolean.
        (Str(s), Bool(b)) | (Bool(b), Str(s)) => equality(op, str_to_bool(s)? == *b),
        (Bool(_), Int(_) | Float(_)) | (Int(_) | Float(_), Bool(_)) => None,
    }
}

/// Matches `value` against a compiled LIKE pattern.
///
/// The classic greedy wildcard algorithm: walk both strings, and on a
/// mismatch retry from the most recent `%`, letting it swallow one more
/// character. Only the latest `%` ever needs revisiting, so the worst case
/// is `O(pattern × value)` with no recursion.
fn like(pattern: &LikePattern, value: &str) -> bool {
    let pat = &pattern.elems;
    // The character starting at byte offset `at`, if any. Offsets only ever
    // advance by whole characters, so they stay on boundaries.
    let char_at = |at: usize| value.get(at..).and_then(|rest| rest.chars().next());
    let (mut p, mut t) = (0usize, 0usize);
    // (pattern index after the last `%`, byte offset it is retried from)
    let mut backtrack: Option<(usize, usize)> = None;
    while let Some(c) = char_at(t) {
        match pat.get(p) {
            Some(PatElem::Any) => {
                backtrack = Some((p + 1, t));
                p += 1;
                continue;
            }
            Some(PatElem::One) => {
                p += 1;
                t += c.len_utf8();
                continue;
            }
            Some(PatElem::Char(expected)) if *expected == c => {
                p += 1;
                t += c.len_utf8();
                continue;
            }
            _ => {}
        }
        match backtrack {
            Some((bp, bt)) => {
                // Let the `%` swallow one more character and retry.
                let next = bt + char_at(bt).map_or(1, char::len_utf8);
                p = bp;
                t = next;
                backtrack = Some((bp, next));
            }
            None => return false,
        }
    }
    pat.get(p..)
        .is_some_and(|rest| rest.iter().all(|e| *e == PatElem::Any))
}
