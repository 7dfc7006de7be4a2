//! Property tests: the parser never panics, and printing any well-typed
//! expression tree and parsing it back gives a selector that evaluates the
//! same on any message.
#![allow(clippy::unwrap_used)] // tests may panic on the unexpected

use std::collections::HashMap;

use fmq_selector::ast::{ArithOp, CmpOp, Expr, LikePattern};
use fmq_selector::{Selector, Value};
use proptest::prelude::*;

const NAMES: [&str; 5] = ["a", "b", "c", "JMSType", "$x"];

fn name() -> impl Strategy<Value = String> {
    proptest::sample::select(&NAMES[..]).prop_map(str::to_owned)
}

fn prop(name: impl Strategy<Value = String>) -> impl Strategy<Value = Expr> {
    name.prop_map(Expr::Property)
}

/// Short strings from an alphabet rich in characters with meaning somewhere:
/// quotes, LIKE wildcards, regex metacharacters, digits.
fn small_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ab%_.!'\\\\*0-9]{0,5}",
        proptest::sample::select(&["7", "-3", "2.5", "1e3", "true", "FALSE", "abc", ""][..])
            .prop_map(str::to_owned),
    ]
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        proptest::num::f64::NORMAL | proptest::num::f64::ZERO | proptest::num::f64::SUBNORMAL,
        (-100i32..100).prop_map(|i| f64::from(i) / 4.0),
    ]
}

fn int() -> impl Strategy<Value = i64> {
    prop_oneof![-20i64..20, any::<i64>(), Just(i64::MIN), Just(i64::MAX),]
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        small_string().prop_map(Value::Str),
        int().prop_map(Value::Int),
        float().prop_map(Value::Float),
        any::<bool>().prop_map(Value::Bool),
    ]
}

/// A message: each name absent or holding a random value.
fn message() -> impl Strategy<Value = HashMap<String, Value>> {
    proptest::collection::vec(proptest::option::of(value()), NAMES.len()).prop_map(|values| {
        NAMES
            .iter()
            .zip(values)
            .filter_map(|(n, v)| Some(((*n).to_owned(), v?)))
            .collect()
    })
}

fn boxed(e: Expr) -> Box<Expr> {
    Box::new(e)
}

fn num_expr() -> impl Strategy<Value = Expr> {
    let leaf = prop_oneof![
        int().prop_map(|i| Expr::Literal(Value::Int(i))),
        float().prop_map(|f| Expr::Literal(Value::Float(f))),
        prop(name()),
    ];
    leaf.prop_recursive(3, 12, 2, |inner| {
        prop_oneof![
            (any::<bool>(), inner.clone()).prop_map(|(negate, e)| Expr::Unary {
                negate,
                expr: boxed(e)
            }),
            (
                proptest::sample::select(
                    &[
                        ArithOp::Add,
                        ArithOp::Sub,
                        ArithOp::Mul,
                        ArithOp::Div,
                        ArithOp::Rem
                    ][..]
                ),
                inner.clone(),
                inner
            )
                .prop_map(|(op, l, r)| Expr::Arith(op, boxed(l), boxed(r))),
        ]
    })
}

fn str_expr() -> impl Strategy<Value = Expr> {
    prop_oneof![
        small_string().prop_map(|s| Expr::Literal(Value::Str(s))),
        prop(name()),
    ]
}

fn like_pattern() -> impl Strategy<Value = LikePattern> {
    (
        "[ab%_.!'*]{0,6}",
        proptest::option::of(proptest::sample::select(&['!', '%', '\'', '\\'][..])),
    )
        .prop_filter_map("pattern ends with its escape", |(p, e)| {
            LikePattern::new(&p, e).ok()
        })
}

/// Comparisons and predicates whose operands are not boolean expressions.
fn predicate() -> impl Strategy<Value = Expr> {
    let ordering = proptest::sample::select(
        &[
            CmpOp::Eq,
            CmpOp::Ne,
            CmpOp::Lt,
            CmpOp::Le,
            CmpOp::Gt,
            CmpOp::Ge,
        ][..],
    );
    let equality = proptest::sample::select(&[CmpOp::Eq, CmpOp::Ne][..]);
    let scalar = prop_oneof![
        num_expr(),
        str_expr(),
        any::<bool>().prop_map(|b| Expr::Literal(Value::Bool(b))),
    ];
    prop_oneof![
        (ordering, num_expr(), num_expr()).prop_map(|(op, l, r)| Expr::Compare(
            op,
            boxed(l),
            boxed(r)
        )),
        (equality, scalar.clone(), scalar.clone()).prop_map(|(op, l, r)| Expr::Compare(
            op,
            boxed(l),
            boxed(r)
        )),
        (num_expr(), num_expr(), num_expr(), any::<bool>()).prop_map(|(e, lo, hi, negated)| {
            Expr::Between {
                expr: boxed(e),
                low: boxed(lo),
                high: boxed(hi),
                negated,
            }
        }),
        (
            str_expr(),
            proptest::collection::vec(small_string(), 1..4),
            any::<bool>()
        )
            .prop_map(|(e, list, negated)| Expr::In {
                expr: boxed(e),
                list,
                negated
            }),
        (str_expr(), like_pattern(), any::<bool>()).prop_map(|(e, pattern, negated)| {
            Expr::Like {
                expr: boxed(e),
                pattern,
                negated,
            }
        }),
        (prop_oneof![scalar, Just(Expr::Null)], any::<bool>()).prop_map(|(e, negated)| {
            Expr::IsNull {
                expr: boxed(e),
                negated,
            }
        }),
    ]
}

/// A well-typed boolean expression, i.e. one `Selector::parse` must accept
/// once printed.
fn bool_expr() -> impl Strategy<Value = Expr> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(|b| Expr::Literal(Value::Bool(b))),
        prop(name()),
        predicate(),
    ];
    leaf.prop_recursive(4, 24, 3, |inner| {
        prop_oneof![
            inner.clone().prop_map(|e| Expr::Not(boxed(e))),
            proptest::collection::vec(inner.clone(), 2..4).prop_map(Expr::And),
            proptest::collection::vec(inner.clone(), 2..4).prop_map(Expr::Or),
            (
                proptest::sample::select(&[CmpOp::Eq, CmpOp::Ne][..]),
                inner.clone(),
                inner.clone()
            )
                .prop_map(|(op, l, r)| Expr::Compare(op, boxed(l), boxed(r))),
            (inner, any::<bool>()).prop_map(|(e, negated)| Expr::IsNull {
                expr: boxed(e),
                negated
            }),
        ]
    })
}

/// Fragments that make random input look enough like a selector to reach
/// deep into the parser.
fn selectorish() -> impl Strategy<Value = String> {
    let fragment = proptest::sample::select(
        &[
            "a",
            "b",
            " ",
            "(",
            ")",
            "'",
            "''",
            "'x'",
            "=",
            "<>",
            "<",
            ">=",
            "+",
            "-",
            "*",
            "/",
            "%",
            ",",
            "1",
            "2.5",
            "1e",
            ".5",
            "0x",
            "7L",
            "NOT ",
            " AND ",
            " OR ",
            " BETWEEN ",
            " LIKE ",
            " ESCAPE ",
            " IN ",
            " IS ",
            " NULL",
            "TRUE",
            "é",
            "\n",
        ][..],
    );
    proptest::collection::vec(fragment, 0..30).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics_on_arbitrary_strings(text in any::<String>(), msg in message()) {
        if let Ok(sel) = Selector::parse(&text) {
            let _ = sel.matches(&msg);
        }
    }

    #[test]
    fn parse_never_panics_on_selectorish_strings(text in selectorish(), msg in message()) {
        match Selector::parse(&text) {
            Ok(sel) => {
                let _ = sel.matches(&msg);
                // Whatever parses must survive a print/parse round trip.
                let printed = sel.expr().to_string();
                let again = Selector::parse(&printed);
                prop_assert!(again.is_ok(), "{text:?} printed as {printed:?}: {again:?}");
                if let Ok(again) = again {
                    prop_assert_eq!(
                        again.expr().evaluate_bool(&msg),
                        sel.expr().evaluate_bool(&msg)
                    );
                }
            }
            Err(e) => {
                // Every error except the length limit points inside the text.
                if let Some(column) = e.column() {
                    prop_assert!(column >= 1 && column <= text.chars().count() + 1, "{e}");
                }
            }
        }
    }

    #[test]
    fn printed_expressions_round_trip(
        expr in bool_expr(),
        msgs in proptest::collection::vec(message(), 1..6),
    ) {
        let printed = expr.to_string();
        let parsed = Selector::parse(&printed);
        prop_assert!(parsed.is_ok(), "{printed:?}: {:?}", parsed.err());
        let Ok(parsed) = parsed else { unreachable!() };
        for msg in &msgs {
            prop_assert_eq!(
                parsed.expr().evaluate_bool(msg),
                expr.evaluate_bool(msg),
                "{} on {:?}", printed, msg
            );
            prop_assert_eq!(parsed.expr().evaluate(msg), expr.evaluate(msg));
            prop_assert_eq!(parsed.matches(msg), expr.evaluate_bool(msg) == Some(true));
        }
    }

    #[test]
    fn printed_arithmetic_round_trips(expr in num_expr(), msg in message()) {
        let printed = expr.to_string();
        let parsed = Selector::parse(&format!("{printed} IS NULL"));
        prop_assert!(parsed.is_ok(), "{printed:?}: {:?}", parsed.err());
        let Ok(parsed) = parsed else { unreachable!() };
        let Expr::IsNull { expr: inner, .. } = parsed.expr() else { unreachable!() };
        prop_assert_eq!(inner.evaluate(&msg), expr.evaluate(&msg), "{}", printed);
    }
}

/// Reference LIKE semantics by dynamic programming over (pattern, value)
/// prefixes, written independently of the crate's greedy matcher.
fn like_reference(pattern: &[char], escape: Option<char>, value: &[char]) -> bool {
    // Tokenise: (is_any, is_one, literal).
    let mut elems = Vec::new();
    let mut i = 0;
    while i < pattern.len() {
        let c = pattern[i];
        if Some(c) == escape {
            elems.push((false, false, pattern[i + 1]));
            i += 2;
            continue;
        }
        elems.push((c == '%', c == '_', c));
        i += 1;
    }
    // dp[j] = elems[..k] matches value[..j]
    let mut dp = vec![false; value.len() + 1];
    dp[0] = true;
    for &(any, one, lit) in &elems {
        let mut next = vec![false; value.len() + 1];
        for j in 0..=value.len() {
            next[j] = if any {
                dp[j] || (j > 0 && next[j - 1])
            } else {
                j > 0 && dp[j - 1] && (one || value[j - 1] == lit)
            };
        }
        dp = next;
    }
    dp[value.len()]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5000, ..ProptestConfig::default() })]

    #[test]
    fn like_agrees_with_reference(
        pattern in "[ab%_!é]{0,8}",
        escape in proptest::option::of(proptest::sample::select(&['!', '%', '_'][..])),
        value in "[ab%_!é]{0,10}",
    ) {
        let Ok(compiled) = LikePattern::new(&pattern, escape) else {
            return Ok(());
        };
        let expr = Expr::Like {
            expr: Box::new(Expr::Literal(Value::Str(value.clone()))),
            pattern: compiled,
            negated: false,
        };
        let chars: Vec<char> = pattern.chars().collect();
        let want = like_reference(&chars, escape, &value.chars().collect::<Vec<_>>());
        prop_assert_eq!(expr.evaluate_bool(&HashMap::new()), Some(want), "{} on {:?}", expr, value);
    }
}
