//! Recursive-descent parser from tokens to [`Expr`].
//!
//! Precedence, loosest first:
//!
//! | level      | operators                                                   |
//! |------------|-------------------------------------------------------------|
//! | or         | `OR`                                                        |
//! | and        | `AND`                                                       |
//! | not        | `NOT` (prefix)                                              |
//! | comparison | `= <> < <= > >=`, `[NOT] BETWEEN`, `[NOT] IN`, `[NOT] LIKE`, `IS [NOT] NULL` |
//! | additive   | `+ -`                                                       |
//! | multiplicative | `* / %`                                                 |
//! | unary      | `+ -` (prefix)                                              |
//! | primary    | literal, identifier, `( expr )`                             |
//!
//! Comparisons do not chain (`a = b = c` is an error), as in the JMS grammar.
//!
//! Besides syntax the parser checks the operand types it can know statically,
//! so that selectors which could never match are
//! reported to the subscriber instead of silently filtering out everything:
//! `color > 'red'` (strings have no order), `x = NULL` (always UNKNOWN; use
//! `IS NULL`), `price + 'a'`, `1 AND x` and a non-boolean selector such as
//! `price * 2` are all errors. Identifiers are untyped until evaluation.

use crate::ast::{ArithOp, CmpOp, Expr, LikePattern};
use crate::error::{Error, Result};
use crate::lexer::{tokenize, Tok, Token};
use crate::{Value, MAX_DEPTH};

/// What the parser knows about the type of an expression's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Num,
    Str,
    Null,
    /// A property: its type is only known per message.
    Any,
}

fn kind(e: &Expr) -> Kind {
    match e {
        Expr::Literal(Value::Str(_)) => Kind::Str,
        Expr::Literal(Value::Bool(_)) => Kind::Bool,
        Expr::Literal(Value::Int(_) | Value::Float(_)) => Kind::Num,
        Expr::Null => Kind::Null,
        Expr::Property(_) => Kind::Any,
        Expr::Unary { .. } | Expr::Arith(..) => Kind::Num,
        Expr::Compare(..)
        | Expr::Not(_)
        | Expr::And(_)
        | Expr::Or(_)
        | Expr::Between { .. }
        | Expr::In { .. }
        | Expr::Like { .. }
        | Expr::IsNull { .. } => Kind::Bool,
    }
}

/// A parsed sub-expression with what error checks need to know about it.
struct Node {
    expr: Expr,
    /// Height of the tree rooted here (a leaf is 1).
    depth: usize,
    /// Where the sub-expression starts.
    column: usize,
}

/// Parses a whole selector. Empty input is the caller's business.
pub(crate) fn parse(text: &str) -> Result<Expr> {
    let tokens = tokenize(text)?;
    let mut parser = Parser {
        tokens,
        pos: 0,
        text,
        nesting: 0,
    };
    let node = parser.or()?;
    let end = parser.peek();
    if end.tok != Tok::Eof {
        return Err(parser.unexpected(end));
    }
    parser.require_bool(&node, "the selector")?;
    Ok(node.expr)
}

struct Parser<'a> {
    tokens: Vec<Token>,
    pos: usize,
    text: &'a str,
    /// Current recursion through parentheses, unary operators and `NOT`,
    /// bounded by [`MAX_DEPTH`] so hostile input cannot exhaust the stack.
    nesting: usize,
}

impl Parser<'_> {
    fn peek(&self) -> &Token {
        // `tokenize` always ends with `Eof` and we never advance past it.
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn peek_tok(&self) -> &Tok {
        &self.peek().tok
    }

    fn advance(&mut self) -> Token {
        let token = self.peek().clone();
        if token.tok != Tok::Eof {
            self.pos += 1;
        }
        token
    }

    fn eat(&mut self, tok: &Tok) -> bool {
        if self.peek_tok() == tok {
            self.advance();
            true
        } else {
            false
        }
    }

    fn error(&self, message: impl Into<String>, column: usize) -> Error {
        Error::syntax(message, column, self.text)
    }

    fn unexpected(&self, token: &Token) -> Error {
        if token.tok == Tok::Eof {
            self.error("unexpected end of selector", token.column)
        } else {
            self.error(format!("unexpected token {}", token.tok), token.column)
        }
    }

    fn expect(&mut self, tok: &Tok, what: &str) -> Result<Token> {
        let token = self.advance();
        if &token.tok == tok {
            Ok(token)
        } else {
            let found = if token.tok == Tok::Eof {
                "end of selector".to_owned()
            } else {
                format!("{}", token.tok)
            };
            Err(self.error(format!("expected {what} but found {found}"), token.column))
        }
    }

    /// Builds a node, enforcing the tree-height limit.
    fn node(&self, expr: Expr, depth: usize, column: usize) -> Result<Node> {
        if depth > MAX_DEPTH {
            return Err(Error::too_deep(MAX_DEPTH, column, self.text));
        }
        Ok(Node {
            expr,
            depth,
            column,
        })
    }

    /// Runs `f` one recursion level deeper, enforcing the nesting limit.
    fn nested<T>(&mut self, column: usize, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if self.nesting >= MAX_DEPTH {
            return Err(Error::too_deep(MAX_DEPTH, column, self.text));
        }
        self.nesting += 1;
        let result = f(self);
        self.nesting -= 1;
        result
    }

    fn describe(e: &Expr) -> String {
        match e {
            Expr::Literal(Value::Str(_)) => format!("string {e}"),
            Expr::Literal(_) | Expr::Null => format!("{e}"),
            _ => match kind(e) {
                Kind::Bool => "a boolean expression".to_owned(),
                Kind::Num => "an arithmetic expression".to_owned(),
                _ => format!("{e}"),
            },
        }
    }

    fn require_bool(&self, node: &Node, role: &str) -> Result<()> {
        match kind(&node.expr) {
            Kind::Bool | Kind::Any => Ok(()),
            _ => Err(self.error(
                format!(
                    "{role} must be a boolean expression, not {}",
                    Self::describe(&node.expr)
                ),
                node.column,
            )),
        }
    }

    fn require_num(&self, node: &Node, op: &str) -> Result<()> {
        match kind(&node.expr) {
            Kind::Num | Kind::Any => Ok(()),
            _ => Err(self.error(
                format!(
                    "{} cannot be an operand of '{op}', which needs numbers",
                    Self::describe(&node.expr)
                ),
                node.column,
            )),
        }
    }

    fn require_str(&self, node: &Node, op: &str) -> Result<()> {
        match kind(&node.expr) {
            Kind::Str | Kind::Any => Ok(()),
            _ => Err(self.error(
                format!(
                    "{} cannot be tested with {op}, which needs a string",
                    Self::describe(&node.expr)
                ),
                node.column,
            )),
        }
    }

    /// `and (OR and)*`
    fn or(&mut self) -> Result<Node> {
        self.logic_chain(&Tok::Or, Self::and, Expr::Or, "an OR operand")
    }

    /// `not (AND not)*`
    fn and(&mut self) -> Result<Node> {
        self.logic_chain(&Tok::And, Self::not, Expr::And, "an AND operand")
    }

    fn logic_chain(
        &mut self,
        op: &Tok,
        operand: fn(&mut Self) -> Result<Node>,
        build: fn(Vec<Expr>) -> Expr,
        role: &str,
    ) -> Result<Node> {
        let first = operand(self)?;
        if self.peek_tok() != op {
            return Ok(first);
        }
        self.require_bool(&first, role)?;
        let column = first.column;
        let mut depth = first.depth;
        let mut items = vec![first.expr];
        while self.eat(op) {
            let next = operand(self)?;
            self.require_bool(&next, role)?;
            depth = depth.max(next.depth);
            items.push(next.expr);
        }
        self.node(build(items), depth + 1, column)
    }

    /// `NOT not | comparison`
    fn not(&mut self) -> Result<Node> {
        if *self.peek_tok() == Tok::Not {
            let column = self.advance().column;
            let operand = self.nested(column, Self::not)?;
            self.require_bool(&operand, "the operand of NOT")?;
            return self.node(Expr::Not(Box::new(operand.expr)), operand.depth + 1, column);
        }
        self.comparison()
    }

    /// `additive [cmp-op additive | [NOT] BETWEEN .. | [NOT] IN .. | [NOT] LIKE .. | IS [NOT] NULL]`
    fn comparison(&mut self) -> Result<Node> {
        let left = self.additive()?;
        let column = left.column;
        let op = match self.peek_tok() {
            Tok::Eq => Some(CmpOp::Eq),
            Tok::Ne => Some(CmpOp::Ne),
            Tok::Lt => Some(CmpOp::Lt),
            Tok::Le => Some(CmpOp::Le),
            Tok::Gt => Some(CmpOp::Gt),
            Tok::Ge => Some(CmpOp::Ge),
            _ => None,
        };
        if let Some(op) = op {
            self.advance();
            let right = self.additive()?;
            for side in [&left, &right] {
                self.check_compare_operand(op, side)?;
            }
            let depth = left.depth.max(right.depth) + 1;
            let expr = Expr::Compare(op, Box::new(left.expr), Box::new(right.expr));
            return self.node(expr, depth, column);
        }

        let negated = *self.peek_tok() == Tok::Not;
        if negated {
            let not = self.advance();
            if !matches!(self.peek_tok(), Tok::Between | Tok::In | Tok::Like) {
                let found = self.peek().clone();
                return Err(self.error(
                    format!(
                        "expected BETWEEN, IN or LIKE after NOT but found {}",
                        found.tok
                    ),
                    if found.tok == Tok::Eof {
                        not.column
                    } else {
                        found.column
                    },
                ));
            }
        }
        match self.peek_tok() {
            Tok::Between => {
                self.advance();
                let low = self.additive()?;
                self.expect(&Tok::And, "AND")?;
                let high = self.additive()?;
                for side in [&left, &low, &high] {
                    self.require_num(side, "BETWEEN")?;
                }
                let depth = left.depth.max(low.depth).max(high.depth) + 1;
                let expr = Expr::Between {
                    expr: Box::new(left.expr),
                    low: Box::new(low.expr),
                    high: Box::new(high.expr),
                    negated,
                };
                self.node(expr, depth, column)
            }
            Tok::In => {
                self.advance();
                self.require_str(&left, "IN")?;
                let list = self.in_list()?;
                let expr = Expr::In {
                    expr: Box::new(left.expr),
                    list,
                    negated,
                };
                self.node(expr, left.depth + 1, column)
            }
            Tok::Like => {
                self.advance();
                self.require_str(&left, "LIKE")?;
                let pattern = self.like_pattern()?;
                let expr = Expr::Like {
                    expr: Box::new(left.expr),
                    pattern,
                    negated,
                };
                self.node(expr, left.depth + 1, column)
            }
            Tok::Is => {
                self.advance();
                let negated = self.eat(&Tok::Not);
                self.expect(&Tok::Null, "NULL after IS")?;
                let expr = Expr::IsNull {
                    expr: Box::new(left.expr),
                    negated,
                };
                self.node(expr, left.depth + 1, column)
            }
            _ => Ok(left),
        }
    }

    fn check_compare_operand(&self, op: CmpOp, side: &Node) -> Result<()> {
        if kind(&side.expr) == Kind::Null {
            return Err(self.error(
                format!(
                    "NULL cannot be compared with '{}' (the result is always unknown); use IS NULL or IS NOT NULL",
                    op.symbol()
                ),
                side.column,
            ));
        }
        if !op.is_equality() {
            self.require_num(side, op.symbol())?;
        }
        Ok(())
    }

    /// `( 'a' [, 'b']* )`
    fn in_list(&mut self) -> Result<Vec<String>> {
        self.expect(&Tok::LParen, "'(' after IN")?;
        let mut list = Vec::new();
        loop {
            let token = self.advance();
            match token.tok {
                Tok::Str(s) => list.push(s),
                _ => {
                    return Err(self.error(
                        format!(
                            "IN lists hold string literals only, but found {}",
                            token.tok
                        ),
                        token.column,
                    ))
                }
            }
            let token = self.advance();
            match token.tok {
                Tok::Comma => {}
                Tok::RParen => return Ok(list),
                _ => {
                    return Err(self.error(
                        format!("expected ',' or ')' in IN list but found {}", token.tok),
                        token.column,
                    ))
                }
            }
        }
    }

    /// `'pattern' [ESCAPE 'c']`
    fn like_pattern(&mut self) -> Result<LikePattern> {
        let token = self.advance();
        let Tok::Str(pattern) = token.tok else {
            return Err(self.error(
                format!(
                    "LIKE needs a string literal pattern, but found {}",
                    token.tok
                ),
                token.column,
            ));
        };
        let mut escape = None;
        if self.eat(&Tok::Escape) {
            let token = self.advance();
            let mut chars = match &token.tok {
                Tok::Str(s) => s.chars(),
                _ => "".chars(),
            };
            match (chars.next(), chars.next()) {
                (Some(c), None) if matches!(token.tok, Tok::Str(_)) => escape = Some(c),
                _ => {
                    return Err(self.error(
                        format!(
                            "ESCAPE needs a string literal of exactly one character, but found {}",
                            token.tok
                        ),
                        token.column,
                    ))
                }
            }
        }
        LikePattern::new(&pattern, escape).map_err(|m| self.error(m, token.column))
    }

    /// `multiplicative ((+|-) multiplicative)*`
    fn additive(&mut self) -> Result<Node> {
        self.arith_chain(Self::multiplicative, |tok| match tok {
            Tok::Plus => Some(ArithOp::Add),
            Tok::Minus => Some(ArithOp::Sub),
            _ => None,
        })
    }

    /// `unary ((*|/|%) unary)*`
    fn multiplicative(&mut self) -> Result<Node> {
        self.arith_chain(Self::unary, |tok| match tok {
            Tok::Star => Some(ArithOp::Mul),
            Tok::Slash => Some(ArithOp::Div),
            Tok::Percent => Some(ArithOp::Rem),
            _ => None,
        })
    }

    fn arith_chain(
        &mut self,
        operand: fn(&mut Self) -> Result<Node>,
        op_of: fn(&Tok) -> Option<ArithOp>,
    ) -> Result<Node> {
        let mut left = operand(self)?;
        while let Some(op) = op_of(self.peek_tok()) {
            self.advance();
            let right = operand(self)?;
            self.require_num(&left, op.symbol())?;
            self.require_num(&right, op.symbol())?;
            let depth = left.depth.max(right.depth) + 1;
            let column = left.column;
            let expr = Expr::Arith(op, Box::new(left.expr), Box::new(right.expr));
            left = self.node(expr, depth, column)?;
        }
        Ok(left)
    }

    /// `(+|-) unary | primary`
    fn unary(&mut self) -> Result<Node> {
        let negate = match self.peek_tok() {
            Tok::Minus => true,
            Tok::Plus => false,
            _ => return self.primary(),
        };
        let column = self.advance().column;
        // `-9223372036854775808` is i64::MIN, although its magnitude alone
        // does not fit in i64.
        let min_magnitude = i64::MIN.unsigned_abs();
        if negate && *self.peek_tok() == Tok::Int(min_magnitude) {
            self.advance();
            return self.node(Expr::Literal(Value::Int(i64::MIN)), 1, column);
        }
        let operand = self.nested(column, Self::unary)?;
        self.require_num(&operand, if negate { "-" } else { "+" })?;
        let expr = Expr::Unary {
            negate,
            expr: Box::new(operand.expr),
        };
        self.node(expr, operand.depth + 1, column)
    }

    /// Literal, identifier or parenthesised expression.
    fn primary(&mut self) -> Result<Node> {
        let token = self.advance();
        let column = token.column;
        let expr = match token.tok {
            Tok::Str(s) => Expr::Literal(Value::Str(s)),
            Tok::Int(v) => Expr::Literal(match i64::try_from(v) {
                Ok(v) => Value::Int(v),
                // Too large for an exact numeric: keep it as an
                // approximate one rather than reject a valid number.
                Err(_) => Value::Float(v as f64),
            }),
            Tok::Float(v) => Expr::Literal(Value::Float(v)),
            Tok::True => Expr::Literal(Value::Bool(true)),
            Tok::False => Expr::Literal(Value::Bool(false)),
            Tok::Null => Expr::Null,
            Tok::Ident(name) => Expr::Property(name),
            Tok::LParen => {
                let inner = self.nested(column, Self::or)?;
                self.expect(&Tok::RParen, "')'")?;
                // The parentheses are gone from the tree, but errors about
                // the operand should point at them.
                return Ok(Node { column, ..inner });
            }
            _ => return Err(self.unexpected(&token)),
        };
        self.node(expr, 1, column)
    }
}
