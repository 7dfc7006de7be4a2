//! Table-driven tests of the selector language: every operator, precedence,
//! three-valued logic, the JMS type rules, FerroMQ's STOMP coercions, and
//! parse errors with their positions.
#![allow(clippy::unwrap_used)] // tests may panic on the unexpected

use std::collections::HashMap;

use fmq_selector::{Error, Selector, Value, MAX_DEPTH, MAX_SELECTOR_LEN};

const T: Option<bool> = Some(true);
const F: Option<bool> = Some(false);
const U: Option<bool> = None;

/// The message every evaluation table runs against. `x`, `y` and anything
/// else not listed are absent (NULL).
fn props() -> HashMap<String, Value> {
    let entries = [
        ("s", Value::Str("abc".into())),
        ("s2", Value::Str("abc".into())),
        ("n", Value::Int(5)),
        ("n2", Value::Int(5)),
        ("f", Value::Float(2.5)),
        ("b", Value::Bool(true)),
        ("bf", Value::Bool(false)),
        ("zero", Value::Int(0)),
        ("fzero", Value::Float(0.0)),
        ("big", Value::Int(i64::MAX)),
        ("small", Value::Int(i64::MIN)),
        ("sn", Value::Str("7".into())),
        ("sf", Value::Str("2.5".into())),
        ("sneg", Value::Str("-3".into())),
        ("sexp", Value::Str("1e3".into())),
        ("sinf", Value::Str("inf".into())),
        ("snan", Value::Str("NaN".into())),
        ("st", Value::Str("TRUE".into())),
        ("sfalse", Value::Str("false".into())),
        ("empty", Value::Str(String::new())),
        ("dots", Value::Str("a.b%c".into())),
        ("axb", Value::Str("axbzc".into())),
        ("under", Value::Str("a_b".into())),
        ("quote", Value::Str("it's".into())),
        ("JMSPriority", Value::Int(4)),
        ("JMSType", Value::Str("order".into())),
        ("uni", Value::Str("héllo wörld".into())),
        ("nl", Value::Str("line1\nline2".into())),
    ];
    entries
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// Checks each selector evaluates to the expected three-valued result, and
/// that `matches` agrees (only TRUE matches).
fn check(table: &[(&str, Option<bool>)]) {
    let p = props();
    let mut failures = Vec::new();
    for (text, want) in table {
        match Selector::parse(text) {
            Ok(sel) => {
                let got = sel.expr().evaluate_bool(&p);
                if got != *want {
                    failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
                }
                if sel.matches(&p) != (*want == T) {
                    failures.push(format!("{text:?}: matches() disagrees"));
                }
                // The printer's output must mean the same.
                let printed = sel.expr().to_string();
                match Selector::parse(&printed) {
                    Ok(again) => {
                        if again.expr().evaluate_bool(&p) != *want {
                            failures.push(format!("{text:?}: reprinted as {printed:?} differs"));
                        }
                    }
                    Err(e) => failures.push(format!("{text:?}: reprint {printed:?} fails: {e}")),
                }
            }
            Err(e) => failures.push(format!("{text:?}: parse error {e}")),
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn literals() {
    check(&[
        ("TRUE", T),
        ("FALSE", F),
        ("true", T),
        ("False", F),
        ("'abc' = 'abc'", T),
        ("'it''s' = quote", T),
        ("'''' = ''''", T),
        ("'' = empty", T),
        ("42 = 42", T),
        ("42L = 42", T),
        ("42l = 42", T),
        ("0x2A = 42", T),
        ("0X2a = 42", T),
        ("010 = 10", T),
        ("1.5 = 1.5", T),
        ("7. = 7", T),
        (".5 = 0.5", T),
        ("1e3 = 1000", T),
        ("1E3 = 1000", T),
        ("2.5e-1 = 0.25", T),
        ("1.5E+2 = 150", T),
        ("-9223372036854775808 = small", T),
        ("9223372036854775807 = big", T),
        ("9223372036854775808 > big", T),
        ("99999999999999999999999 > 1e22", T),
        ("'héllo wörld' = uni", T),
    ]);
}

#[test]
fn identifiers() {
    check(&[
        ("JMSPriority = 4", T),
        ("JMSType = 'order'", T),
        ("jmstype = 'order'", U), // identifiers are case-sensitive
        ("$x IS NULL", T),
        ("_a IS NULL", T),
        ("a1$_b IS NULL", T),
        ("café IS NULL", T),
        ("nOt b", F), // keywords in any case
        ("b aNd TRUE", T),
    ]);
}

#[test]
fn arithmetic() {
    check(&[
        ("n + 1 = 6", T),
        ("n - 1 = 4", T),
        ("n * 2 = 10", T),
        ("n / 2 = 2", T), // integer division truncates
        ("n / 2.0 = 2.5", T),
        ("-n / 2 = -2", T),
        ("n % 3 = 2", T),
        ("-n = -5", T),
        ("+n = 5", T),
        ("- -n = 5", T),
        ("-(-(n)) = 5", T),
        ("f * 2 = 5", T),
        ("f + n = 7.5", T),
        ("1 + 2 * 3 = 7", T), // * over +
        ("(1 + 2) * 3 = 9", T),
        ("10 - 4 - 3 = 3", T), // left associative
        ("100 / 10 / 5 = 2", T),
        ("2 * 3 + 4 * 5 = 26", T),
        ("10 - 2 * 3 = 4", T),
        ("7 % 4 * 2 = 6", T),
        ("x + 1 = 1", U), // NULL propagates
        ("-x = 1", U),
        ("s + 1 = 1", U), // non-numeric string
        ("b + 1 = 2", U), // boolean is not a number
        ("n / 0 = 1", U), // division by zero
        ("n / zero = 1", U),
        ("n % zero = 1", U),
        ("f / 0.0 = 1", U),
        ("n / fzero = 1", U),
        ("(n / 0) IS NULL", T),
        // Overflow is redone in floating point instead of wrapping.
        ("big + 1 > big", T),
        ("big + 1 > 0", T),
        ("big * big > 1e37", T),
        ("small - 1 < 0", T),
        ("big + 1 = 9223372036854775808", T),
        ("big = 9223372036854775808", F), // int/float comparison is exact
        ("big < 9223372036854775808", T),
        ("n < 5.5", T),
        ("n > 4.999", T),
        ("-n > -5.5", T),
        ("-n < -4.5", T),
        ("-small > 0", T),
        ("small / -1 > 0", T),
        ("small % -1 = 0", T),
        ("1e308 * 10 > 1e308", T),              // infinity is still ordered
        ("(1e308 * 10) - (1e308 * 10) = 0", U), // NaN is UNKNOWN
    ]);
}

#[test]
fn comparisons() {
    check(&[
        ("n = 5", T),
        ("n = n2", T),
        ("n <> 5", F),
        ("n <> 6", T),
        ("n > 4", T),
        ("n > 5", F),
        ("n >= 5", T),
        ("n >= 6", F),
        ("n < 6", T),
        ("n < 5", F),
        ("n <= 5", T),
        ("n <= 4", F),
        ("n = 5.0", T), // int widened to float
        ("f < n", T),
        ("f > 2", T),
        ("s = 'abc'", T),
        ("s = s2", T),
        ("s <> 'abd'", T),
        ("s = 'ABC'", F), // case-sensitive
        ("s < s2", U),    // strings have no order
        ("b = TRUE", T),
        ("b <> bf", T),
        ("b = bf", F),
        ("b > bf", U),
        ("x = 5", U),
        ("x <> 5", U),
        ("x = y", U),
        ("x < 5", U),
        ("s = 5", U), // string vs number (not numeric)
        ("b = 1", U), // boolean vs number
        ("n = TRUE", U),
        ("s = TRUE", U),
        ("'5' = 5", T), // a string literal is coerced too
    ]);
}

#[test]
fn stomp_string_coercion() {
    check(&[
        ("sn = 7", T),
        ("sn > 5", T),
        ("sn < 10", T), // numeric, not lexicographic
        ("sn >= 7.0", T),
        ("sn + 1 = 8", T),
        ("sn * f = 17.5", T),
        ("-sn = -7", T),
        ("+sn = 7", T),
        ("sf = 2.5", T),
        ("sf > 2", T),
        ("sneg < 0", T),
        ("sexp = 1000", T),
        ("sn BETWEEN 5 AND 10", T),
        ("sn NOT BETWEEN 5 AND 10", F),
        ("JMSPriority = sn - 3", T),
        ("sn = '7'", T),
        ("sn = '7.0'", F), // two strings compare as strings
        ("s > 5", U),
        ("empty = 0", U),
        ("sinf > 0", U),    // 'inf' is not a number in a selector
        ("snan = snan", T), // ... but two strings still compare as strings
        ("snan > 0", U),
        ("st = TRUE", T),
        ("st = FALSE", F),
        ("sfalse = FALSE", T),
        ("sfalse <> TRUE", T),
        ("'True' = b", T),
        ("s = TRUE", U),
        ("st", T),
        ("NOT sfalse", T),
        ("st AND sfalse", F),
        ("sfalse OR st", T),
        ("s", U),
        ("NOT s", U),
        ("n", U),
    ]);
}

#[test]
fn between() {
    check(&[
        ("n BETWEEN 1 AND 10", T),
        ("n BETWEEN 5 AND 5", T),
        ("n BETWEEN 6 AND 10", F),
        ("n BETWEEN 10 AND 1", F),
        ("n NOT BETWEEN 1 AND 10", F),
        ("n NOT BETWEEN 6 AND 10", T),
        ("f BETWEEN 2 AND 3", T),
        ("n BETWEEN 4.5 AND 5.5", T),
        ("n BETWEEN n - 1 AND n + 1", T),
        ("n + 1 BETWEEN 6 AND 6", T),
        ("x BETWEEN 1 AND 10", U),
        ("x NOT BETWEEN 1 AND 10", U),
        ("n BETWEEN x AND 10", U),
        ("n BETWEEN x AND 4", F), // one false bound decides
        ("n NOT BETWEEN x AND 4", T),
        ("n BETWEEN 6 AND x", F),
        ("s BETWEEN 1 AND 10", U),
        // BETWEEN's AND binds to BETWEEN, not to the logical AND.
        ("n BETWEEN 1 AND 10 AND b", T),
        ("n BETWEEN 1 AND 10 AND bf", F),
        ("n BETWEEN 1 AND 10 OR x = 1", T),
    ]);
}

#[test]
fn in_lists() {
    check(&[
        ("s IN ('abc')", T),
        ("s IN ('x', 'abc', 'y')", T),
        ("s IN ('x', 'y')", F),
        ("s NOT IN ('x', 'y')", T),
        ("s NOT IN ('abc', 'y')", F),
        ("s IN ('ABC')", F),
        ("quote IN ('it''s')", T),
        ("x IN ('a', 'b')", U),
        ("x NOT IN ('a', 'b')", U),
        ("NOT (x IN ('a'))", U),
        ("n IN ('5')", U), // IN needs a string
        ("n NOT IN ('5')", U),
        ("sn IN ('7')", T),
        ("'abc' IN ('abc')", T),
        ("s IN ('abc') AND n = 5", T),
    ]);
}

#[test]
fn like() {
    check(&[
        ("s LIKE 'abc'", T),
        ("s LIKE 'ab'", F),
        ("s LIKE 'a%'", T),
        ("s LIKE '%c'", T),
        ("s LIKE '%b%'", T),
        ("s LIKE '%'", T),
        ("empty LIKE '%'", T),
        ("empty LIKE '_'", F),
        ("s LIKE 'a_c'", T),
        ("s LIKE '___'", T),
        ("s LIKE '__'", F),
        ("s LIKE '____'", F),
        ("s LIKE 'A%'", F), // case-sensitive
        ("s NOT LIKE 'a%'", F),
        ("s NOT LIKE 'z%'", T),
        ("s LIKE '%%%c%%'", T),
        ("axb LIKE 'a%b%c'", T),
        ("axb LIKE 'a%z'", F),
        ("axb LIKE '%x%z_'", T),
        // Regex metacharacters are literal.
        ("dots LIKE 'a.b%'", T),
        ("axb LIKE 'a.b%'", F),
        ("s LIKE 'a.c'", F),
        ("s LIKE '[a]bc'", F),
        ("s LIKE 'ab*'", F),
        ("s LIKE '^abc$'", F),
        ("s LIKE '(abc)|x'", F),
        ("'a+b' LIKE 'a+b'", T),
        ("'a\\b' LIKE 'a\\b'", T),
        ("nl LIKE 'line1%line2'", T), // % spans newlines
        ("nl LIKE 'line1_line2'", T),
        ("uni LIKE 'h_llo w_rld'", T),
        // ESCAPE makes % and _ literal.
        ("dots LIKE 'a.b!%c' ESCAPE '!'", T),
        ("dots LIKE 'a.b!%%' ESCAPE '!'", T),
        ("'a%b' LIKE 'a!%b' ESCAPE '!'", T),
        ("'axb' LIKE 'a!%b' ESCAPE '!'", F),
        ("under LIKE 'a\\_b' ESCAPE '\\'", T),
        ("'axb' LIKE 'a\\_b' ESCAPE '\\'", F),
        ("'a!b' LIKE 'a!!b' ESCAPE '!'", T),
        ("'a%b' LIKE 'a%%b' ESCAPE '%'", T),
        ("'axb' LIKE 'a%%b' ESCAPE '%'", F),
        ("'it''s' LIKE 'it''''s' ESCAPE ''''", T),
        ("x LIKE 'a%'", U),
        ("x NOT LIKE 'a%'", U),
        ("n LIKE '5'", U), // LIKE needs a string
        ("n NOT LIKE '5'", U),
        ("b LIKE 'true'", U),
    ]);
}

#[test]
fn like_is_not_exponential() {
    let long = "a".repeat(2000);
    let sel = Selector::parse(&format!("s LIKE '{}b'", "%a".repeat(500))).unwrap();
    let mut p = HashMap::new();
    p.insert("s".to_owned(), Value::Str(long));
    let start = std::time::Instant::now();
    assert!(!sel.matches(&p));
    assert!(start.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn is_null() {
    check(&[
        ("x IS NULL", T),
        ("x IS NOT NULL", F),
        ("n IS NULL", F),
        ("n IS NOT NULL", T),
        ("empty IS NULL", F), // an empty string is not NULL
        ("bf IS NOT NULL", T),
        ("NULL IS NULL", T),
        ("x + 1 IS NULL", T),
        ("(x = 1) IS NULL", T),
        ("(n = 1) IS NOT NULL", T),
        ("x is null", T),
        ("NOT x IS NULL", F), // NOT applies to the whole predicate
    ]);
}

#[test]
fn three_valued_logic_truth_tables() {
    // Operands: TRUE, FALSE, and UNKNOWN spelled as a comparison with an
    // absent property.
    let operands = [("TRUE", T), ("FALSE", F), ("(x = 1)", U)];
    let and = |a: Option<bool>, b: Option<bool>| match (a, b) {
        (Some(false), _) | (_, Some(false)) => F,
        (Some(true), Some(true)) => T,
        _ => U,
    };
    let or = |a: Option<bool>, b: Option<bool>| match (a, b) {
        (Some(true), _) | (_, Some(true)) => T,
        (Some(false), Some(false)) => F,
        _ => U,
    };
    let mut table: Vec<(String, Option<bool>)> = Vec::new();
    for (a, va) in operands {
        table.push((format!("NOT {a}"), va.map(|v| !v)));
        for (b, vb) in operands {
            table.push((format!("{a} AND {b}"), and(va, vb)));
            table.push((format!("{a} OR {b}"), or(va, vb)));
            table.push((format!("NOT ({a} AND {b})"), and(va, vb).map(|v| !v)));
        }
    }
    // Literal spellings from the JMS spec tables, with absent properties.
    table.extend(
        [
            ("x = 1 AND FALSE", F),
            ("x = 1 OR TRUE", T),
            ("x = 1 OR FALSE", U),
            ("x = 1 AND TRUE", U),
            ("NOT x = 1", U),
            ("NOT NOT x = 1", U),
            ("x", U),
            ("NOT x", U),
            ("x AND FALSE", F),
            ("x OR TRUE", T),
            ("b AND bf", F),
            ("b OR bf", T),
        ]
        .map(|(s, v)| (s.to_owned(), v)),
    );
    let table: Vec<(&str, Option<bool>)> = table.iter().map(|(s, v)| (s.as_str(), *v)).collect();
    check(&table);
}

#[test]
fn precedence() {
    check(&[
        // NOT binds tighter than AND, AND tighter than OR.
        ("NOT FALSE AND FALSE", F), // (NOT FALSE) AND FALSE
        ("NOT (FALSE AND FALSE)", T),
        ("TRUE OR TRUE AND FALSE", T), // TRUE OR (TRUE AND FALSE)
        ("(TRUE OR TRUE) AND FALSE", F),
        ("FALSE AND FALSE OR TRUE", T), // (FALSE AND FALSE) OR TRUE
        ("FALSE AND (FALSE OR TRUE)", F),
        ("NOT TRUE OR TRUE", T), // (NOT TRUE) OR TRUE
        ("NOT (TRUE OR TRUE)", F),
        ("NOT n = 5", F), // NOT applies to the comparison
        ("NOT n = 5 OR n = 5", T),
        ("n = 5 AND s = 'abc' OR x = 1", T),
        ("x = 1 OR n = 5 AND s = 'abc'", T),
        ("x = 1 OR n = 5 AND s = 'zzz'", U),
        // Arithmetic binds tighter than comparison.
        ("n + 1 > 5 AND n * 2 = 10", T),
        ("1 + 2 * 3 = 7 AND (1 + 2) * 3 = 9", T),
        ("-2 * -3 = 6", T),
        ("-n + 10 = 5", T),
        ("- n * 2 = -10", T),
        ("((((n)))) = 5", T),
        ("(((n = 5)))", T),
    ]);
}

#[test]
fn empty_selector_matches_everything() {
    for text in ["", "   ", "\t\n"] {
        let sel = Selector::parse(text).unwrap();
        assert!(sel.matches(&HashMap::new()));
        assert_eq!(sel.as_str(), text);
    }
}

#[test]
fn api_surface() {
    let sel: Selector = "color = 'red'".parse().unwrap();
    assert_eq!(sel.as_str(), "color = 'red'");
    assert_eq!(sel.to_string(), "color = 'red'");
    let mut p = HashMap::new();
    p.insert("color".to_owned(), Value::Str("red".into()));
    assert!(sel.matches(&p));
    let btree: std::collections::BTreeMap<String, Value> = p.clone().into_iter().collect();
    assert!(sel.matches(&btree));
    assert_eq!(
        Selector::parse("n + 1").unwrap_err().column(),
        Some(1),
        "non-boolean selectors are rejected"
    );
}

/// Asserts that `text` fails to parse with a message containing `needle`
/// at `column`.
fn check_error(text: &str, column: usize, needle: &str) {
    let err = Selector::parse(text).expect_err(text);
    let msg = err.to_string();
    assert_eq!(err.column(), Some(column), "{text:?}: {msg}");
    assert!(msg.contains(needle), "{text:?}: {msg:?} lacks {needle:?}");
    assert!(msg.contains("in selector: "), "{msg}");
}

#[test]
fn parse_errors_name_what_and_where() {
    let cases: &[(&str, usize, &str)] = &[
        ("a = 1 AND AND b = 2", 11, "unexpected token 'AND'"),
        ("color = 'red' AND", 18, "unexpected end of selector"),
        ("a = ", 5, "unexpected end of selector"),
        ("a = 1)", 6, "unexpected token ')'"),
        ("(a = 1", 7, "expected ')'"),
        ("a == 1", 4, "unexpected token '='"),
        ("a = 'abc", 5, "unterminated string literal"),
        ("a # 1", 3, "unexpected character '#'"),
        ("a != 1", 3, "'!='"),
        ("a = \"x\"", 5, "single quotes"),
        ("a = b = c", 7, "unexpected token '='"),
        ("a IS 1", 6, "expected NULL after IS"),
        ("a NOT 1", 7, "expected BETWEEN, IN or LIKE after NOT"),
        ("a BETWEEN 1 OR 2", 13, "expected AND"),
        ("a IN 'x'", 6, "expected '(' after IN"),
        ("a IN ()", 7, "string literals only"),
        ("a IN ('x', 1)", 12, "string literals only"),
        ("a IN ('x' 'y')", 11, "expected ',' or ')'"),
        ("a LIKE b", 8, "string literal pattern"),
        ("a LIKE 'x' ESCAPE 'ab'", 19, "exactly one character"),
        ("a LIKE 'x' ESCAPE ''", 19, "exactly one character"),
        ("a LIKE 'x!' ESCAPE '!'", 8, "ends with its escape"),
        ("AND = 1", 1, "unexpected token 'AND'"),
        ("null = 1", 1, "NULL cannot be compared"),
        ("a = NULL", 5, "use IS NULL"),
        ("a <> null", 6, "use IS NULL"),
        ("color > 'red'", 9, "string 'red'"),
        ("a < TRUE", 5, "TRUE cannot be an operand of '<'"),
        ("a BETWEEN 'a' AND 'z'", 11, "BETWEEN"),
        ("a + 'x' = 1", 5, "cannot be an operand of '+'"),
        ("-'x' = 1", 2, "cannot be an operand of '-'"),
        (
            "(a = 1) + 1 = 2",
            1,
            "a boolean expression cannot be an operand",
        ),
        (
            "1 AND a",
            1,
            "an AND operand must be a boolean expression, not 1",
        ),
        ("a OR 'x'", 6, "an OR operand must be a boolean"),
        ("NOT 5", 5, "the operand of NOT must be a boolean"),
        ("n * 2", 1, "the selector must be a boolean expression"),
        ("'abc'", 1, "the selector must be a boolean expression"),
        ("5 LIKE '5'", 1, "needs a string"),
        ("TRUE IN ('x')", 1, "needs a string"),
        ("1e999 > a", 1, "out of range"),
        ("0xFFFFFFFFFFFFFFFF > a", 1, "out of range"),
        ("1e > a", 2, "unexpected token 'e'"),
        ("a = 5 5", 7, "unexpected token '5'"),
        ("  a =", 6, "unexpected end of selector"),
        ("é = 1 AND )", 11, "unexpected token ')'"),
    ];
    for (text, column, needle) in cases {
        check_error(text, *column, needle);
    }
}

#[test]
fn error_message_format() {
    let err = Selector::parse("color = 'red' AND AND").unwrap_err();
    assert_eq!(
        err.to_string(),
        "unexpected token 'AND' at column 19 in selector: color = 'red' AND AND"
    );
    // Control characters cannot break the ERROR frame header line.
    let err = Selector::parse("a =\n\n").unwrap_err();
    assert!(!err.to_string().contains('\n'), "{err}");
    // Long selectors are shortened in the message.
    let long = format!("{} AND", "a = 1 OR ".repeat(100));
    let err = Selector::parse(&long).unwrap_err();
    assert!(err.to_string().len() < 400, "{err}");
}

#[test]
fn length_limit() {
    let ok = format!("a = '{}'", "x".repeat(MAX_SELECTOR_LEN - 6));
    assert_eq!(ok.chars().count(), MAX_SELECTOR_LEN);
    assert!(Selector::parse(&ok).is_ok());
    let too_long = format!("a = '{}'", "x".repeat(MAX_SELECTOR_LEN - 5));
    assert!(matches!(
        Selector::parse(&too_long),
        Err(Error::TooLong { .. })
    ));
}

#[test]
fn depth_limit() {
    let nested = |n: usize| format!("{}a = 1{}", "(".repeat(n), ")".repeat(n));
    assert!(Selector::parse(&nested(MAX_DEPTH - 2)).is_ok());
    assert!(matches!(
        Selector::parse(&nested(MAX_DEPTH + 1)),
        Err(Error::TooDeep { .. })
    ));
    // Hostile inputs: none may overflow the stack, all must be rejected.
    for hostile in [
        "(".repeat(4000),
        format!("{}a", "NOT ".repeat(1000)),
        format!("{}1 = a", "-".repeat(4000)),
        format!("{}1 = a", "- ".repeat(2000)),
        format!("a = 1{}", " + 1".repeat(1000)),
        format!("a = 1{}", " * 1".repeat(1000)),
        format!("{}a = 1{}", "(".repeat(2000), ")".repeat(2000)),
    ] {
        let err = Selector::parse(&hostile).unwrap_err();
        assert!(matches!(err, Error::TooDeep { .. }), "{err}");
    }
    // Long AND/OR chains are flat, so they are not "deep".
    let chain = vec!["a = 1"; 300].join(" OR ");
    let sel = Selector::parse(&chain).unwrap();
    let mut p = HashMap::new();
    p.insert("a".to_owned(), Value::Int(1));
    assert!(sel.matches(&p));
    let chain = vec!["a = 1"; 300].join(" AND ");
    assert!(Selector::parse(&chain).unwrap().matches(&p));
    // A long IN list is fine too.
    let list = vec!["'v'"; 600].join(", ");
    assert!(Selector::parse(&format!("s IN ({list})")).is_ok());
}
