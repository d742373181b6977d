//! R-style model formulas (`log(wage) ~ education + I(experience^2) + ethnicity * smsa`): the
//! parser and the expansion into terms. What the terms mean for a design (which names are
//! factors, how they are coded) is [`crate::design`]'s.
//!
//! Hand-written: the Rust formula parsers on crates.io (`fiasto`, `polars-formula`) bring
//! dependencies this crate may not have (it holds only serde, postcard, serde_json, sha2 and
//! thiserror) and a larger grammar (random effects, `poly`, nesting) than a node should accept
//! from the network.
//!
//! Grammar (spaces are free):
//!
//! ```text
//! formula  = lhs "~" rhs
//! lhs      = name | "log(" name ")" | "I(" name ">" number ")" | "I(" name "==" (string | name) ")"
//! rhs      = item (("+" | "-") item)*        "- 1", "+ 0" or a leading "0" remove the intercept
//! item     = "0" | "1" | product
//! product  = inter ("*" inter)*              a*b = a + b + a:b (also three-way and more)
//! inter    = atom (":" atom)*                an interaction: the product of its atoms
//! atom     = name | "I(" name "^" k ")"      k an integer power from 2 to 4
//! name     = letters, digits, "_" and "." (not starting with a digit), or `any text` in backticks
//! ```
//!
//! Terms are deduplicated as R does (`a + a` is `a`; `a:b` and `b:a` are one term) and ordered
//! by degree, main effects first, then in order of appearance. The input is bounded before it is
//! expanded ([`MAX_FORMULA_CHARS`], [`MAX_TERMS`]), since formulas arrive from the network.

use crate::design::Response;

/// Longest formula, in characters.
pub const MAX_FORMULA_CHARS: usize = 2_000;
/// Most terms a formula may expand to (`a*b*c` is 7 terms).
pub const MAX_TERMS: usize = 512;

/// One variable of a term: a column, raised to `power` (1 for a plain name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Var {
    pub column: String,
    pub power: u8,
}

/// A term: the product of its variables (one for a main effect), in the order written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    pub vars: Vec<Var>,
}

impl Term {
    /// The variables as a set: `a:b` and `b:a` are the same term.
    fn key(&self) -> Vec<Var> {
        let mut k = self.vars.clone();
        k.sort();
        k
    }
}

/// A parsed formula.
#[derive(Debug, Clone, PartialEq)]
pub struct Formula {
    pub response: Response,
    pub intercept: bool,
    /// Distinct terms, main effects first (then two-way interactions, ...), each degree in
    /// order of appearance.
    pub terms: Vec<Term>,
}

/// A formula that does not parse: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("formula, at character {position}: {problem}")]
pub struct FormulaError {
    /// 1-based character position of the offending token (the end for a missing one).
    pub position: usize,
    pub problem: FormulaProblem,
}

/// What is wrong with a formula. Tokens quoted here are the researcher's own text.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FormulaProblem {
    #[error("the formula is longer than {MAX_FORMULA_CHARS} characters; shorten it")]
    TooLong,
    #[error("expected {expected}, found {found}")]
    Expected { expected: &'static str, found: String },
    #[error("unknown function `{0}`: only log(...) on the left and I(...) are understood")]
    UnknownFunction(String),
    #[error("the power in I(x^k) must be an integer from 2 to 4")]
    Power,
    #[error("only `- 1` (remove the intercept) may be subtracted; leave the term out instead")]
    Subtraction,
    #[error("the formula expands to more than {MAX_TERMS} terms; use fewer `*`")]
    TooManyTerms,
    #[error("the response `{0}` is also on the right-hand side; remove it there")]
    ResponseAsPredictor(String),
    #[error("the right-hand side has no terms and no intercept")]
    Empty,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Name(String),
    /// A number as written.
    Number(String),
    Str(String),
    Sym(&'static str),
    End,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Name(n) => format!("`{n}`"),
            Tok::Number(n) => format!("`{n}`"),
            Tok::Str(s) => format!("\"{s}\""),
            Tok::Sym(s) => format!("`{s}`"),
            Tok::End => "the end of the formula".to_owned(),
        }
    }
}

fn err(position: usize, problem: FormulaProblem) -> FormulaError {
    FormulaError { position, problem }
}

/// Split into (position, token); the last token is `End`.
fn lex(text: &str) -> Result<Vec<(usize, Tok)>, FormulaError> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let pos = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c.is_alphabetic() || c == '_' || c == '.' && !chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())
        {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.') {
                i += 1;
            }
            out.push((pos, Tok::Name(chars[start..i].iter().collect())));
            continue;
        }
        if c.is_ascii_digit() || c == '.' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_digit()
                    || chars[i] == '.'
                    || matches!(chars[i], 'e' | 'E')
                    || matches!(chars[i], '+' | '-') && matches!(chars[i - 1], 'e' | 'E'))
            {
                i += 1;
            }
            out.push((pos, Tok::Number(chars[start..i].iter().collect())));
            continue;
        }
        if c == '`' || c == '"' || c == '\'' {
            let close = chars[i + 1..].iter().position(|d| *d == c).ok_or_else(|| {
                err(
                    pos,
                    FormulaProblem::Expected {
                        expected: "a closing quote",
                        found: "the end of the formula".to_owned(),
                    },
                )
            })?;
            let s: String = chars[i + 1..i + 1 + close].iter().collect();
            out.push((pos, if c == '`' { Tok::Name(s) } else { Tok::Str(s) }));
            i += close + 2;
            continue;
        }
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        if two == "==" {
            out.push((pos, Tok::Sym("==")));
            i += 2;
            continue;
        }
        let sym = match c {
            '~' => "~",
            '+' => "+",
            '-' => "-",
            '*' => "*",
            ':' => ":",
            '(' => "(",
            ')' => ")",
            '^' => "^",
            '>' => ">",
            _ => {
                return Err(err(
                    pos,
                    FormulaProblem::Expected {
                        expected: "a name, a number or one of ~ + - * : ( ) ^ > ==",
                        found: format!("`{c}`"),
                    },
                ))
            }
        };
        out.push((pos, Tok::Sym(sym)));
        i += 1;
    }
    out.push((chars.len() + 1, Tok::End));
    Ok(out)
}

struct Parser {
    toks: Vec<(usize, Tok)>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        self.toks.get(self.at).map_or(&Tok::End, |(_, t)| t)
    }

    fn pos(&self) -> usize {
        self.toks.get(self.at).map_or(0, |(p, _)| *p)
    }

    fn next(&mut self) -> (usize, Tok) {
        let t = self.toks.get(self.at).cloned().unwrap_or((0, Tok::End));
        self.at += 1;
        t
    }

    fn expected(&self, expected: &'static str) -> FormulaError {
        err(
            self.pos(),
            FormulaProblem::Expected {
                expected,
                found: self.peek().describe(),
            },
        )
    }

    fn sym(&mut self, s: &'static str) -> Result<(), FormulaError> {
        if *self.peek() == Tok::Sym(s) {
            self.at += 1;
            Ok(())
        } else {
            Err(self.expected(match s {
                "~" => "`~` between the response and the terms",
                "(" => "`(`",
                ")" => "`)`",
                "^" => "`^`",
                _ => "a symbol",
            }))
        }
    }

    fn name(&mut self) -> Result<String, FormulaError> {
        match self.peek().clone() {
            Tok::Name(n) => {
                self.at += 1;
                Ok(n)
            }
            _ => Err(self.expected("a column name")),
        }
    }

    /// A name, or a call `f(`: returns the function name if a `(` follows.
    fn name_or_call(&mut self) -> Result<(usize, String, bool), FormulaError> {
        let pos = self.pos();
        let n = self.name()?;
        let call = *self.peek() == Tok::Sym("(");
        if call {
            self.at += 1;
        }
        Ok((pos, n, call))
    }

    fn lhs(&mut self) -> Result<Response, FormulaError> {
        let (pos, n, call) = self.name_or_call()?;
        if !call {
            return Ok(Response::Value {
                column: n,
                log: false,
            });
        }
        let r = match n.as_str() {
            "log" => Response::Value {
                column: self.name()?,
                log: true,
            },
            "I" => {
                let column = self.name()?;
                match self.next() {
                    (_, Tok::Sym(">")) => {
                        let p = self.pos();
                        let (_, t) = self.next();
                        let threshold = match &t {
                            Tok::Number(s) => s.parse::<f64>().ok().filter(|v| v.is_finite()),
                            Tok::Sym("-") => match self.next() {
                                (_, Tok::Number(s)) => {
                                    s.parse::<f64>().ok().filter(|v| v.is_finite()).map(|v| -v)
                                }
                                _ => None,
                            },
                            _ => None,
                        };
                        let threshold = threshold.ok_or_else(|| {
                            err(
                                p,
                                FormulaProblem::Expected {
                                    expected: "a finite number after `>`",
                                    found: t.describe(),
                                },
                            )
                        })?;
                        Response::Above { column, threshold }
                    }
                    (_, Tok::Sym("==")) => match self.next() {
                        (_, Tok::Str(level) | Tok::Name(level)) => Response::Level { column, level },
                        (p, t) => {
                            return Err(err(
                                p,
                                FormulaProblem::Expected {
                                    expected: "a level after `==`, e.g. \"yes\"",
                                    found: t.describe(),
                                },
                            ))
                        }
                    },
                    (p, t) => {
                        return Err(err(
                            p,
                            FormulaProblem::Expected {
                                expected: "`>` number or `==` level inside I(...) on the left",
                                found: t.describe(),
                            },
                        ))
                    }
                }
            }
            _ => return Err(err(pos, FormulaProblem::UnknownFunction(n))),
        };
        self.sym(")")?;
        Ok(r)
    }

    fn atom(&mut self) -> Result<Var, FormulaError> {
        let (pos, n, call) = self.name_or_call()?;
        if !call {
            return Ok(Var { column: n, power: 1 });
        }
        if n != "I" {
            return Err(err(pos, FormulaProblem::UnknownFunction(n)));
        }
        let column = self.name()?;
        self.sym("^")?;
        let p = self.pos();
        let power = match self.next() {
            (_, Tok::Number(s)) => s.parse::<u8>().ok().filter(|k| (2..=4).contains(k)),
            _ => None,
        }
        .ok_or_else(|| err(p, FormulaProblem::Power))?;
        self.sym(")")?;
        Ok(Var { column, power })
    }

    fn inter(&mut self) -> Result<Term, FormulaError> {
        let mut vars = vec![self.atom()?];
        while *self.peek() == Tok::Sym(":") {
            self.at += 1;
            let v = self.atom()?;
            if !vars.contains(&v) {
                vars.push(v);
            }
        }
        Ok(Term { vars })
    }
}

/// Parse and expand a formula.
pub fn parse(text: &str) -> Result<Formula, FormulaError> {
    if text.chars().count() > MAX_FORMULA_CHARS {
        return Err(err(MAX_FORMULA_CHARS + 1, FormulaProblem::TooLong));
    }
    let mut p = Parser {
        toks: lex(text)?,
        at: 0,
    };
    let response = p.lhs()?;
    p.sym("~")?;
    let mut intercept = true;
    // Each `*` product as its factors (inters), expanded once the total is known to be bounded.
    let mut products: Vec<Vec<Term>> = Vec::new();
    let mut first = true;
    loop {
        let minus = if first {
            false
        } else {
            match p.peek() {
                Tok::Sym("+") => false,
                Tok::Sym("-") => true,
                Tok::End => break,
                _ => return Err(p.expected("`+`, `-` or the end of the formula")),
            }
        };
        if !first {
            p.at += 1;
        }
        first = false;
        let pos = p.pos();
        if let Tok::Number(n) = p.peek().clone() {
            p.at += 1;
            match (n.as_str(), minus) {
                ("1", true) | ("0", false) => intercept = false,
                ("1", false) => intercept = true,
                _ if minus => return Err(err(pos, FormulaProblem::Subtraction)),
                _ => {
                    return Err(err(
                        pos,
                        FormulaProblem::Expected {
                            expected: "a term, `0` or `1`",
                            found: format!("`{n}`"),
                        },
                    ))
                }
            }
            continue;
        }
        if minus {
            return Err(err(pos, FormulaProblem::Subtraction));
        }
        let mut product = vec![p.inter()?];
        while *p.peek() == Tok::Sym("*") {
            p.at += 1;
            product.push(p.inter()?);
        }
        products.push(product);
    }
    // Bound the expansion before making it: a product of k parts is 2^k - 1 terms.
    let mut total: usize = 0;
    for product in &products {
        let k = u32::try_from(product.len()).unwrap_or(u32::MAX);
        let n = 1usize.checked_shl(k).map_or(usize::MAX, |v| v - 1);
        total = total.saturating_add(n);
    }
    if total > MAX_TERMS {
        return Err(err(1, FormulaProblem::TooManyTerms));
    }
    let mut terms: Vec<Term> = Vec::new();
    let mut keys: Vec<Vec<Var>> = Vec::new();
    for product in products {
        // Subsets in the order R lists them: by the bit pattern, lowest part first.
        for mask in 1usize..(1 << product.len()) {
            let mut vars: Vec<Var> = Vec::new();
            for (j, part) in product.iter().enumerate() {
                if mask & (1 << j) != 0 {
                    for v in &part.vars {
                        if !vars.contains(v) {
                            vars.push(v.clone());
                        }
                    }
                }
            }
            let term = Term { vars };
            let key = term.key();
            if !keys.contains(&key) {
                keys.push(key);
                terms.push(term);
            }
        }
    }
    // Main effects first, then by degree; stable, so order of appearance within a degree.
    terms.sort_by_key(|t| t.vars.len());
    let response_column = response.column();
    if terms
        .iter()
        .any(|t| t.vars.iter().any(|v| v.column == response_column))
    {
        return Err(err(
            1,
            FormulaProblem::ResponseAsPredictor(response_column.to_owned()),
        ));
    }
    if terms.is_empty() && !intercept {
        return Err(err(text.chars().count() + 1, FormulaProblem::Empty));
    }
    Ok(Formula {
        response,
        intercept,
        terms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(column: &str, power: u8) -> Var {
        Var {
            column: column.to_owned(),
            power,
        }
    }

    /// The terms as `a:b^2` strings.
    fn terms(f: &Formula) -> Vec<String> {
        f.terms
            .iter()
            .map(|t| {
                t.vars
                    .iter()
                    .map(|v| {
                        if v.power == 1 {
                            v.column.clone()
                        } else {
                            format!("{}^{}", v.column, v.power)
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(":")
            })
            .collect()
    }

    fn check(text: &str, intercept: bool, expected: &[&str]) {
        let f = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(f.intercept, intercept, "{text}");
        assert_eq!(terms(&f), expected, "{text}");
    }

    #[test]
    fn each_construct_expands_as_in_r() {
        check("y ~ a + b", true, &["a", "b"]);
        check("y~a+b", true, &["a", "b"]);
        check("y ~ a:b", true, &["a:b"]);
        check("y ~ a*b", true, &["a", "b", "a:b"]);
        check("y ~ a*b*c", true, &["a", "b", "c", "a:b", "a:c", "b:c", "a:b:c"]);
        check("y ~ a:b + a + b:a", true, &["a", "a:b"]);
        check("y ~ a + a + b", true, &["a", "b"]);
        check("y ~ a*b:c", true, &["a", "b:c", "a:b:c"]);
        check("y ~ I(x^2) + x", true, &["x^2", "x"]);
        check("y ~ I( x ^ 3 ):f", true, &["x^3:f"]);
        check("y ~ a - 1", false, &["a"]);
        check("y ~ a + 0", false, &["a"]);
        check("y ~ 0 + a", false, &["a"]);
        check("y ~ 1", true, &[]);
        check("y ~ `odd name` + x.1 + _z", true, &["odd name", "x.1", "_z"]);
        let f = parse("log(wage) ~ education").expect("parses");
        assert_eq!(
            f.response,
            Response::Value {
                column: "wage".into(),
                log: true
            }
        );
        let f = parse("I(wage > 522.32) ~ education").expect("parses");
        assert_eq!(
            f.response,
            Response::Above {
                column: "wage".into(),
                threshold: 522.32
            }
        );
        let f = parse("I(wage > -1e3) ~ education").expect("parses");
        assert_eq!(
            f.response,
            Response::Above {
                column: "wage".into(),
                threshold: -1000.0
            }
        );
        for text in [
            "I(smsa == \"yes\") ~ x",
            "I(smsa == yes) ~ x",
            "I(smsa=='yes') ~ x",
        ] {
            let f = parse(text).expect("parses");
            assert_eq!(
                f.response,
                Response::Level {
                    column: "smsa".into(),
                    level: "yes".into()
                },
                "{text}"
            );
        }
        assert_eq!(
            parse("y ~ a:b").expect("parses").terms[0].vars,
            [v("a", 1), v("b", 1)]
        );
    }

    fn fails(text: &str, position: usize, problem: FormulaProblem) {
        assert_eq!(parse(text), Err(FormulaError { position, problem }), "{text}");
    }

    #[test]
    fn each_error_names_the_position_and_what_to_do() {
        let expected = |e: &'static str, f: &str| FormulaProblem::Expected {
            expected: e,
            found: f.to_owned(),
        };
        fails(
            "y  a",
            4,
            expected("`~` between the response and the terms", "`a`"),
        );
        fails("y ~ a +", 8, expected("a column name", "the end of the formula"));
        fails(
            "y ~ a b",
            7,
            expected("`+`, `-` or the end of the formula", "`b`"),
        );
        fails("y ~ poly(x)", 5, FormulaProblem::UnknownFunction("poly".into()));
        fails("exp(y) ~ x", 1, FormulaProblem::UnknownFunction("exp".into()));
        fails("y ~ I(x^5)", 9, FormulaProblem::Power);
        fails("y ~ I(x^1)", 9, FormulaProblem::Power);
        fails("y ~ I(x^2.5)", 9, FormulaProblem::Power);
        fails("y ~ I(x^2", 10, expected("`)`", "the end of the formula"));
        fails("y ~ a - b", 9, FormulaProblem::Subtraction);
        fails("y ~ a + 2", 9, expected("a term, `0` or `1`", "`2`"));
        fails("y ~ a + y", 1, FormulaProblem::ResponseAsPredictor("y".into()));
        fails("y ~ 0", 6, FormulaProblem::Empty);
        fails(
            "y ~ a $ b",
            7,
            expected("a name, a number or one of ~ + - * : ( ) ^ > ==", "`$`"),
        );
        fails("y ~ `a", 5, expected("a closing quote", "the end of the formula"));
        fails("I(y > x) ~ a", 7, expected("a finite number after `>`", "`x`"));
        fails(
            "I(y < 3) ~ a",
            5,
            expected("a name, a number or one of ~ + - * : ( ) ^ > ==", "`<`"),
        );
        fails(
            "I(y) ~ a",
            4,
            expected("`>` number or `==` level inside I(...) on the left", "`)`"),
        );
        let long = format!("y ~ {}", "a + ".repeat(600));
        fails(&long, MAX_FORMULA_CHARS + 1, FormulaProblem::TooLong);
        let wide = format!(
            "y ~ {}",
            (0..10).map(|i| format!("a{i}")).collect::<Vec<_>>().join("*")
        );
        fails(&wide, 1, FormulaProblem::TooManyTerms);
        let text = parse("y ~ I(x^7)").expect_err("power").to_string();
        assert!(
            text.contains("character 9") && text.contains("from 2 to 4"),
            "{text}"
        );
    }
}
