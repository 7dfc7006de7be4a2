//! Turns selector text into tokens.
//!
//! The lexer works on `char`s so that every token carries the 1-based
//! character column an error message can point at, whatever UTF-8 the
//! identifiers or string literals contain. Input is already bounded by
//! [`MAX_SELECTOR_LEN`](crate::MAX_SELECTOR_LEN), so collecting the characters
//! up front is cheap.

use std::fmt;

use crate::error::{Error, Result};

/// One lexical element of a selector.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    /// A property or header name.
    Ident(String),
    /// A string literal with `''` already unescaped.
    Str(String),
    /// An exact numeric literal. Kept unsigned so that `-9223372036854775808`
    /// (whose magnitude does not fit in `i64`) can still be folded into
    /// `i64::MIN` by the parser.
    Int(u64),
    /// An approximate numeric literal, or a decimal integer too large for
    /// `u64`. Always finite.
    Float(f64),
    Null,
    True,
    False,
    Not,
    And,
    Or,
    Between,
    Like,
    In,
    Is,
    Escape,
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    Plus,
    Minus,
    Star,
    Slash,
    Percent,
    LParen,
    RParen,
    Comma,
    Eof,
}

impl fmt::Display for Tok {
    /// How a token is named in "unexpected token" errors.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Tok::Ident(name) => return write!(f, "'{name}'"),
            Tok::Str(s) => return write!(f, "string '{}'", s.replace('\'', "''")),
            Tok::Int(v) => return write!(f, "'{v}'"),
            Tok::Float(v) => return write!(f, "'{v:?}'"),
            Tok::Null => "NULL",
            Tok::True => "TRUE",
            Tok::False => "FALSE",
            Tok::Not => "NOT",
            Tok::And => "AND",
            Tok::Or => "OR",
            Tok::Between => "BETWEEN",
            Tok::Like => "LIKE",
            Tok::In => "IN",
            Tok::Is => "IS",
            Tok::Escape => "ESCAPE",
            Tok::Eq => "=",
            Tok::Ne => "<>",
            Tok::Gt => ">",
            Tok::Ge => ">=",
            Tok::Lt => "<",
            Tok::Le => "<=",
            Tok::Plus => "+",
            Tok::Minus => "-",
            Tok::Star => "*",
            Tok::Slash => "/",
            Tok::Percent => "%",
            Tok::LParen => "(",
            Tok::RParen => ")",
            Tok::Comma => ",",
            Tok::Eof => return f.write_str("end of selector"),
        };
        write!(f, "'{s}'")
    }
}

/// A token and the 1-based character column where it starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    pub(crate) tok: Tok,
    pub(crate) column: usize,
}

/// The reserved words. They are matched case-insensitively and can therefore
/// never be used as identifiers, in any spelling (the JMS rule).
fn keyword(word: &str) -> Option<Tok> {
    const KEYWORDS: [(&str, Tok); 11] = [
        ("NULL", Tok::Null),
        ("TRUE", Tok::True),
        ("FALSE", Tok::False),
        ("NOT", Tok::Not),
        ("AND", Tok::And),
        ("OR", Tok::Or),
        ("BETWEEN", Tok::Between),
        ("LIKE", Tok::Like),
        ("IN", Tok::In),
        ("IS", Tok::Is),
        ("ESCAPE", Tok::Escape),
    ];
    KEYWORDS
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(word))
        .map(|(_, t)| t.clone())
}

/// Java identifier start: a letter, `_` or `$`.
pub(crate) fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_' || c == '$'
}

/// Java identifier part: a letter, digit, `_` or `$`.
pub(crate) fn is_ident_part(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

/// Splits `text` into tokens, ending with [`Tok::Eof`].
pub(crate) fn tokenize(text: &str) -> Result<Vec<Token>> {
    let chars: Vec<char> = text.chars().collect();
    let mut lexer = Lexer {
        chars: &chars,
        pos: 0,
        text,
    };
    let mut tokens = Vec::new();
    loop {
        let token = lexer.next_token()?;
        let done = token.tok == Tok::Eof;
        tokens.push(token);
        if done {
            return Ok(tokens);
        }
    }
}

struct Lexer<'a> {
    chars: &'a [char],
    pos: usize,
    text: &'a str,
}

impl Lexer<'_> {
    fn peek_at(&self, offset: usize) -> Option<char> {
        self.chars.get(self.pos + offset).copied()
    }

    fn error(&self, message: impl Into<String>, pos: usize) -> Error {
        Error::syntax(message, pos + 1, self.text)
    }

    fn next_token(&mut self) -> Result<Token> {
        while self.peek_at(0).is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
        let start = self.pos;
        let column = start + 1;
        let Some(c) = self.peek_at(0) else {
            return Ok(Token {
                tok: Tok::Eof,
                column,
            });
        };
        let next = self.peek_at(1);
        let (tok, len) = match c {
            '=' => (Tok::Eq, 1),
            '<' if next == Some('>') => (Tok::Ne, 2),
            '<' if next == Some('=') => (Tok::Le, 2),
            '<' => (Tok::Lt, 1),
            '>' if next == Some('=') => (Tok::Ge, 2),
            '>' => (Tok::Gt, 1),
            '+' => (Tok::Plus, 1),
            '-' => (Tok::Minus, 1),
            '*' => (Tok::Star, 1),
            '/' => (Tok::Slash, 1),
            '%' => (Tok::Percent, 1),
            '(' => (Tok::LParen, 1),
            ')' => (Tok::RParen, 1),
            ',' => (Tok::Comma, 1),
            '\'' => return self.string(start),
            '0'..='9' => return self.number(start),
            '.' if next.is_some_and(|d| d.is_ascii_digit()) => return self.number(start),
            c if is_ident_start(c) => return Ok(self.word(start)),
            '!' if next == Some('=') => {
                return Err(self.error("'!=' is not a selector operator; use '<>'", start))
            }
            '"' => {
                return Err(self.error(
                    "string literals use single quotes ('...'), not double quotes",
                    start,
                ))
            }
            c => return Err(self.error(format!("unexpected character {c:?}"), start)),
        };
        self.pos += len;
        Ok(Token { tok, column })
    }

    /// A `'...'` literal; a doubled quote stands for one quote.
    fn string(&mut self, start: usize) -> Result<Token> {
        self.pos += 1;
        let mut value = String::new();
        loop {
            match self.peek_at(0) {
                None => return Err(self.error("unterminated string literal", start)),
                Some('\'') if self.peek_at(1) == Some('\'') => {
                    value.push('\'');
                    self.pos += 2;
                }
                Some('\'') => {
                    self.pos += 1;
                    return Ok(Token {
                        tok: Tok::Str(value),
                        column: start + 1,
                    });
                }
                Some(c) => {
                    value.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    /// An identifier or keyword.
    fn word(&mut self, start: usize) -> Token {
        while self.peek_at(0).is_some_and(is_ident_part) {
            self.pos += 1;
        }
        let word: String = self.chars[start..self.pos].iter().collect();
        let tok = keyword(&word).unwrap_or(Tok::Ident(word));
        Token {
            tok,
            column: start + 1,
        }
    }

    fn take_digits(&mut self, radix: u32) -> usize {
        let from = self.pos;
        while self.peek_at(0).is_some_and(|c| c.is_digit(radix)) {
            self.pos += 1;
        }
        self.pos - from
    }

    /// Consumes a `L`/`l` long suffix (tolerated for Java familiarity) unless
    /// it is the start of a longer word, which the parser will then reject.
    fn long_suffix(&mut self) {
        if matches!(self.peek_at(0), Some('l' | 'L')) && !self.peek_at(1).is_some_and(is_ident_part)
        {
            self.pos += 1;
        }
    }

    /// Exact numerics (decimal, or hex with `0x`) and approximate numerics
    /// (`1.5`, `7.`, `.5`, `1e3`, `2.5E-3`).
    ///
    /// Leading zeros mean decimal, as in SQL: `010` is ten, not octal eight,
    /// because that is what someone writing a selector means.
    fn number(&mut self, start: usize) -> Result<Token> {
        let column = start + 1;
        if self.peek_at(0) == Some('0')
            && matches!(self.peek_at(1), Some('x' | 'X'))
            && self.peek_at(2).is_some_and(|c| c.is_ascii_hexdigit())
        {
            self.pos += 2;
            let digits_from = self.pos;
            self.take_digits(16);
            let digits: String = self.chars[digits_from..self.pos].iter().collect();
            let value = u64::from_str_radix(&digits, 16)
                .ok()
                .filter(|v| i64::try_from(*v).is_ok())
                .ok_or_else(|| self.error("hexadecimal literal out of range", start))?;
            self.long_suffix();
            return Ok(Token {
                tok: Tok::Int(value),
                column,
            });
        }

        let int_digits = self.take_digits(10);
        let mut is_float = false;
        if self.peek_at(0) == Some('.') {
            self.pos += 1;
            self.take_digits(10);
            is_float = true;
        }
        // An exponent only when digits follow; otherwise `1e` lexes as `1`
        // followed by the identifier `e`, which the parser rejects.
        if matches!(self.peek_at(0), Some('e' | 'E')) {
            let sign = usize::from(matches!(self.peek_at(1), Some('+' | '-')));
            if self.peek_at(1 + sign).is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1 + sign;
                self.take_digits(10);
                is_float = true;
            }
        }
        let text: String = self.chars[start..self.pos].iter().collect();
        if !is_float {
            debug_assert!(int_digits > 0);
            self.long_suffix();
            if let Ok(v) = text.parse::<u64>() {
                return Ok(Token {
                    tok: Tok::Int(v),
                    column,
                });
            }
        }
        match text.parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(Token {
                tok: Tok::Float(v),
                column,
            }),
            _ => Err(self.error(format!("numeric literal {text} out of range"), start)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(text: &str) -> Vec<Tok> {
        tokenize(text).unwrap().into_iter().map(|t| t.tok).collect()
    }

    #[test]
    fn numbers() {
        assert_eq!(toks("7"), vec![Tok::Int(7), Tok::Eof]);
        assert_eq!(toks("7L"), vec![Tok::Int(7), Tok::Eof]);
        assert_eq!(toks("0x1F"), vec![Tok::Int(31), Tok::Eof]);
        assert_eq!(toks("010"), vec![Tok::Int(10), Tok::Eof]);
        assert_eq!(toks("7."), vec![Tok::Float(7.0), Tok::Eof]);
        assert_eq!(toks(".5"), vec![Tok::Float(0.5), Tok::Eof]);
        assert_eq!(toks("1.e2"), vec![Tok::Float(100.0), Tok::Eof]);
        assert_eq!(toks("007"), vec![Tok::Int(7), Tok::Eof]);
        assert_eq!(toks("1e3"), vec![Tok::Float(1000.0), Tok::Eof]);
        assert_eq!(toks("2.5E-3"), vec![Tok::Float(0.0025), Tok::Eof]);
        assert_eq!(
            toks("1e"),
            vec![Tok::Int(1), Tok::Ident("e".into()), Tok::Eof]
        );
        assert_eq!(
            toks("99999999999999999999"),
            vec![Tok::Float(1e20), Tok::Eof]
        );
        assert!(tokenize("1e999").is_err());
        assert!(tokenize("0xFFFFFFFFFFFFFFFF").is_err());
    }

    #[test]
    fn words_and_columns() {
        let t = tokenize("a_1 <>  'it''s' and $x").unwrap();
        let got: Vec<(Tok, usize)> = t.into_iter().map(|t| (t.tok, t.column)).collect();
        assert_eq!(
            got,
            vec![
                (Tok::Ident("a_1".into()), 1),
                (Tok::Ne, 5),
                (Tok::Str("it's".into()), 9),
                (Tok::And, 17),
                (Tok::Ident("$x".into()), 21),
                (Tok::Eof, 23),
            ]
        );
    }

    #[test]
    fn lexical_errors() {
        assert_eq!(tokenize("a = 'abc").unwrap_err().column(), Some(5));
        assert_eq!(tokenize("a # b").unwrap_err().column(), Some(3));
        assert_eq!(tokenize("a != b").unwrap_err().column(), Some(3));
    }
}
